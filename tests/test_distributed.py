"""Several processes on one CPU: DDP and FSDP launched by torchrun over gloo, against one process.

Two processes with micro batch 2 draw, in each step, the two batches one process draws with micro batch 2 and
2 accumulation steps, so the runs must agree: same losses, same adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.checkpoint import TrainState
from qlora.composition import compose_config
from qlora.config import validate
from qlora.data.batches import LengthGroupedBatches
from qlora.errors import ConfigError, QloraError
from qlora.metrics import read_metrics
from qlora.resume import check_processes
from qlora.train import run
from tests.runs import REPO, TINY, preference, write_demo_pairs

pytestmark = pytest.mark.slow  # several processes launched by torchrun

STEPS = 8
COMMON = [*TINY, "lora.dropout=0", f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.eval_every_steps=4",
          "train.save_every_steps=4", "train.keep_checkpoints=0", "train.sample_prompts=[]", "train.report=false"]
ONE_PROCESS = ["train.micro_batch_size=2", "train.grad_accum_steps=2"]
TWO_PROCESSES = ["train.micro_batch_size=2", "train.grad_accum_steps=1"]


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ARGS` as a user launches it (one thread per process)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def adapter_file(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def losses(run_dir: Path) -> list[float]:
    return [r.get("loss", r.get("eval_loss")) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training as one process (plain and with torch AdamW) and as two (DDP, FSDP)."""
    root = tmp_path_factory.mktemp("dist")
    common = [f"cache_dir={root / 'cache'}", f"model.scratch.path={root / 'cache'}/tiny128", *COMMON]
    found = {}
    for name, extra in {"one": [], "one_adamw": ["optim=adamw"]}.items():
        result = run(compose_config([*common, *ONE_PROCESS, *extra, f"output_dir={root / name}"]))
        found[name] = {"run": root / name, "adapter": {n: p.detach().clone() for n, p in
                                                         result.model.named_parameters() if p.requires_grad}}
    for name, extra in {"ddp": ["dist=ddp"], "fsdp": ["dist=fsdp", "optim=adamw"]}.items():
        torchrun("tests/distributed_worker.py", str(root / f"{name}-ranks"), *common, *TWO_PROCESSES, *extra,
                 f"output_dir={root / name}")
        ranks = [torch.load(root / f"{name}-ranks" / f"rank{r}.pt") for r in range(2)]
        found[name] = {"run": root / name, "ranks": ranks, "adapter": ranks[0]["adapter"]}
    found["common"] = common
    found["root"] = root
    return found


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_process_holds_the_same_adapter(runs, strategy):
    first, second = (r["adapter"] for r in runs[strategy]["ranks"])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(t.abs().max() > 0 for k, t in first.items() if "lora_B" in k)  # trained, not the zero init


@pytest.mark.parametrize("strategy, single", [("ddp", "one"), ("fsdp", "one_adamw")])
def test_two_processes_match_one_with_the_same_global_batch(runs, strategy, single):
    two, one = runs[strategy], runs[single]
    # DDP runs the same arithmetic as one process; FSDP's reduce-scatter sums in another order.
    assert_close(two["adapter"], one["adapter"], atol=1e-6)
    assert losses(two["run"]) == pytest.approx(losses(one["run"]), abs=1e-5)
    evals = [r["eval_loss"] for r in read_metrics(two["run"]) if "eval_loss" in r]
    assert evals[-1] < 0.9 * evals[0], evals


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_writes_the_run_folder(runs, strategy):
    out = runs[strategy]["run"]
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, STEPS + 1))  # no row twice
    log = (out / "train.log").read_text()
    assert log.count(f"step {STEPS}/{STEPS} ") == 1 and "2 processes (gloo backend)" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    summary = (out / "summary.json").read_text()
    assert '"processes": 2' in summary and '"global_batch": 4' in summary
    # The saved adapter is the trained one, gathered whole from the shards under FSDP.
    saved = adapter_file(out)
    trained = {k.replace(".default", ""): v for k, v in runs[strategy]["adapter"].items()}
    assert_close({f"base_model.model.{k}" if not k.startswith("base_model") else k: v for k, v in saved.items()},
                 trained, atol=0)


def test_fsdp_shards_the_four_bit_weights(runs):
    for rank in runs["fsdp"]["ranks"]:
        assert rank["sharded"] and rank["four_bit_rows"]
        assert all(here * 2 == whole for here, whole in rank["four_bit_rows"]), rank["four_bit_rows"]
    assert all(here == whole for here, whole in runs["ddp"]["ranks"][0]["four_bit_rows"])  # DDP: whole copies


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_across_processes_continues_exactly(runs, strategy):
    """Resumed at step 4 into a new folder through `torchrun -m qlora train`, a run ends where the
    uninterrupted one did: adapter, optimizer state and data position all came back on every process."""
    whole = runs[strategy]["run"]
    resumed = runs["root"] / f"{strategy}-resumed"
    extra = ["dist=ddp"] if strategy == "ddp" else ["dist=fsdp", "optim=adamw"]
    torchrun("-m", "qlora", "train", *runs["common"], *TWO_PROCESSES, *extra, f"output_dir={resumed}",
             f"resume={whole}/checkpoints/step-000004")
    assert_close(adapter_file(resumed), adapter_file(whole), atol=1e-6)
    assert losses(resumed)[-3:] == pytest.approx(losses(whole)[-3:], abs=1e-5)


