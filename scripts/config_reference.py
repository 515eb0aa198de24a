"""Write docs/config.md from the config schema (qlora/config.py): every key, its type, default and meaning.

    python scripts/config_reference.py          # rewrite docs/config.md
    python scripts/config_reference.py --check  # exit 1 if docs/config.md is stale (the tests run this)
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import typing
from enum import Enum
from pathlib import Path

from qlora import config as schema

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "config.md"


def field_docs(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the docstring written under the field."""
    docs = {}
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for stmt, nxt in zip(cls.body, cls.body[1:] + [None], strict=True):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[(cls.name, stmt.target.id)] = " ".join(nxt.value.value.split())
    return docs


def show(value) -> str:
    if isinstance(value, Enum):
        return value.value
    if value is None:
        return "null"
    if value == "???":
        return "(required)"
    return str(value).replace("'", "")


def rows(cls, prefix: str, docs, annotations) -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        nested = next((a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)),
                      None)
        if nested is not None and cls in (schema.Config, schema.ExportCommand, schema.EvalCommand):
            continue  # a config group: documented in its own section
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text = docs.get((cls.__name__, f.name), "")
        if nested is not None:
            text += f" Fields: `{key}.*` below."
        kind = annotations[cls.__name__][f.name].replace("|", "\\|")
        out.append(f"| `{key}` | `{kind}` | `{show(default)}` | {text} |")
        if nested is not None:
            out += rows(nested, f"{key}.", docs, annotations)
    return out


def render() -> str:
    source = Path(schema.__file__).read_text()
    docs = field_docs(source)
    annotations = {c.name: {s.target.id: ast.unparse(s.annotation) for s in c.body if isinstance(s, ast.AnnAssign)}
                   for c in ast.parse(source).body if isinstance(c, ast.ClassDef)}
    enums = {c.__name__: [m.value for m in c] for c in vars(schema).values()
             if isinstance(c, type) and issubclass(c, Enum) and c.__module__ == schema.__name__}
    lines = ["# Config reference", "",
             "Generated from `qlora/config.py` by `python scripts/config_reference.py`; do not edit by hand.",
             "Schema defaults are shown; group options in `configs/GROUP/` and recipes in `recipes/` change some",
             "of them (`qlora train --cfg job recipe=NAME` prints what a run will use).", "",
             "Closed choices: " + "; ".join(f"`{k}`: {', '.join(v)}" for k, v in enums.items()) + ".", ""]
    header = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += ["## Top level", "", *header, *rows(schema.Config, "", docs, annotations), ""]
    for group, cls in [("model", schema.ModelConfig), ("quant", schema.QuantConfig), ("lora", schema.LoraConfig),
                       ("data", schema.DataConfig), ("optim", schema.OptimConfig), ("train", schema.TrainConfig),
                       ("dist", schema.DistConfig)]:
        options = sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))
        lines += [f"## `{group}` (options: {', '.join(options)})", "", *header, *rows(cls, f"{group}.", docs,
                                                                                       annotations), ""]
    lines += ["## `qlora export`", "",
              "`qlora export run_dir=RUN output_dir=DIR [KEY=VALUE ...]` (see docs/export.md).", "", *header,
              *rows(schema.ExportCommand, "", docs, annotations),
              *rows(schema.ExportConfig, "export.", docs, annotations), "",
              "## `qlora generate`", "", "`qlora generate run_dir=RUN|model=EXPORT prompt=TEXT [KEY=VALUE ...]`.", "",
              *header, *rows(schema.GenerateCommand, "", docs, annotations), "",
              "## `qlora eval`", "", "`qlora eval run_dir=RUN|model=MODEL [data.KEY=VALUE ...] [KEY=VALUE ...]` "
              "(see docs/fidelity.md). `data.*` takes the keys of the `data` group above; with run_dir they start "
              "as the run's.", "", *header, *rows(schema.EvalCommand, "", docs, annotations), ""]
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
