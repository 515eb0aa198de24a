"""Hydra wiring: where the config groups and recipes live, composing a run's config, one-line errors.

Recipes are Hydra's "experiment" pattern: each `recipes/NAME.yaml` is stored in the ConfigStore as option
NAME of the `recipe` group at the global package, so it can pick group options (`override /model: ...`)
and set any key. Command-line overrides still win over everything a recipe says.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from contextlib import contextmanager

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from qlora.config import Config, builds_scratch_model, renamed_key_message
from qlora.config.assets import CONFIG_DIR, RECIPE_DIR, recipe_description, recipe_paths
from qlora.errors import ConfigError, first_line

__all__ = ["CONFIG_DIR", "HYDRA_VERSION_BASE", "RECIPE_DIR", "compose_command", "compose_config", "recipe_description",
           "recipe_paths", "register", "to_config"]

HYDRA_VERSION_BASE = "1.3"


_registered: tuple | None = None
"""What `register` last stored: the ConfigStore it stored into and each recipe file's name, size and mtime."""


def register() -> None:
    """Store the schema and every recipe in Hydra's ConfigStore (idempotent). Building the schema's node and
    parsing the recipes costs about 0.4 s, so it is done again only when a recipe file changed."""
    global _registered
    store = ConfigStore.instance()
    paths = recipe_paths()
    key = (id(store), tuple((name, p.stat().st_size, p.stat().st_mtime_ns) for name, p in paths.items()))
    if key == _registered and "qlora_schema.yaml" in store.repo:
        return
    store.store(name="qlora_schema", node=Config)
    for name, path in paths.items():
        store.store(group="recipe", name=name, node=OmegaConf.load(path), package="_global_")
    _registered = key


def to_config(cfg: DictConfig) -> Config:
    """The composed DictConfig (without its `hydra` node) as the typed, resolved Config."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # every one at once (to_object stops at the first)
        raise ConfigError([f"{key}: value is required but not set; give it on the command line ({key}=...)"
                           for key in missing])
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain_omegaconf(e)) from e
    assert isinstance(config, Config)
    return config


@contextmanager
def _hydra_context() -> Iterator[None]:
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=HYDRA_VERSION_BASE, job_name="train"):
        yield


DEMO_RECIPE = "default"
"""What `qlora train` runs with no recipe given and the demo's model: the offline demo."""
OWN_MODEL_RECIPE = "custom"
"""What it runs with no recipe given and a model of the user's own: real-model settings, data.path required."""


def compose_config(overrides: list[str]) -> Config:
    """Compose the typed run config as `qlora train` would, without running anything (with no recipe given, the
    one `choose_recipe` picks).

    Raises ConfigError with a one-line explanation for unknown keys, wrong types and unknown group options.
    """
    with _hydra_context():
        if any(o.key_or_group == "recipe" for o in parse_overrides(overrides)):
            return _compose(overrides)
        config = _compose(overrides)  # the demo's recipe unless the model is the user's own
        return config if builds_scratch_model(config.model) else _compose([*overrides, f"recipe={OWN_MODEL_RECIPE}"])


def choose_recipe(overrides: list[str]) -> str | None:
    """The recipe to add when the overrides name none: OWN_MODEL_RECIPE when the model they compose to is not one
    built from a config (the demo's), so a user's own model never trains with the demo's settings; None otherwise
    (a recipe is named, or the demo runs)."""
    with _hydra_context():
        return _choose_recipe(overrides)


def _choose_recipe(overrides: list[str]) -> str | None:
    if any(o.key_or_group == "recipe" for o in parse_overrides(overrides)):
        return None
    return None if builds_scratch_model(_compose(overrides).model) else OWN_MODEL_RECIPE


def _compose(overrides: list[str]) -> Config:
    try:
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as e:
        raise ConfigError(explain(e)) from e
    except AssertionError as e:  # OmegaConf's assertion when an override sets a key below a null node
        raise ConfigError(_below_null(overrides) or str(e)) from e
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} in output_dir
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return to_config(cfg)


def compose_command(schema: type, args: list[str], defaults: dict | None = None):
    """A command's typed options (`qlora export`, `generate`, `eval`) from `key=value` arguments.

    Values are taken as written (after the first '='), so free text such as a prompt needs no quoting beyond the
    shell's; the schema converts numbers, booleans and choices and rejects unknown keys. `defaults` replace the
    schema's own defaults (a run's data settings, say) before the arguments are applied.
    """
    check_keys(schema, args)
    cfg = OmegaConf.structured(schema)
    if defaults:
        cfg = OmegaConf.merge(cfg, defaults)
    for arg in args:
        key, _, value = arg.partition("=")
        try:
            OmegaConf.update(cfg, key, None if value == "null" else value, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(_explain_omegaconf(e, schema)) from e
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain_omegaconf(e, schema)) from e


