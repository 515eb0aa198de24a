"""The recipe catalog: every recipe's header, every hub model's shapes against its published size, `qlora recipes`.

That every recipe composes and validates is tests/config/test_config.py's test_every_recipe_composes.
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qlora import recipes
from qlora.cli import main
from qlora.composition import CONFIG_DIR, compose_config, recipe_paths
from qlora.config import ArchitectureConfig
from qlora.recipes import FIELDS, TASKS, RecipeHeaderError, catalog, read_header, set_header_field, table

# Total parameters in billions (embeddings and output head included), at the precision they are published with.
# Sources: Meta's Llama 3.1 model card (8.03B, 70.6B); the Qwen2.5-7B and Qwen2.5-14B model cards ("Number of
# Parameters": 7.61B, 14.7B); for Mistral 7B v0.3, Gemma 2 9B and Phi-3 mini, whose cards give only "7B", "9B" and
# "3.8B", the Hugging Face hub's count from each checkpoint's safetensors metadata (7.25B, 9.24B, 3.82B).
PUBLISHED_BILLIONS = {
    "llama3.1-8b": "8.03",
    "llama3.1-8b-instruct": "8.03",
    "llama3.1-70b": "70.6",
    "mistral-7b": "7.25",
    "qwen2.5-7b": "7.61",
    "qwen2.5-14b": "14.7",
    "gemma2-9b": "9.24",
    "phi3-mini": "3.82",
    "smollm2-135m-instruct": "0.135",  # its model card: 135M
}


def model_options() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


@pytest.fixture(scope="module")
def infos() -> list[recipes.RecipeInfo]:
    """The catalog, read once for the module (it composes every recipe)."""
    return catalog(strict=True)


@pytest.mark.parametrize("name", sorted(recipe_paths()))
def test_every_recipe_has_the_header(name):
    path = recipe_paths()[name]
    header = read_header(path)
    assert set(header) == {"what", *FIELDS}
    assert header["task"] in TASKS
    assert header["what"] and header["memory"] and header["time"]
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines[1:4]] == ["# task", "# memory", "# time"]


def test_the_catalog_covers_every_task_and_keeps_the_old_names(infos):
    assert [i.name for i in infos] == sorted(recipe_paths())
    assert {i.task for i in infos} == set(TASKS)
    assert {"default", "tiny-alpaca", "llama3.1-8b-alpaca", "mistral-7b-alpaca", "qwen2.5-7b-alpaca"} <= {
        i.name for i in infos}
    assert 10 <= len(infos) <= 16


def test_the_model_column_is_what_the_recipe_loads(infos):
    # Every hub model of the catalog comes from a model option with an architecture (tests/config/test_config.py checks
    # that the composed recipe has it; the test below checks the figures).
    hub_models = {OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{o}.yaml")).get("name_or_path")
                  for o in model_options()}
    models = {i.name: i.model for i in infos}
    assert models["default"] == "tiny-llama" and models["tiny-alpaca"] == "tiny-llama-bpe"
    assert models["llama3.1-8b-instruct-ultrachat"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert models["llama3.1-70b-alpaca"] == "meta-llama/Llama-3.1-70B"
    assert models["custom"] == "model.name_or_path"  # the user's own
    in_cache = ("smollm2-alpaca", "smollm2-dpo-cpu")
    assert all(models[name].endswith("/models/smollm2-135m-instruct") for name in in_cache)  # a folder in the cache
    assert all(model in hub_models for name, model in models.items()
               if name not in ("default", "tiny-alpaca", "custom", *in_cache))


def matches_published(count: int, published: str) -> bool:
    """Whether `count` parameters is the published figure of billions, rounded or truncated to its digits
    (model cards do both: 70.55B is published as 70.6B, 14.77B as 14.7B)."""
    digits = len(published.partition(".")[2])
    billions = count / 1e9
    scale = 10 ** digits
    return f"{billions:.{digits}f}" == published or f"{math.floor(billions * scale) / scale:.{digits}f}" == published


@pytest.mark.parametrize("option", [o for o in model_options() if not o.startswith("tiny-") and o != "custom"])
@pytest.mark.slow
def test_architecture_builds_with_the_published_parameter_count(option, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.model import attention_implementation

    data = tmp_path / "data.json"  # a hub model without a recipe composes recipe=custom, which needs data
    data.write_text('[{"instruction": "a", "output": "b"}]')
    config = compose_config([f"model={option}", f"output_dir={tmp_path}/run", f"cache_dir={tmp_path}",
                             f"data.path={data}"])
    arch = config.model.architecture.given()
    assert set(arch) == set(vars(ArchitectureConfig())), f"model option {option} needs a complete architecture"
    assert option in PUBLISHED_BILLIONS, f"add the published parameter count of model option {option}"
    hf_config = AutoConfig.for_model(**arch)
    attention = attention_implementation(config.model, hf_config)
    assert attention == ("eager" if option == "gemma2-9b" else "sdpa")  # read from the architecture, not the name
    with torch.device("meta"):  # shapes only: no memory, no download
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention)
    count = sum(p.numel() for p in model.parameters())
    assert matches_published(count, PUBLISHED_BILLIONS[option]), (
        f"{option}: {count:,} parameters, published {PUBLISHED_BILLIONS[option]}B")
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == arch["tie_word_embeddings"]


def test_published_figures_are_read_as_rounded_or_truncated():
    assert matches_published(70_553_706_496, "70.6") and matches_published(14_770_033_664, "14.7")
    assert not matches_published(8_030_261_248, "8.04") and not matches_published(7_248_023_552, "7.26")


def cells(lines: list[str]) -> list[list[str]]:
    """The table's rows split at the columns its first line (the column names) starts."""
    starts = [i for i, c in enumerate(lines[0]) if c != " " and (i == 0 or lines[0][i - 1] == " ")]
    return [[line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)] for line in lines]


