"""Perplexity and mean token loss on a dataset. `qlora eval`, training's eval loss and the export's verification
all count the same way, with `token_loss_sum`.

The loss is the next-token cross-entropy over the tokens the data format trains (responses and their EOS for
alpaca and chat data, every token for text), summed over the dataset and divided by the number of those tokens;
the perplexity is its exponential. Padding never counts, so neither figure depends on the batch size.

    qlora eval run_dir=RUN                        # a run on its held-out split, as training measured its eval loss
    qlora eval run_dir=RUN base=true              # ... and its base without the adapter, side by side
    qlora eval model=EXPORT data.path=test.json   # a merged export, or any HF model, on a dataset
    qlora eval model=BASE quant=nf4-dq data.path=test.json   # a base model as QLoRA holds it
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from qlora import data as qdata
from qlora.config import (
    Config,
    DataConfig,
    DataFormat,
    EvalCommand,
    EvalSubset,
    ModelConfig,
    is_data_file,
    validate_eval,
)
from qlora.config.assets import quant_option
from qlora.config.checks import ONE_TARGET
from qlora.device import default_device
from qlora.errors import ConfigError, QloraError, first_line
from qlora.files import write_text_atomic
from qlora.metrics import perplexity

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 2048
"""Longest sequence scored for a model= without seq_len (fewer if the model has fewer positions)."""


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label is not IGNORE_INDEX, in float32 (or float64
    when the logits are)."""
    logits = logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    targets = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=qdata.IGNORE_INDEX, reduction="sum")


def scored_tokens(labels: torch.Tensor) -> int:
    """How many positions `token_loss_sum` counts."""
    return int((labels[:, 1:] != qdata.IGNORE_INDEX).sum())


@dataclass
class Score:
    """A model's summed token loss over some sequences."""

    loss_sum: float
    tokens: int
    """Scored (trained) tokens."""
    sequences: int

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return perplexity(self.mean_loss)


@torch.no_grad()
def score(model, batches: Iterable[dict[str, torch.Tensor]], *, max_batches: int | None = None,
          autocast: torch.dtype | None = None, loss: Callable[..., torch.Tensor] | None = None) -> Score:
    """Score `model` in eval mode on collated batches (at most `max_batches` of them), autocast to `autocast`.

    `loss` computes a batch's summed token loss from the model's inputs and `labels` (training's loss module, which
    need not materialise the full logits); by default `token_loss_sum` of the model's logits.
    """
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    tokens = sequences = 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            if loss is not None:
                summed = loss(**qdata.model_inputs(batch), labels=batch["labels"])
            else:
                summed = token_loss_sum(model(**qdata.model_inputs(batch)).logits, batch["labels"])
        total += summed.double().cpu()
        tokens += scored_tokens(batch["labels"])
        sequences += len(batch["input_ids"])
    model.train(was_training)
    return Score(float(total), tokens, sequences)


def batches(examples: list[qdata.Example], batch_size: int, pad_id: int) -> Iterable[dict[str, torch.Tensor]]:
    """Unpacked, right-padded batches of similar length (the order does not change the score)."""
    collate = qdata.Collator(pad_id, packed=False)
    for indices in qdata.eval_batches([len(e) for e in examples], batch_size):
        yield collate([[examples[i]] for i in indices])


def select(data: qdata.TokenizedData, subset: EvalSubset, cfg: DataConfig) -> tuple[list[qdata.Example], str]:
    """The sequences of `subset` (not auto) in data order, and what they are, for the table."""
    def in_order(examples: list[qdata.Example]) -> list[qdata.Example]:
        return sorted(examples, key=lambda e: e.record)  # stable: a text document's windows stay in order

    if subset == EvalSubset.eval:
        if not data.eval:
            raise QloraError(f"{cfg.path} has no eval split (data.eval_fraction=0 and no data.eval_path); score "
                             "subset=all, or give data.eval_fraction or data.eval_path")
        return in_order(data.eval), "eval split" + (f" ({cfg.eval_path})" if cfg.eval_path else "")
    if subset == EvalSubset.train:
        return in_order(data.train), "train split"
    if cfg.eval_path is not None:
        return in_order(data.train) + in_order(data.eval), "all records of both files"
    return in_order(data.train + data.eval), "all records"