def check_keys(schema: type, args: list[str]) -> None:
    """Refuse an argument that is not `key=value` with a key of `schema`, naming the keys there are."""
    for arg in args:
        key, sep, _ = arg.partition("=")
        parent, _, name = key.rpartition(".")
        if sep and name in schema_keys(parent, schema):
            continue
        while parent and not schema_keys(parent, schema):  # below a key that holds no keys
            parent = parent.rpartition(".")[0]
        allowed = schema_keys(parent, schema)
        where = f"'{parent}'" if parent else "the top level"
        hint = f"keys in {where}: {', '.join(allowed)}" if allowed else "this command takes no keys"
        if sep and (renamed := renamed_key_message(key)):
            raise ConfigError(renamed)
        raise ConfigError(f"unknown config key '{key}'; {hint}" if sep and key
                          else f"'{arg}': expected key=value ({hint})")


def parse_overrides(overrides: list[str]) -> list:
    """Hydra's parse of the overrides; adding keys (`+key=...`) is refused, the schema is fixed."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise ConfigError(explain(e)) from e
    for o in parsed:
        if (o.is_add() or o.is_force_add()) and not o.key_or_group.startswith("hydra"):
            raise ConfigError(f"'{o.input_line}': the config schema is fixed and '+' cannot add keys; "
                              f"set an existing key ({o.key_or_group}=...) instead")
    return parsed


def expand_sweeps(parsed: list) -> list[list[str]]:
    """Override lists that together cover every value of every sweep (`key=a,b,c`) at least once.

    `parsed` is what `parse_overrides` returns.
    """
    sweeps = {i: list(o.sweep_string_iterator()) for i, o in enumerate(parsed) if o.is_sweep_override()}
    base = [f"{o.get_key_element()}={sweeps[i][0]}" if i in sweeps else o.input_line for i, o in enumerate(parsed)]
    runs = [base]
    for i, values in sweeps.items():
        for value in values[1:]:
            runs.append([*base[:i], f"{parsed[i].get_key_element()}={value}", *base[i + 1:]])
    return runs


def _below_null(overrides: list[str]) -> str | None:
    """Which override sets a key whose parent node is null in this composition (model.scratch.* for a model that is
    not built from a config), as a one-line message; None if none does."""
    nested = [o for o in parse_overrides(overrides) if o.key_or_group.count(".") >= 2]
    try:
        cfg = compose("config", overrides=[o.input_line for o in parse_overrides(overrides) if o not in nested])
    except Exception:  # noqa: BLE001 (the caller reports the original error)
        return None
    for o in nested:
        parent = o.key_or_group.rpartition(".")[0]
        if OmegaConf.select(cfg, parent) is None:
            return (f"'{o.input_line}': {parent} is null in this config, so it has no keys to set "
                    f"(model.scratch applies to models built from a config); drop the override")
    return None


def explain(e: Exception) -> str:
    """A one-line cause-and-fix message for a Hydra/OmegaConf composition error."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"unknown {group} '{option}'; choose one of: {', '.join(sorted(e.options))}"
    cause = e
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        return _explain_omegaconf(cause)
    return first_line(e)


def _explain_omegaconf(e: OmegaConfBaseException, schema: type = Config) -> str:
    key = getattr(e, "full_key", None) or ""
    message = first_line(getattr(e, "msg", None) or e)
    if message.startswith("Key '") and " not in " in message:
        if renamed := renamed_key_message(key):
            return renamed
        parent, _, name = key.rpartition(".")
        allowed = schema_keys(parent, schema)
        where = f"'{parent}'" if parent else "the top level"
        hint = f"; keys in {where}: {', '.join(allowed)}" if allowed else ""
        return f"unknown config key '{key}'{hint}"
    if "MissingMandatoryValue" in type(e).__name__ or message.startswith("Missing mandatory value"):
        return f"{key or message}: value is required but not set; give it on the command line ({key}=...)"
    return f"{key}: {message}" if key else message


def schema_keys(dotted: str, schema: type = Config) -> list[str]:
    """Field names of the schema node at a dotted path ('' for the top level); [] if not a node."""
    node: typing.Any = schema
    for part in [p for p in dotted.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return []
        hints = typing.get_type_hints(node)
        node = next((a for a in typing.get_args(hints[part]) if dataclasses.is_dataclass(a)), hints[part])
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