def test_qlora_recipes_prints_one_row_per_recipe_with_its_task(infos, capsys, monkeypatch):
    models = {i.name: i.model for i in infos}
    monkeypatch.setattr(recipes, "recipe_models", lambda names: models)  # composed once already, by `infos`
    assert main(["recipes"]) == 0
    rows = cells(capsys.readouterr().out.splitlines())
    assert rows[0] == ["recipe", "task", "model", "memory", "time", "what"]
    assert [row[0] for row in rows[1:]] == sorted(recipe_paths())
    for row in rows[1:]:
        header = read_header(recipe_paths()[row[0]])
        # not a terminal: nothing is cut
        assert row[1:] == [header["task"], models[row[0]], header["memory"], header["time"], header["what"]], row


def test_table_is_aligned_and_cut_to_a_width(infos):
    rows = cells(table(infos).splitlines())
    assert [row[:2] for row in rows[1:]] == [[i.name, i.task] for i in infos]
    assert [row[5] for row in rows[1:]] == [i.what for i in infos]
    narrow = table(infos, width=70).splitlines()
    assert all(len(line) <= 70 for line in narrow) and any(line.endswith("...") for line in narrow)
    assert [row[:2] for row in cells(narrow)] == [row[:2] for row in rows]


def test_a_recipe_without_the_header_is_an_error_naming_it_but_still_listed(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# Says what it is for, but nothing else.\nlora:\n  r: 8\n")
    with pytest.raises(RecipeHeaderError, match=re.escape(f"{bad}: bad recipe header: line 2 must be '# task: ...'")):
        read_header(bad)
    wrong_task = tmp_path / "wrong.yaml"
    wrong_task.write_text("# What.\n# task: finetune\n# memory: ?\n# time: ?\n")
    with pytest.raises(RecipeHeaderError, match="task 'finetune' is not one of instruction, chat, pretraining"):
        read_header(wrong_task)

    monkeypatch.setattr("qlora.composition.recipe_paths", lambda: {"bad": bad})
    monkeypatch.setattr(recipes, "recipe_models", lambda names: {})
    with pytest.raises(RecipeHeaderError, match=re.escape(str(bad))):
        catalog(strict=True)
    assert main(["recipes"]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split()[:5] == ["bad", "?", "?", "?", "?"] and row.endswith("Says what it is for, but nothing else.")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_set_header_field_rewrites_only_that_line(tmp_path, newline):
    original = recipe_paths()["llama3.1-8b-alpaca"].read_text().replace("\n", newline).encode()
    path = tmp_path / "r.yaml"
    path.write_bytes(original)
    os.chmod(path, 0o644)
    set_header_field(path, "memory", "18.2 GiB (qlora plan, 1 x H100)")
    after = path.read_bytes()
    old_lines, new_lines = original.split(b"\n"), after.split(b"\n")
    assert len(old_lines) == len(new_lines)
    assert [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b] == [2]
    assert new_lines[2] == b"# memory: 18.2 GiB (qlora plan, 1 x H100)" + newline[:-1].encode()
    assert read_header(path)["memory"] == "18.2 GiB (qlora plan, 1 x H100)"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    set_header_field(path, "time", "5 h 10 min")
    set_header_field(path, "time", "5 h 10 min")  # idempotent
    assert read_header(path)["time"] == "5 h 10 min"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no staging file left behind


def test_set_header_field_refuses_what_it_cannot_write(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# What.\n# task: demo\nlora:\n  r: 8\n")
    before = path.read_bytes()
    with pytest.raises(RecipeHeaderError, match="no '# memory: ...' line"):
        set_header_field(path, "memory", "1 GiB")
    for key, value in [("what", "x"), ("memory", "two\nlines"), ("task", "finetune"), ("time", " ")]:
        with pytest.raises(ValueError):
            set_header_field(path, key, value)
    assert path.read_bytes() == before


def test_docs_list_every_recipe():
    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    missing = [name for name in recipe_paths() if f"`{name}`" not in text]
    assert not missing, f"docs/recipes.md does not list {missing}"
