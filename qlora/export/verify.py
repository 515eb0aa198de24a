"""Does the export compute what was trained? Next-token distributions of two models on the same probe text.

The probe is held-out data: the run's eval split (its trained tokens score perplexity), or, when the run's data
is not at hand, a fixed text scored on every token. Logits of the reference are kept on the CPU in float32, so
the model that produced them can be freed before the next one loads.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qlora.config import Config
from qlora.errors import QloraError
from qlora.evaluation import perplexity, scored_tokens, token_loss_sum

log = logging.getLogger(__name__)


PROBE_TEXT = (
    "The water cycle describes how water moves through the environment. Heat from the sun evaporates water from "
    "oceans, lakes and rivers; the vapour rises, cools and condenses into clouds, and returns to the ground as rain "
    "or snow. Some of it soaks into the soil and feeds plants and springs, some flows back to the sea in rivers, and "
    "the cycle begins again. Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName three primary colors.\n\n### Response:\nRed, blue and yellow."
)


@dataclass
class Probe:
    """Token sequences to compare models on, with the positions whose next token is scored."""

    sequences: list[torch.Tensor]
    """1-D input ids, one sequence per forward pass (no padding)."""
    labels: list[torch.Tensor]
    """Same shape; IGNORE_INDEX where the next-token prediction is not scored for perplexity."""
    source: str


def probe(config: Config, tokenizer, samples: int, seq_len: int) -> Probe:
    """Up to `samples` held-out sequences of the run's data, else the fixed probe text."""
    from qlora import data as qdata

    seq_len = min(seq_len, config.train.seq_len)
    try:
        loaded = qdata.load(config.data, tokenizer, config.train.seq_len, config.seed,
                            Path(config.cache_dir).expanduser())
        examples = loaded.eval or loaded.train
        where = "eval split" if loaded.eval else "training data (the run had no eval split)"
    except (QloraError, OSError) as e:
        log.warning("the run's data is not available (%s); verifying on a fixed probe text", str(e).splitlines()[0])
        examples = []
    if examples:
        chosen = examples[:samples]
        return Probe([torch.tensor(e.input_ids[:seq_len], dtype=torch.long) for e in chosen],
                     [torch.tensor(e.labels[:seq_len], dtype=torch.long) for e in chosen],
                     f"{len(chosen)} sequences of the run's {where} ({config.data.path})")
    ids = torch.tensor(tokenizer(PROBE_TEXT)["input_ids"][:seq_len])
    return Probe([ids], [ids.clone()], "a fixed probe text")


@torch.no_grad()
def logits_of(model, probe: Probe, autocast: torch.dtype | None = None) -> list[torch.Tensor]:
    """The model's logits for each probe sequence, float32 on the CPU."""
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    was_training = model.training
    model.eval()
    out = []
    for ids in probe.sequences:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]
        out.append(logits.float().cpu())
    model.train(was_training)
    return out


@dataclass
class Comparison:
    """How far a candidate's next-token distributions are from a reference's, over every probe position."""

    max_abs_logit_diff: float
    mean_kl: float
    """KL(reference || candidate) in nats, averaged over positions."""
    top1_agreement: float
    """Share of positions where both models' most likely next token is the same."""
    perplexity_reference: float
    perplexity_candidate: float

    def row(self) -> dict:
        return {k: float(f"{v:.6g}") for k, v in asdict(self).items()}


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], probe: Probe) -> Comparison:
    """Compare two models' logits (from `logits_of`) on the same probe."""
    max_diff, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    nll = {"reference": 0.0, "candidate": 0.0}
    scored = 0
    for ref, cand, labels in zip(reference, candidate, probe.labels, strict=True):
        if ref.shape != cand.shape:
            raise QloraError(f"the two models disagree on the vocabulary ({ref.shape[-1]} vs {cand.shape[-1]} "
                             "logits); the export does not match the trained model")
        max_diff = max(max_diff, (ref - cand).abs().max().item())
        log_p, log_q = F.log_softmax(ref.double(), -1), F.log_softmax(cand.double(), -1)  # KL of ~1e-9 is not noise
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        positions += ref.shape[0]
        for key, log_probs in (("reference", log_p), ("candidate", log_q)):  # perplexity as `qlora eval` counts it
            nll[key] += token_loss_sum(log_probs[None], labels[None]).item()
        scored += scored_tokens(labels[None])
    scored = max(scored, 1)
    return Comparison(max_diff, kl_sum / positions, agree / positions,
                      perplexity(nll["reference"] / scored), perplexity(nll["candidate"] / scored))