@dataclass
class Result:
    """One scored model: a row of the table."""

    name: str
    model: str
    adapter: str | None
    quant: str
    score: Score

    def to_json(self) -> dict:
        return {"name": self.name, "model": self.model, "adapter": self.adapter, "quant": self.quant,
                "sequences": self.score.sequences, "tokens": self.score.tokens, "mean_loss": self.score.mean_loss,
                "perplexity": self.score.perplexity, "loss_sum": self.score.loss_sum}


@dataclass
class Report:
    data: dict
    """What was scored: data path, format, subset, seq_len, sequences."""
    results: list[Result]
    output: Path

    def to_json(self) -> dict:
        return {"data": self.data, "results": [r.to_json() for r in self.results]}

    def table(self) -> str:
        header = ("model", "quant", "sequences", "tokens", "mean loss", "perplexity")
        rows = [(r.name, r.quant, str(r.score.sequences), str(r.score.tokens), f"{r.score.mean_loss:.4f}",
                 f"{r.score.perplexity:.3f}") for r in self.results]
        widths = [max(len(line[i]) for line in (header, *rows)) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(line, widths, strict=True))) for line in (header, *rows)]
        d = self.data
        return "\n".join([f"{d['path']} ({d['format']}, {d['subset']}, seq_len {d['seq_len']}):", *lines])


def evaluate(cmd: EvalCommand, out=None) -> Report:
    """Score what `cmd` names on its dataset; print the table to `out` (stdout) and write the JSON to cmd.output."""
    validate_eval(cmd)
    device = default_device()
    t0 = time.perf_counter()
    target = _RunTarget(cmd) if cmd.run_dir is not None else _ModelTarget(cmd)
    subset = cmd.subset
    if subset == EvalSubset.auto:
        subset = EvalSubset.eval if target.own_data else EvalSubset.all
    qdata.use_chat_template(cmd.data, target.tokenizer)
    loaded = qdata.load(cmd.data, target.tokenizer, seq_len=target.seq_len, seed=target.seed,
                        cache_dir=target.cache_dir)
    examples, which = select(loaded, subset, cmd.data)
    if cmd.data.format == DataFormat.preference:  # (chosen, rejected) pairs, in record order: the preferred answers
        examples, which = examples[::2], f"{which}, chosen answers"
    limit = cmd.max_sequences
    if limit is None and target.own_data and subset == EvalSubset.eval:
        limit = target.config.train.eval_max_sequences  # as training scored it: the same figure
    examples = examples[:limit]
    if not examples:
        raise QloraError(f"the {which} of {cmd.data.path} holds no sequences to score; choose another subset")

    model = target.load(device)
    log.info("loaded in %.1fs; scoring %d sequences", time.perf_counter() - t0, len(examples))
    pad = target.tokenizer.pad_token_id

    def scored():
        return score(model, batches(examples, cmd.batch_size, pad), autocast=target.autocast)

    results = [Result(target.name, target.model, target.adapter, target.quant, scored())]
    if cmd.base:
        with model.disable_adapter():
            results.append(Result("base (no adapter)", target.model, None, target.quant, scored()))
    data = {"path": cmd.data.path, "format": cmd.data.format.value, "subset": subset.value, "which": which,
            "seq_len": target.seq_len, "sequences": len(examples)}
    report = Report(data, results, Path(cmd.output).expanduser())
    write_text_atomic(report.output, json.dumps(report.to_json(), indent=2) + "\n")
    print(report.table(), file=out or sys.stdout)
    log.info("wrote %s", report.output)
    return report


