"""Write docs/config.md from the config schema (qlora/config/): every key, its type, default and meaning.

    python scripts/config_reference.py          # rewrite docs/config.md
    python scripts/config_reference.py --check  # exit 1 if docs/config.md is stale (the tests run this)
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

from qlora import config as schema
from qlora.config import commands
from qlora.config import schema as training
from qlora.config.assets import group_options
from qlora.config.fields import fields, show

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "config.md"

SECTIONED = (schema.Config, schema.ExportCommand, schema.EvalCommand)
"""Schemas whose group fields are documented in sections of their own."""


def rows(cls, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls, prefix, nested=False):
        if f.group is not None and cls in SECTIONED:
            continue
        text = f.doc + (f" Fields: `{f.key}.*` below." if f.group is not None else "")
        kind = f.annotation.replace("|", "\\|")
        out.append(f"| `{f.key}` | `{kind}` | `{show(f.default)}` | {text.strip()} |")
        if f.group is not None:
            out += rows(f.group, f"{f.key}.")
    return out


def render() -> str:
    enums = {c.__name__: [m.value for m in c] for module in (training, commands) for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, Enum) and c.__module__ == module.__name__}
    lines = ["# Config reference", "",
             "Generated from the schema in `qlora/config/` by `python scripts/config_reference.py`; do not edit by "
             "hand.",
             "Schema defaults are shown; group options in `configs/GROUP/` and recipes in `recipes/` change some",
             "of them (`qlora train --cfg job recipe=NAME` prints what a run will use). `qlora COMMAND --help`",
             "prints the same keys for one command.", "",
             "Closed choices: " + "; ".join(f"`{k}`: {', '.join(v)}" for k, v in enums.items()) + ".", ""]
    header = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += ["## Top level", "", *header, *rows(schema.Config), ""]
    for group, cls in [("model", schema.ModelConfig), ("quant", schema.QuantConfig), ("lora", schema.LoraConfig),
                       ("data", schema.DataConfig), ("optim", schema.OptimConfig), ("train", schema.TrainConfig),
                       ("dist", schema.DistConfig)]:
        lines += [f"## `{group}` (options: {', '.join(group_options(group))})", "", *header,
                  *rows(cls, f"{group}."), ""]
    lines += ["## `qlora export`", "",
              "`qlora export run_dir=RUN output_dir=DIR [KEY=VALUE ...]` (see docs/export.md).", "", *header,
              *rows(schema.ExportCommand), *rows(schema.ExportConfig, "export."), "",
              "## `qlora generate`", "", "`qlora generate run_dir=RUN|model=EXPORT prompt=TEXT [KEY=VALUE ...]`.", "",
              *header, *rows(schema.GenerateCommand), "",
              "## `qlora eval`", "", "`qlora eval run_dir=RUN|model=MODEL [data.KEY=VALUE ...] [KEY=VALUE ...]` "
              "(see docs/fidelity.md). `data.*` takes the keys of the `data` group above; with run_dir they start "
              "as the run's.", "", *header, *rows(schema.EvalCommand), "",
              "## `qlora plan`", "", "`qlora plan [device=cuda|cpu] [training overrides]` (see docs/plan.md).", "",
              *header, *rows(schema.PlanCommand), "",
              "## `qlora data preview`", "", "`qlora data preview [samples=N] [training overrides]`.", "",
              *header, *rows(schema.PreviewCommand), "",
              "## `qlora report`", "", "`qlora report run_dir=RUN`.", "", *header, *rows(schema.ReportCommand), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python scripts/config_reference.py", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