def test_each_process_draws_its_share_of_the_single_process_batches():
    lengths = list(range(1, 23))  # 22 rows, batches of 2: 11 per epoch
    one = LengthGroupedBatches(lengths, 2, seed=3, group=True)
    shares = [LengthGroupedBatches(lengths, 2, seed=3, group=True, rank=r, world=2) for r in range(2)]
    for epoch in range(2):
        order = one.batches(epoch)
        drawn = [list(s) for s in shares]
        assert drawn[0] == order[0:10:2] and drawn[1] == order[1:10:2]  # the 11th is left out: same count for both
        assert len(drawn[0]) == len(drawn[1]) == len(shares[0])
    shares[1].start_at(1, 3)
    assert list(shares[1]) == one.batches(1)[1:10:2][3:]
    with pytest.raises(QloraError, match="cannot be shared by 2 processes"):
        list(LengthGroupedBatches([5, 6], 2, seed=0, group=False, rank=0, world=2))


def test_strategy_combinations_are_checked_at_config_time(tiny_config):
    with pytest.raises(ConfigError) as e:
        validate(tiny_config("dist=fsdp", "quant=int8", "quant.double_quant=false"))
    assert "dist=fsdp shards 4-bit weights only" in str(e.value)
    assert "optim=paged_adamw_8bit: bitsandbytes optimizers cannot step" in str(e.value)
    with pytest.raises(ConfigError, match="dist.cpu_offload applies to dist=fsdp only"):
        validate(tiny_config("dist=ddp", "dist.cpu_offload=true"))
    validate(tiny_config("dist=fsdp", "optim=adamw", "dist.cpu_offload=true"))


def test_a_multi_process_launch_needs_a_strategy(tiny_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(QloraError, match="launched as 2 processes with dist=none.*add dist=ddp"):
        run(tiny_config())


def test_resuming_with_another_process_count_is_refused():
    state = TrainState(step=4, batch=6, processes=2)
    with pytest.raises(QloraError, match="trained by 2 process.*this run has 1; launch 2"):
        check_processes(state, 1, force=False)
    check_processes(state, 4, force=True)
    assert state.batch == 3  # 12 batches drawn in all, so 3 by each of 4 processes


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_quality_options_train_under_both_strategies(runs, strategy):
    """LoftQ init (before sharding), LoRA+ groups (built from the sharded parameters) and NEFTune (a hook on the
    sharded embeddings) under two processes: the processes end with one adapter, trained, as LoRA+ and LoftQ said."""
    out = runs["root"] / f"{strategy}-quality"
    extra = ["dist=ddp"] if strategy == "ddp" else ["dist=fsdp", "optim=adamw"]
    torchrun("tests/distributed_worker.py", str(runs["root"] / f"{strategy}-quality-ranks"), *runs["common"],
             *TWO_PROCESSES, *extra, "lora.init=loftq", "optim.lora_plus_ratio=16", "train.neftune_alpha=5",
             f"output_dir={out}")
    first, second = (torch.load(runs["root"] / f"{strategy}-quality-ranks" / f"rank{r}.pt")["adapter"]
                     for r in range(2))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    log = (out / "train.log").read_text()
    assert "LoRA init loftq: 14 layers" in log and "LoRA+: 14 B matrices at lr" in log, log[-2000:]
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert evals[-1] < evals[0], evals


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_on_two_processes_matches_one(runs, strategy):
    """A preference run under DDP and FSDP: the reference pass (the adapter disabled inside the wrapped forward) and
    the pair counts summed over processes give the single process's losses, rewards and adapter."""
    root = runs["root"]
    pairs = write_demo_pairs(root / "pairs.jsonl")
    common = [*runs["common"], *preference(pairs), "train.eval_every_steps=4", "optim=adamw"]
    one = run(compose_config([*common, *ONE_PROCESS, f"output_dir={root / f'dpo-one-{strategy}'}"]))
    extra = ["dist=ddp"] if strategy == "ddp" else ["dist=fsdp"]
    torchrun("tests/distributed_worker.py", str(root / f"dpo-{strategy}-ranks"), *common, *TWO_PROCESSES, *extra,
             f"output_dir={root / f'dpo-{strategy}'}")
    two = read_metrics(root / f"dpo-{strategy}")
    single = read_metrics(one.output_dir)
    for key in ("loss", "reward_margin", "eval_loss", "eval_reward_accuracy"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in single if key in r], abs=1e-5), key
    assert_close(torch.load(root / f"dpo-{strategy}-ranks" / "rank0.pt")["adapter"],
                 {n: p.detach() for n, p in one.model.named_parameters() if p.requires_grad}, atol=1e-6)
