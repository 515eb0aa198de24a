"""One grammar for every command: `key=value` typed by the command's schema, `--help` generated from it, the same
one-line error for a bad key, and the earlier spellings still accepted for one release."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from qlora import cli
from qlora.config.fields import fields

COMMANDS = sorted(cli.COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_key_of_the_command_with_its_docstring(name, capsys):
    command = cli.COMMANDS[name]
    assert cli.main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {command.usage}\n")
    for f in fields(command.schema()):
        assert f"  {f.key}" in out
        assert " ".join(f.doc.split()[:6]) in " ".join(out.split())


@pytest.mark.parametrize("name", [*COMMANDS, "train"])
def test_an_unknown_key_is_one_line_naming_it_with_exit_2(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*name.split(), "nosuchkey=1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("qlora: config error: unknown config key 'nosuchkey'")
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_a_bad_value_names_the_key_and_the_choices(capsys):
    assert cli.main(["plan", "device=gpu"]) == 2
    assert capsys.readouterr().err == "qlora: config error: device: Invalid value 'gpu', expected one of [cuda, cpu]\n"
    assert cli.main(["export", "export.foo=1", "run_dir=a", "output_dir=b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora: config error: unknown config key 'export.foo'; keys in 'export': format, merge,")
    assert cli.main(["recipes", "extra"]) == 2
    assert capsys.readouterr().err == "qlora: config error: 'extra': expected key=value (this command takes no keys)\n"


def test_old_spellings_work_with_a_deprecation_line(tmp_path, capsys):
    old = cli.main(["report", str(tmp_path / "missing")])
    old_err = capsys.readouterr().err.splitlines()
    new = cli.main(["report", f"run_dir={tmp_path / 'missing'}"])
    new_err = capsys.readouterr().err.splitlines()
    assert old == new == 2
    assert old_err == [f"qlora: deprecated: a bare run_dir ({tmp_path / 'missing'}) still works in this release only; "
                       f"write run_dir={tmp_path / 'missing'}", *new_err]
    assert cli.main(["plan", "--device"]) == 2
    assert capsys.readouterr().err == "qlora: config error: --device needs a value; write device=VALUE\n"


def test_plan_with_the_old_device_flag_plans_as_the_new_key_does(tmp_path, capsys):
    settings = [f"cache_dir={tmp_path}", f"model.scratch.path={tmp_path}/m", "train.check_memory=false"]
    assert cli.main(["plan", "--device", "cuda", "train.memory_limit_gb=24", *settings]) == 0
    old = capsys.readouterr()
    assert cli.main(["plan", "device=cuda", "train.memory_limit_gb=24", *settings]) == 0
    new = capsys.readouterr()
    assert old.err == "qlora: deprecated: --device cuda still works in this release only; write device=cuda\n"
    assert old.out == new.out and "cuda" in new.out.splitlines()[0]


def test_every_schema_field_of_a_command_has_a_docstring():
    for command in cli.COMMANDS.values():
        schema = command.schema()
        undocumented = [f.key for f in fields(schema) if not f.doc]
        assert undocumented == [], f"{schema.__name__}: {undocumented}"
        assert dataclasses.is_dataclass(schema)


def test_no_module_imports_another_that_imports_it_back():
    """The package's import graph (every import, top-level or inside a function) has no cycle."""
    import ast

    root = Path(__file__).resolve().parents[1] / "qlora"
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora"):
                imported |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                             for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("qlora")}
        graph[name] = {m for m in imported if m in modules and m != name}

    def cycle_from(start, path):
        for nxt in graph[path[-1]]:
            if nxt == start:
                return [*path, start]
            if nxt not in path and nxt > start and (found := cycle_from(start, [*path, nxt])):
                return found
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m, [m]))]
    assert cycles == []


@pytest.mark.slow
def test_each_module_imports_alone_in_a_fresh_interpreter():
    import subprocess

    root = Path(__file__).resolve().parents[1]
    names = sorted(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                   for p in (root / "qlora").rglob("*.py") if p.name != "__main__.py")  # that one runs the CLI
    failed = {}
    for name in names:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=root, capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            failed[name] = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
    assert failed == {}
