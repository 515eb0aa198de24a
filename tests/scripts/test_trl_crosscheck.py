"""scripts/trl_crosscheck.py needs TRL, which is not a dependency: without it, one line naming the install, exit 1.
(The cross-check itself runs in its own venv; its figures are in docs/preference.md.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.runs import REPO


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="trl is installed here: the check would run")
def test_without_trl_it_says_how_to_install_it():
    done = subprocess.run([sys.executable, "scripts/trl_crosscheck.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "trl is not importable" in lines[0] and "pip install" in lines[0] and "trl" in lines[0]
