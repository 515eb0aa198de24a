"""Every recipe and group option composes and validates; bad input fails at composition with one line."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

import qlora
from qlora.composition import (
    compose_config,
    expand_sweeps,
    parse_overrides,
    recipe_description,
    recipe_paths,
)
from qlora.config import ArchitectureConfig, Config, OptimizerName, QuantMethod, builds_scratch_model, validate
from qlora.config.assets import group_options
from qlora.errors import ConfigError
from tests.runs import REPO, qlora_cli

GROUPS = ["model", "quant", "lora", "data", "optim", "train", "dist"]


def options(group: str) -> list[str]:
    return group_options(group)


def _stand_in(tmp_path: Path, name: str = "data.json") -> Path:
    stand_in = tmp_path / name
    stand_in.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    return stand_in


@pytest.mark.parametrize("recipe", sorted(recipe_paths()))
def test_every_recipe_composes(recipe, tmp_path):
    overrides = [f"recipe={recipe}", f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}"]
    if recipe == "custom":  # for the user's own model and data, which it requires
        with pytest.raises(ConfigError) as e:
            compose_config(overrides)
        assert [p.split(":")[0] for p in e.value.problems] == ["data.path", "model.name_or_path"]
        overrides += ["model.name_or_path=someone/their-model", f"data.path={_stand_in(tmp_path)}"]
    config = compose_config(overrides)
    folder = Path(config.model.name_or_path)
    # A real model's folder in the cache (smollm2-alpaca): its config stands in for it; the demo's is built at run time.
    if not builds_scratch_model(config.model) and folder.is_relative_to(tmp_path) and not folder.exists():
        from transformers import AutoConfig

        AutoConfig.for_model(**config.model.architecture.given()).save_pretrained(folder)
    if config.data.path.startswith("../shared/") and not Path(config.data.path).is_file():
        # The team's shared data is not beside this checkout: validate the rest against a stand-in file.
        config = compose_config([*overrides, f"data.path={_stand_in(tmp_path, Path(config.data.path).name)}"])
    data = Path(config.data.path)
    if data.is_relative_to(tmp_path) and not data.exists() and not config.data.generate_demo:
        # Pairs generated from the shared data by a script (smollm2-dpo-cpu): its header says how; stand in for them.
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    assert isinstance(config, Config)
    assert isinstance(config.quant.method, QuantMethod)
    assert recipe_description(recipe_paths()[recipe]), f"recipes/{recipe}.yaml needs a '# description' first line"
    # Hub-model recipes validate without the network: nothing is loaded at this point.
    validate(config)
    if not builds_scratch_model(config.model) and recipe != "custom":  # `qlora plan` sizes a hub model from these
        assert set(config.model.architecture.given()) == {f.name for f in dataclasses.fields(ArchitectureConfig)}


# A compose is about 0.7 s of CPU. In the slow tier: the model options (each hub one is composed by its recipe above)
# and the quant and optim ones (composed, and checked for their meaning, by the two tests below).
@pytest.mark.parametrize("group,option", [pytest.param(g, o, marks=pytest.mark.slow)
                                          if g in ("model", "quant", "optim") else (g, o)
                                          for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}", f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}"]
    if option == "custom" or (group == "model" and not option.startswith("tiny")):  # recipe=custom: own data
        overrides.append(f"data.path={_stand_in(tmp_path)}")
    if (group, option) == ("model", "custom"):
        overrides.append("model.name_or_path=someone/their-model")
    config = compose_config(overrides)
    assert isinstance(config, Config)


@pytest.mark.parametrize("option,method,dq", [("nf4", "nf4", False), ("nf4-dq", "nf4", True), ("fp4", "fp4", False),
                                              ("fp4-dq", "fp4", True), ("int8", "int8", False),
                                              ("none", "none", False)])
def test_quant_options_mean_what_they_say(option, method, dq, tmp_path):
    config = compose_config([f"quant={option}", f"output_dir={tmp_path}"])
    assert (config.quant.method.value, config.quant.double_quant) == (method, dq)


@pytest.mark.parametrize("option", [o.value for o in OptimizerName])
def test_optim_options_match_the_contract(option, tmp_path):
    assert options("optim") == sorted(o.value for o in OptimizerName)
    config = compose_config([f"optim={option}", f"output_dir={tmp_path}"])
    assert config.optim.name.value == option


def test_defaults_follow_the_contract(tmp_path):
    config = compose_config([f"output_dir={tmp_path}"])
    assert config.quant.method == QuantMethod.nf4 and config.quant.double_quant
    assert config.optim.name == OptimizerName.paged_adamw_8bit
    assert config.optim.max_grad_norm == 0.3
    assert config.lora.target_modules == ["all-linear"]


def test_command_line_beats_recipe(tmp_path):
    overrides = ["lora.r=7", "optim.lr=1e-4", "train.max_steps=3", "quant=fp4", f"output_dir={tmp_path}"]
    config = compose_config(overrides)
    assert (config.lora.r, config.optim.lr, config.train.max_steps, config.quant.method.value) == (7, 1e-4, 3, "fp4")


@pytest.mark.parametrize("override,expected", [
    ("lora.rr=3", "unknown config key 'lora.rr'; keys in 'lora': r, alpha, dropout"),
    ("quant=nf5", "unknown quant 'nf5'; choose one of: fp4, fp4-dq, int8, nf4, nf4-dq, none"),
    ("recipe=nope", "unknown recipe 'nope'; choose one of: custom, default"),
    ("lora.r=abc", "lora.r: Value 'abc' of type 'str' could not be converted to Integer"),
    ("optim.name=sgd", "optim.name: Invalid value 'sgd', expected one of [paged_adamw_8bit"),
    ("bogus=1", "unknown config key 'bogus'; keys in the top level: model, quant"),
    ("train.eval_max_batches=4", "'train.eval_max_batches' was renamed 'train.eval_max_sequences' in qlora 0.2.0 "
                                 "(it counts sequences, not batches; CHANGELOG.md lists every renamed key); write "
                                 "train.eval_max_sequences=..."),
])
def test_bad_overrides_name_the_key_and_the_choices(override, expected, tmp_path):
    with pytest.raises(ConfigError) as e:
        compose_config([override, f"output_dir={tmp_path}"])
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(expected), e.value.problems[0]


def test_validation_reports_every_problem_at_once(tmp_path):
    config = compose_config(["lora.r=0", "optim.lr=-1", "train.seq_len=0", "quant=int8", "quant.double_quant=true",
                             "train.gradient_checkpointing=sometimes", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        validate(config)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 5, text
    for key in ("lora.r", "optim.lr", "train.seq_len", "quant.double_quant"):
        assert key in text
    assert "train.gradient_checkpointing must be auto, true or false (got sometimes)" in text


def test_loggers_and_chat_templates_are_checked_in_the_same_round(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` finds when it is not installed
    config = compose_config(["lora.r=0", "train.loggers=[wandb]", "data.chat_template=nonsense",
                             f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert [p.split(" ")[0] for p in e.value.problems] == ["lora.r", "data.chat_template=nonsense", "train.loggers"]


def test_command_checks_report_every_problem_at_once(tmp_path):
    from qlora.composition import compose_command
    from qlora.config import (
        EvalCommand,
        ExportCommand,
        GenerateCommand,
        validate_eval,
        validate_export,
        validate_generate,
    )

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    export = compose_command(ExportCommand, [f"run_dir={tmp_path}/run", f"output_dir={tmp_path}/taken",
                                             "export.dtype=auto", "export.max_shard_size=big"])
    generate = compose_command(GenerateCommand, ["prompt=hi", "temperature=-1", "top_p=0"])
    evaluate = compose_command(EvalCommand, ["model=m", "base=true", "quant=nf3", "batch_size=0",
                                             f"data.path={tmp_path}/d.json", "data.chat_template=nonsense"])
    problems = {}
    for check, cmd in [(validate_export, export), (validate_generate, generate), (validate_eval, evaluate)]:
        with pytest.raises(ConfigError) as e:
            check(cmd)
        problems[check.__name__] = [p.split(" ")[0] for p in e.value.problems]
    assert problems == {
        "validate_export": ["export.dtype", "export.max_shard_size='big'", "output_dir"],
        "validate_generate": ["give", "temperature", "top_p"],
        "validate_eval": ["base=true", "batch_size", "quant=nf3", "data.chat_template=nonsense", "data.path:"],
    }


def test_the_built_in_chat_templates_are_the_ones_the_config_names():
    from qlora.config import CHAT_TEMPLATE_NAMES
    from qlora.data.formats import CHAT_TEMPLATES

    assert tuple(CHAT_TEMPLATES) == CHAT_TEMPLATE_NAMES


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_gradient_checkpointing_takes_auto_true_or_false(value, expected, tmp_path):
    config = compose_config([f"train.gradient_checkpointing={value}", f"output_dir={tmp_path}"])
    validate(config)
    assert config.train.gradient_checkpointing == expected


def test_missing_local_paths_fail_validation(tmp_path):
    config = compose_config([f"model.name_or_path={tmp_path}/nope", f"data.path={tmp_path}/x.jsonl",
                                "data.generate_demo=false", f"output_dir={tmp_path}/out"])
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert [p.split(":")[0] for p in e.value.problems] == ["model.name_or_path", "data.path"]


def test_sweep_expansion_covers_every_value():
    runs = expand_sweeps(parse_overrides(["lora.r=8,16,32", "optim.lr=1e-4", "seed=1,2"]))
    values = {tuple(r) for r in runs}
    assert len(runs) == 4
    for v in ("lora.r=8", "lora.r=16", "lora.r=32", "seed=1", "seed=2"):
        assert any(v in r for r in values)
    assert all("optim.lr=1e-4" in r for r in values)


# One `python -m qlora` each (seconds of imports): the fast tier keeps a composition error and a bad command.
@pytest.mark.parametrize("args,expected", [
    (["train", "lora.rr=3"], "qlora: config error: unknown config key 'lora.rr'"),
    pytest.param(["train", "quant=nf5"], "qlora: config error: unknown quant 'nf5'", marks=pytest.mark.slow),
    pytest.param(["train", "+foo=1"], "qlora: config error: '+foo=1': the config schema is fixed",
                 marks=pytest.mark.slow),
    pytest.param(["train", "-m", "lora.r=8,abc"], "qlora: config error: lora.r: Value 'abc'", marks=pytest.mark.slow),
    pytest.param(["train", "lora.r=-1"], "qlora: config error: lora.r must be > 0 (got -1)", marks=pytest.mark.slow),
    (["frobnicate"], "qlora: unknown command 'frobnicate'"),
])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(args, expected, tmp_path):
    result = qlora_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(expected), result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_refuses_to_touch_a_previous_run(tmp_path):
    run = tmp_path / "runs" / "a"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"precious")
    (run / "summary.json").write_text("{}")
    result = qlora_cli("train", f"output_dir={run}", cwd=tmp_path)
    assert result.returncode == 2
    assert "already holds a finished run" in result.stderr and "overwrite=true" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "summary.json"]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == b"precious"


@pytest.mark.slow
def test_cfg_job_prints_the_config_and_loads_nothing(tmp_path):
    result = qlora_cli("train", "--cfg", "job", "lora.r=32", f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}/c",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "  r: 32" in result.stdout and "method: nf4" in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_recipes_lists_each_with_its_description(tmp_path):
    result = qlora_cli("recipes", cwd=tmp_path)
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()[1:]  # after the column names
    assert [line.split()[0] for line in lines] == sorted(recipe_paths())
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


@pytest.mark.slow
def test_help_works_without_loading_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys, qlora.cli; qlora.cli.main(['--help']); qlora.cli.main(['recipes']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().endswith("False"), out.stdout + out.stderr


def test_config_reference_is_current():
    import subprocess
    import sys

    root = REPO
    check = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"], cwd=root, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("overrides,expected", [
    (["lora.init=pissa"], "lora.init=pissa: peft's PiSSA moves the base weight's principal components"),
    (["lora.init=olora"], "lora.init=olora: peft's OLoRA subtracts Q R from the base weight and re-quantizes it"),
    (["lora.init=eva"], "lora.init=eva: EVA sets A from an SVD of each layer's activations"),
    (["lora.init=loftq", "quant=none"], "lora.init=loftq corrects a 4-bit base's quantization error, and "
                                        "quant.method=none has none to correct; use quant=nf4"),
    (["lora.init=loftq", "quant=int8", "quant.double_quant=false"], "lora.init=loftq corrects a 4-bit base's"),
    (["lora.init=loftq", "lora.dora=true"], "lora.init=loftq with lora.dora=true: DoRA's magnitudes"),
    (["lora.init=loftq", "lora.loftq_iters=3"], "lora.loftq_iters=3: only 1;"),
    (["optim.lora_plus_ratio=0"], "optim.lora_plus_ratio must be > 0 (got 0.0); 16 is the paper's, null turns"),
    (["train.neftune_alpha=-5"], "train.neftune_alpha must be > 0 (got -5.0); 5 is common, null turns NEFTune off"),
])
def test_quality_options_are_refused_in_one_line_each(overrides, expected, tmp_path):
    config = compose_config([*overrides, f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert len(e.value.problems) == 1, e.value.problems
    assert e.value.problems[0].startswith(expected), e.value.problems[0]
    assert "\n" not in e.value.problems[0]


def test_quality_options_compose_and_validate(tmp_path):
    config = compose_config(["lora.init=loftq", "optim.lora_plus_ratio=16", "train.neftune_alpha=5",
                             f"output_dir={tmp_path}"])
    validate(config)
    assert (config.lora.init.value, config.optim.lora_plus_ratio, config.train.neftune_alpha) == ("loftq", 16, 5)
    with pytest.raises(ConfigError, match="lora.init: Invalid value 'lofq', expected one of \\[default, gaussian, "
                                          "loftq"):
        compose_config(["lora.init=lofq", f"output_dir={tmp_path}"])


def test_every_renamed_key_is_in_the_changelog_under_its_release_and_refused_by_every_command():
    from qlora.composition import check_keys, schema_keys
    from qlora.config import RENAMED_KEYS, PlanCommand

    changelog = (REPO / "CHANGELOG.md").read_text()
    releases = dict(re.findall(r"^## \[([\d.]+)\][^\n]*\n(.*?)(?=^## |\Z)", changelog, flags=re.M | re.S))
    assert qlora.__version__ in releases, f"CHANGELOG.md has no section for qlora {qlora.__version__}"
    for old, (new, version, _) in RENAMED_KEYS.items():
        assert f"`{old}` -> `{new}`" in releases[version].partition("### Renamed")[2].partition("###")[0], old
        assert old not in {f"{p}.{k}" for p in ("train",) for k in schema_keys(p)}
        with pytest.raises(ConfigError, match=rf"^config error: '{re.escape(old)}' was renamed '{re.escape(new)}'"):
            check_keys(PlanCommand, [f"{old}=1"])
