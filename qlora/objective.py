"""What training minimises: the next-token loss (objective=sft), or a preference between two answers (dpo, orpo,
simpo), each as a module whose forward returns the step's sums.

A preference batch holds B pairs as 2B rows, every chosen answer first (data.PairCollator). Each row is scored by
its summed log-probability over its answer tokens, log pi(y | x): the prompt's tokens carry no label. Per pair, with
c / r the chosen / rejected scores, |c| / |r| their token counts and c_ref / r_ref the reference's scores:

    dpo sigmoid  h = (c - c_ref) - (r - r_ref);  loss = -(1 - eps) log s(beta h) - eps log s(-beta h)
    dpo ipo      loss = (h - 1 / (2 beta))^2
    dpo hinge    loss = max(0, 1 - beta h)
    orpo         a = c / |c|, b = r / |r|;  loss = -a - beta log s(log odds(a) - log odds(b)),
                 log odds(p) = p - log(1 - exp(p))   (ORPO's lambda is objective.beta)
    simpo        loss = -log s(beta (a - b) - gamma)

s is the logistic sigmoid and eps objective.label_smoothing. The rewards are beta (c - c_ref) and beta (r - r_ref) for
DPO and beta a, beta b for the reference-free ones; reward_accuracy counts a pair whose chosen reward is higher as
1, a tie as 1/2 (so at step 0 of DPO, where every reward is 0, it is 0.5), and a lower one as 0.

DPO's reference is the base itself with the adapter switched off (peft's disable_adapter): no second copy of the
weights. With objective.precompute_reference the reference scores are computed once before training
(`reference_scores`) and kept in cache_dir; otherwise every step runs one extra forward without gradients.

Every module returns sums over the batch: the step divides them by its units (trained tokens for sft, pairs for the
preference objectives) summed over micro batches and processes, so gradient accumulation equals one bigger batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qlora import data as qdata
from qlora.config import Config, DPOLoss, ObjectiveConfig, ObjectiveName
from qlora.evaluation import scored_tokens
from qlora.files import write_text_atomic
from qlora.loss import CausalLMLoss, loss_inputs

log = logging.getLogger(__name__)

PAIR_TERMS = ("loss", "reward_chosen", "reward_rejected", "reward_accuracy", "logps_chosen", "logps_rejected")
"""What PreferenceLoss sums over a batch's pairs, in its output's order."""
PAIR_METRICS = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
                "logps_rejected")
"""A preference run's metrics (and, with eval_, its held-out ones), in the order metrics.jsonl has them."""


def is_preference(objective: ObjectiveConfig) -> bool:
    return objective.name != ObjectiveName.sft


def loss_module(model: nn.Module, config: Config) -> nn.Module:
    """The module that trains: CausalLMLoss for sft, PreferenceLoss for the preference objectives."""
    if is_preference(config.objective):
        return PreferenceLoss(model, config.objective, config.train.loss_chunk_tokens)
    return CausalLMLoss(model, config.train.loss_chunk_tokens)


def units(objective: ObjectiveConfig, batch: dict[str, torch.Tensor]) -> int:
    """What a batch's sums are divided by: its trained tokens (sft) or its pairs."""
    return len(batch["input_ids"]) // 2 if is_preference(objective) else scored_tokens(batch["labels"])


def means(objective: ObjectiveConfig, sums: list[float], count: int) -> dict[str, float]:
    """The metrics of summed terms over `count` units: {"loss"} for sft; for preference objectives the pair terms
    and reward_margin."""
    if not is_preference(objective):
        return {"loss": sums[0] / max(count, 1)}
    values = dict(zip(PAIR_TERMS, (s / max(count, 1) for s in sums), strict=True))
    values["reward_margin"] = values["reward_chosen"] - values["reward_rejected"]
    return {k: values[k] for k in PAIR_METRICS}


