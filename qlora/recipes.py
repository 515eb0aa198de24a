"""The recipe catalog: what each recipe in recipes/ is for, read from its header, and `qlora recipes`' table.

Every recipe opens with a header of comment lines:

    # <one line: what it is for: model, task, data, notable settings>
    # task: instruction | chat | pretraining | preference | demo
    # memory: <peak GPU memory, or ?>
    # time: <time to run, or ?>

followed by any further comment lines, then the YAML. `memory` and `time` are written by a generator from
`qlora plan` (through `set_header_field`), which keeps every other byte of the file.
"""

from __future__ import annotations

import re
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from qlora.errors import QloraError

FIELDS = ("task", "memory", "time")
"""The header's `key: value` lines, in this order after the first line."""
TASKS = ("instruction", "chat", "pretraining", "preference", "demo")
"""What a recipe's `task:` may say."""
UNKNOWN = "?"

_FIELD_LINE = re.compile(r"^(?P<prefix>#[ \t]*(?P<key>[a-z_]+)[ \t]*:[ \t]*)(?P<value>.*?)[ \t]*$")
_COLUMNS = ("recipe", "task", "model", "memory", "time", "what")


class RecipeHeaderError(QloraError):
    """A recipe whose header is missing, incomplete or malformed."""


@dataclass(frozen=True)
class RecipeInfo:
    """One recipe as the catalog shows it."""

    name: str
    """The name `recipe=NAME` selects (the file's stem)."""
    path: Path
    what: str
    """The header's first line: what the recipe is for."""
    task: str
    """instruction, chat, pretraining or demo ('?' when the header lacks it)."""
    memory: str
    """Peak GPU memory as the header states it ('?' until measured or estimated)."""
    time: str
    """Run time as the header states it ('?' until measured or estimated)."""
    model: str
    """The base model: model.name_or_path, or the model option's name for a model built from a config."""


def read_header(path: Path) -> dict[str, str]:
    """The header of the recipe at `path`: {'what': ..., 'task': ..., 'memory': ..., 'time': ...}.

    Raises RecipeHeaderError naming the file and what is wrong: no first comment line, a field missing or out of
    order, or a task that is not one of TASKS.
    """
    lines = _header_lines(_read(path))
    problems = []
    what = lines[0].lstrip("#").strip() if lines else ""
    if not what or _field(lines[0]) is not None:
        problems.append("the first line must be a comment saying what the recipe is for")
    header = {"what": what}
    for number, expected in enumerate(FIELDS, start=2):
        line = lines[number - 1] if number <= len(lines) else ""
        field = _field(line)
        if field is None or field[0] != expected:
            problems.append(f"line {number} must be '# {expected}: ...' (got {line.strip() or 'nothing'!r})")
            break
        header[expected] = field[1]
    if "task" in header and header["task"] not in TASKS:
        problems.append(f"task '{header['task']}' is not one of {', '.join(TASKS)}")
    if problems:
        raise RecipeHeaderError(f"{path}: bad recipe header: {'; '.join(problems)}; a recipe starts with "
                                f"'# WHAT IT IS FOR', then '# task: {'|'.join(TASKS)}', '# memory: ...', '# time: ...'")
    return header


def catalog(strict: bool = False) -> list[RecipeInfo]:
    """Every recipe in recipes/, sorted by name.

    With strict=False a bad header shows as '?' in the fields it lacks (so `qlora recipes` always lists every
    recipe); with strict=True it raises RecipeHeaderError naming the file.
    """
    from qlora.composition import recipe_paths

    paths = recipe_paths()
    models = recipe_models(list(paths))
    infos = []
    for name, path in paths.items():
        try:
            header = read_header(path)
        except RecipeHeaderError:
            if strict:
                raise
            header = _lenient_header(path)
        infos.append(RecipeInfo(name=name, path=path, what=header.get("what") or UNKNOWN,
                                task=header.get("task") or UNKNOWN, memory=header.get("memory") or UNKNOWN,
                                time=header.get("time") or UNKNOWN, model=models.get(name, UNKNOWN)))
    return infos


