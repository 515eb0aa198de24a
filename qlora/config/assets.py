"""Where the YAML lives: the config groups (`configs/`) and the recipes (`recipes/`), and reading one option."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from qlora.config.schema import QuantConfig
from qlora.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _asset_dir(name: str) -> Path:
    # A wheel carries configs/ and recipes/ inside the package; a source checkout has them at the top.
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"qlora installation is incomplete: no {name}/ folder next to {_PACKAGE_DIR}")


CONFIG_DIR = _asset_dir("configs")
RECIPE_DIR = _asset_dir("recipes")


def recipe_paths() -> dict[str, Path]:
    """Recipe name -> YAML file, sorted by name."""
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def recipe_description(path: Path) -> str:
    """The recipe's first comment line: what it is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def group_options(group: str) -> list[str]:
    """The option names of a config group (configs/GROUP/*.yaml), sorted."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def quant_option(name: str) -> QuantConfig:
    """Option `name` of the quant config group (configs/quant/NAME.yaml), as `quant=NAME` selects it in training."""
    if name not in (options := group_options("quant")):
        raise ConfigError(f"quant={name} is not a quant option; choose one of: {', '.join(options)}")
    node = OmegaConf.merge(OmegaConf.structured(QuantConfig), OmegaConf.load(CONFIG_DIR / "quant" / f"{name}.yaml"))
    return OmegaConf.to_object(node)
