"""Hugging Face hub access that fails in seconds, not minutes.

Without a network, huggingface_hub retries each request with back-off for about 50 seconds before transformers
gives up. A run that names hub ids first checks that the hub answers at all; if it does not, the process switches
to offline mode, so files already in the local cache load at once and missing ones fail at once.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from qlora.config import Config, builds_scratch_model, is_data_file

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


def hub_ids(config: Config) -> list[str]:
    """The model and datasets the config names by hub id (not local paths)."""
    ids = []
    model = config.model.name_or_path
    if not builds_scratch_model(config.model) and not Path(model).expanduser().exists():
        ids.append(model)
    ids += [p for p in (config.data.path, config.data.eval_path) if p is not None and not is_data_file(p)]
    return ids


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def reachable() -> bool:
    """Whether a TCP connection to the hub endpoint opens (assumed yes behind a proxy, which we cannot probe)."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def prepare(hub_ids: list[str]) -> None:
    """Before anything is fetched for `hub_ids`: go offline if the hub cannot be reached."""
    if not hub_ids or offline() or reachable():
        return
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    log.warning("cannot reach %s: using only files already in the local hub cache for %s", constants.ENDPOINT,
                ", ".join(hub_ids))


def unavailable(name: str) -> str:
    """Why a hub id could not be loaded, and what to do, for the one-line error."""
    if offline():
        return (f"'{name}' is not in the local hub cache and the hub is unreachable (or HF_HUB_OFFLINE is set); "
                "connect to the network once to download it, or give a local folder")
    return f"'{name}' could not be fetched from the hub; check the id, and HF_TOKEN for gated repositories"