def recipe_models(names: list[str]) -> dict[str, str]:
    """Recipe name -> its base model, from the composed config: model.name_or_path, or the model option's name
    where the model is built from a config (a path in the cache). Recipes that do not compose are left out."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qlora.composition import CONFIG_DIR, HYDRA_VERSION_BASE, register

    register()
    models = {}
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=HYDRA_VERSION_BASE, job_name="recipes"):
        for name in names:
            try:
                cfg = compose("config", overrides=[f"recipe={name}"], return_hydra_config=True)
                model = cfg.model
                if OmegaConf.is_missing(model, "name_or_path"):  # the user's own (recipe=custom)
                    models[name] = "model.name_or_path"
                    continue
                if model.get("scratch") is not None and model.name_or_path == model.scratch.path:
                    models[name] = cfg.hydra.runtime.choices.model
                else:
                    models[name] = str(model.name_or_path)
            except Exception:  # a broken recipe still gets its row; `qlora train recipe=NAME` says what is wrong
                continue
    return models


def table(infos: list[RecipeInfo], width: int | None = None) -> str:
    """An aligned plain-text table of the recipes: recipe, task, model, memory, time, what.

    Lines are cut to `width` characters; by default to the terminal's width when stdout is a terminal, and not at
    all otherwise (so a pipe or file gets every word).
    """
    if width is None and sys.stdout.isatty():
        width = shutil.get_terminal_size().columns
    rows = [list(_COLUMNS), *[[i.name, i.task, i.model, i.memory, i.time, i.what] for i in infos]]
    widths = [max(len(row[c]) for row in rows) for c in range(len(_COLUMNS) - 1)]
    lines = []
    for row in rows:
        line = "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
        if width is not None and len(line) > width:
            line = line[:max(width - 3, 0)].rstrip() + "..."
        lines.append(line)
    return "\n".join(lines)


def set_header_field(path: Path, key: str, value: str) -> None:
    """Set header field `key` (task, memory or time) of the recipe at `path` to `value`, in place.

    Only the value on that line changes: every other byte of the file (comments, YAML, line endings) is kept. The
    file is replaced atomically and keeps its permissions. Raises RecipeHeaderError if the header has no such line.
    """
    from qlora.files import write_text_atomic

    if key not in FIELDS:
        raise ValueError(f"unknown recipe header field '{key}'; choose one of: {', '.join(FIELDS)}")
    value = str(value).strip()
    if not value or "\n" in value or "\r" in value:
        raise ValueError(f"a recipe header value is one non-empty line (got {value!r})")
    if key == "task" and value not in TASKS:
        raise ValueError(f"task '{value}' is not one of {', '.join(TASKS)}")
    text = _read(path)
    lines = text.splitlines(keepends=True)
    for i, raw in enumerate(lines[1:len(FIELDS) + 1], start=1):
        body = raw.rstrip("\r\n")
        match = _FIELD_LINE.match(body)
        if match is not None and match["key"] == key:
            lines[i] = match["prefix"] + value + raw[len(body):]
            break
    else:
        raise RecipeHeaderError(f"{path}: no '# {key}: ...' line in the recipe header (lines 2-{len(FIELDS) + 1})")
    mode = stat.S_IMODE(path.stat().st_mode)
    write_text_atomic(path, "".join(lines))
    path.chmod(mode)


def _read(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as it is
        return f.read()


def _header_lines(text: str) -> list[str]:
    """The leading comment lines, without line endings."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def _field(line: str) -> tuple[str, str] | None:
    """(key, value) of a header field line such as '# task: chat'; None for any other line."""
    match = _FIELD_LINE.match(line)
    return (match["key"], match["value"]) if match is not None and match["key"] in FIELDS else None


def _lenient_header(path: Path) -> dict[str, str]:
    """What can be read of a bad header: the first comment line and any field lines among the comments."""
    lines = _header_lines(_read(path))
    header = {}
    if lines and _field(lines[0]) is None:
        header["what"] = lines[0].lstrip("#").strip()
    for field in filter(None, map(_field, lines)):
        header.setdefault(*field)
    if header.get("task") not in TASKS:
        header.pop("task", None)
    return header
