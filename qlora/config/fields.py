"""The schema's fields as documentation: each key's type, default and the docstring written under it.

One reading of the dataclasses serves `qlora COMMAND --help` and docs/config.md (scripts/config_reference.py).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import textwrap
import typing
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class Field:
    key: str
    """Dotted key, as written on the command line (export.dtype)."""
    annotation: str
    """The type as written in the schema (str | None)."""
    default: object
    doc: str
    """The docstring under the field, on one line ('' if none)."""
    group: type | None
    """The dataclass a field holds (a node with keys of its own), else None."""


def fields(schema: type, prefix: str = "", nested: bool = True) -> list[Field]:
    """The schema's fields in order; with `nested`, each group field is followed by its own fields."""
    out = []
    docs, annotations = _source_facts(schema)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        group = next((a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)),
                     None)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(Field(f"{prefix}{f.name}", annotations[f.name], default, docs.get(f.name, ""), group))
        if group is not None and nested:
            out += fields(group, f"{prefix}{f.name}.", nested)
    return out


def show(value) -> str:
    """A default as a user writes it on the command line."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if value == "???":
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(group)"
    return str(value).replace("'", "")


def choices(schema: type, name: str) -> list[str] | None:
    """The values an enum-typed field accepts, else None."""
    hint = typing.get_type_hints(schema)[name]
    enum = next((a for a in (hint, *typing.get_args(hint)) if isinstance(a, type) and issubclass(a, Enum)), None)
    return [m.value for m in enum] if enum else None


def help_text(schema: type, usage: str, note: str = "") -> str:
    """`qlora COMMAND --help`: the usage line, what the command does, and every key with its docstring."""
    lines = [f"usage: {usage}", "", *textwrap.wrap(" ".join((schema.__doc__ or "").split()), 110)]
    if note:
        lines += ["", *textwrap.wrap(note, 110)]
    keys = fields(schema)
    if keys:
        lines += ["", "keys (key=value; null for none):"]
    owners = _owners(schema)
    for f in keys:
        if f.group is not None:
            lines.append(f"  {f.key}.*  {f.doc}".rstrip())
            continue
        allowed = choices(owners[f.key], f.key.rpartition(".")[2])
        kind = "|".join(allowed) if allowed else f.annotation.removesuffix(" | None")
        lines.append(f"  {f.key}={kind}  (default {show(f.default)})")
        lines += textwrap.wrap(f.doc, 110, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines) + "\n"


def _owners(schema: type, prefix: str = "") -> dict[str, type]:
    """Dotted key -> the dataclass that declares it."""
    out = {}
    for f in fields(schema, prefix, nested=False):
        out[f.key] = schema
        if f.group is not None:
            out.update(_owners(f.group, f"{f.key}."))
    return out


def _source_facts(schema: type) -> tuple[dict[str, str], dict[str, str]]:
    """(field -> docstring, field -> annotation as written) for a dataclass, read from its module's source."""
    return _module_facts(schema.__module__)[schema.__name__]


@functools.cache
def _module_facts(module: str) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    facts = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        docs, annotations = {}, {}
        for stmt, nxt in zip(cls.body, [*cls.body[1:], None], strict=True):
            if not isinstance(stmt, ast.AnnAssign):
                continue
            annotations[stmt.target.id] = ast.unparse(stmt.annotation)
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
        facts[cls.name] = (docs, annotations)
    return facts