class _RunTarget:
    """A trained run: its base loaded as trained (or as quant= says), plus the adapter."""

    def __init__(self, cmd: EvalCommand) -> None:
        from transformers import AutoTokenizer

        from qlora import demo, hub
        from qlora.model import check_model_config
        from qlora.runfolder import read_trained

        self.run = read_trained(cmd.run_dir)
        trained = self.run.config
        quant = quant_option(cmd.quant) if cmd.quant is not None else trained.quant
        self.config: Config = replace(trained, data=cmd.data, quant=quant)
        self.own_data = cmd.data == trained.data
        self.seq_len = cmd.seq_len or trained.train.seq_len
        self.seed = trained.seed if cmd.seed is None else cmd.seed
        self.cache_dir = Path(trained.cache_dir).expanduser()
        hub.prepare(hub.hub_ids(self.config))
        demo.prepare_assets(self.config)  # a scratch base (or demo data) lives in the cache and may have been cleared
        check_model_config(self.config.model, self.seq_len)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.run.tokenizer))
        self.name = f"{self.run.folder} (step {self.run.state.get('step')})"
        self.model, self.adapter = self.config.model.name_or_path, str(self.run.adapter)
        self.quant = _quant_name(self.config.quant)

    @property
    def autocast(self) -> torch.dtype | None:
        from qlora.model import autocast_dtype

        return autocast_dtype(self.config.train.mixed_precision)

    def load(self, device: torch.device):
        from qlora.model import load_trained_model

        return load_trained_model(self.config, self.run.adapter, device)


class _ModelTarget:
    """A model folder or hub id (a base, or a merged export), loaded unquantized or as quant= says."""

    autocast = None
    adapter = None
    own_data = False
    cache_dir = None

    def __init__(self, cmd: EvalCommand) -> None:
        from transformers import AutoConfig

        from qlora import hub
        from qlora.model import load_tokenizer

        self.model = self.name = cmd.model
        self.model_config = ModelConfig(name_or_path=cmd.model)
        self.quant_config = quant_option(cmd.quant or "none")
        self.quant = _quant_name(self.quant_config)
        self.seed = Config.seed if cmd.seed is None else cmd.seed
        local = Path(cmd.model).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise QloraError(f"model={cmd.model} is not a model folder (no config.json); give a merged export, a "
                             "model folder or a hub id, or run_dir= for a run folder")
        hub.prepare([p for p in (cmd.model, cmd.data.path, cmd.data.eval_path)
                     if p is not None and not Path(p).expanduser().exists() and not is_data_file(p)])
        try:
            positions = getattr(AutoConfig.from_pretrained(cmd.model), "max_position_embeddings", None)
        except (OSError, ValueError) as e:
            why = first_line(e) if local.exists() else hub.unavailable(cmd.model)
            raise QloraError(f"could not load model={cmd.model}: {why}") from e
        if cmd.seq_len is not None and positions is not None and cmd.seq_len > positions:
            raise QloraError(f"seq_len={cmd.seq_len} is longer than {cmd.model} supports ({positions} positions); "
                             "lower seq_len")
        self.seq_len = cmd.seq_len or min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN)
        self.tokenizer = load_tokenizer(self.model_config)

    def load(self, device: torch.device):
        from qlora.model import load_base_model

        return load_base_model(self.model_config, self.quant_config, device).eval()


def _quant_name(quant) -> str:
    """The quant group's option name for a QuantConfig (nf4-dq, fp4, int8, none, ...)."""
    return quant.method.value + ("-dq" if quant.double_quant else "")


def command_defaults(args: list[str]) -> dict | None:
    """Defaults for `qlora eval`'s options from the run that run_dir= names: its data settings."""
    from omegaconf import OmegaConf

    from qlora.runfolder import read_trained

    given = {a.partition("=")[0]: a.partition("=")[2] for a in args}
    if ("run_dir" in given) == ("model" in given):
        raise ConfigError(ONE_TARGET)  # before data.path is asked for, or the run read
    if not given.get("run_dir"):
        return None
    return {"data": OmegaConf.structured(read_trained(given["run_dir"]).config.data)}