def pair_terms(objective: ObjectiveConfig, logps: torch.Tensor, counts: torch.Tensor,
               reference: torch.Tensor | None = None) -> torch.Tensor:
    """[pairs, len(PAIR_TERMS)]: each pair's loss (with its gradient) and its detached rewards, accuracy and scores,
    from the rows' summed answer log-probs `logps` and answer token `counts` (chosen rows first; `reference` the
    same for the reference model, DPO only)."""
    chosen, rejected = logps.float().chunk(2)
    beta = objective.beta
    if objective.name == ObjectiveName.dpo:
        ref_chosen, ref_rejected = reference.to(chosen).chunk(2)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        if objective.loss_type == DPOLoss.sigmoid:
            eps = objective.label_smoothing
            loss = -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
        elif objective.loss_type == DPOLoss.ipo:
            loss = (margin - 1 / (2 * beta)) ** 2
        else:
            loss = torch.relu(1 - beta * margin)
        reward_chosen, reward_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    else:
        n_chosen, n_rejected = counts.to(chosen).chunk(2)
        mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected
        if objective.name == ObjectiveName.orpo:
            log_odds = (mean_chosen - mean_rejected) - (_log1m_exp(mean_chosen) - _log1m_exp(mean_rejected))
            loss = -mean_chosen - beta * F.logsigmoid(log_odds)
        else:
            loss = -F.logsigmoid(beta * (mean_chosen - mean_rejected) - objective.gamma)
        reward_chosen, reward_rejected = beta * mean_chosen, beta * mean_rejected
    reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
    accuracy = (reward_chosen > reward_rejected).float() + 0.5 * (reward_chosen == reward_rejected).float()
    return torch.stack([loss, reward_chosen, reward_rejected, accuracy, chosen.detach(), rejected.detach()], dim=1)


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without the cancellation of computing 1 - exp(x) first."""
    return torch.log(-torch.expm1(x))


class PreferenceLoss(nn.Module):
    """A preference objective's sums over a batch of pairs, computed in forward (so DDP and FSDP see the whole
    step): the policy's scores with gradients, the reference's without (DPO), then `pair_terms` summed over pairs."""

    def __init__(self, model: nn.Module, objective: ObjectiveConfig, chunk_tokens: int) -> None:
        super().__init__()
        self.lm = CausalLMLoss(model, chunk_tokens)
        self.objective = objective

    @property
    def model(self) -> nn.Module:
        """The peft model, to save or generate."""
        return self.lm.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, labels: torch.Tensor,
                reference_logps: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """[len(PAIR_TERMS)] sums over the batch's pairs; only the loss carries a gradient."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **kwargs}
        logps, counts = self.lm.sequence_logps(**inputs, labels=labels)
        if self.objective.name == ObjectiveName.dpo and reference_logps is None:
            reference_logps = self.reference_logps(**inputs, labels=labels)
        return pair_terms(self.objective, logps, counts, reference_logps).sum(0)

    @torch.no_grad()
    def reference_logps(self, **inputs) -> torch.Tensor:
        """The rows' summed answer log-probs under the base alone: the same model with its adapter disabled."""
        with self.lm.model.disable_adapter():
            return self.lm.sequence_logps(**inputs)[0].detach()


@torch.no_grad()
def evaluate(loss: nn.Module, objective: ObjectiveConfig, loader, *, device: torch.device,
             autocast: torch.dtype | None) -> dict[str, float]:
    """Mean pair terms over a loader's batches, in eval mode (`loss` is the training loss module, however wrapped)."""
    was_training = loss.training
    loss.eval()
    total, pairs = None, 0
    for batch in loader:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            sums = loss(**loss_inputs(batch, device)).double().cpu()
        total = sums if total is None else total + sums
        pairs += len(batch["input_ids"]) // 2
    loss.train(was_training)
    return means(objective, total.tolist(), pairs)


REFERENCE_VERSION = "1"
"""Bump when the way reference scores are computed changes, so cached ones are never reused across versions."""


def reference_scores(loss: PreferenceLoss, rows: list, *, pad_id: int, pairs_per_batch: int, device: torch.device,
                     autocast: torch.dtype | None, train_mode: bool, cache: Path | None, write: bool = True,
                     key_parts: list[str]) -> dict[int, tuple[float, float]]:
    """Every pair's reference scores (record -> (chosen, rejected)), computed once as the in-step reference would
    compute them (`train_mode` as the loop runs), or read from the `cache` folder when the same model, quantization
    and tokens were scored before (and written there when `write`)."""
    digest = hashlib.sha256()
    for part in [REFERENCE_VERSION, *key_parts, str(pairs_per_batch),
                 *(e.input_ids.tobytes() + b"|" + e.labels.tobytes() for row in rows for e in row)]:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    path = cache / f"{digest.hexdigest()[:24]}.json" if cache is not None else None
    if path is not None and path.is_file():
        try:
            stored = json.loads(path.read_text())
            log.info("reference log-probs of %d pairs from cache %s", len(stored), path)
            return {int(k): (v[0], v[1]) for k, v in stored.items()}
        except (OSError, ValueError, IndexError, TypeError) as e:
            log.warning("reference cache %s is unreadable (%s); computing again", path, e)
    collate = qdata.PairCollator(pad_id)
    was_training = loss.training
    loss.train(train_mode)
    scores = {}
    for indices in qdata.eval_batches([max(len(e) for e in row) for row in rows], pairs_per_batch):
        batch = collate([rows[i] for i in indices])
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logps = loss.reference_logps(**loss_inputs(batch, device)).float().cpu()
        chosen, rejected = logps.chunk(2)
        for i, c, r in zip(indices, chosen.tolist(), rejected.tolist(), strict=True):
            scores[rows[i][0].record] = (c, r)
    loss.train(was_training)
    if path is not None and write:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({str(k): list(v) for k, v in scores.items()}))
        except OSError as e:
            log.warning("could not cache reference log-probs in %s (%s)", path, e)
    return scores


def model_fingerprint(name_or_path: str) -> str:
    """What identifies the base's weights: a local folder's file names, sizes and times, or a hub id."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return name_or_path
    return json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())
                       if f.is_file()])


def reference_key(config: Config, device: torch.device) -> list[str]:
    """What the reference scores depend on besides the tokens: the base's weights, its quantization and dtypes."""
    return [model_fingerprint(config.model.name_or_path), json.dumps(asdict(config.quant), default=str),
            config.train.mixed_precision.value, device.type, str(config.train.loss_chunk_tokens)]
