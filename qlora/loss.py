"""The training loss as a module: summed next-token cross-entropy, optionally never holding the full logits.

A causal LM's logits are [batch, seq, vocab]: for a 128k vocabulary at 4 x 1024 tokens, gigabytes in float32, and
as much again for their gradient. `CausalLMLoss(model, chunk_tokens=N)` runs the model's decoder to its last hidden
states, keeps only the positions that are trained (prompt and padding positions get no logits at all), and applies
the output embeddings and the cross-entropy N positions at a time, recomputing each chunk's logits in backward
instead of saving them: at most one chunk's logits exist at once. `chunk_tokens=0` is the plain path, the model's
full logits and `token_loss_sum`.

The loss is computed inside forward() because the training loop wraps this module with accelerate (DDP / FSDP):
submodules called outside the wrapper's forward would bypass its gradient synchronisation.

    loss_module = CausalLMLoss(peft_model, chunk_tokens=1024)
    loss = loss_module(input_ids, attention_mask=mask, labels=labels)   # summed over the trained tokens
    loss_module.model                                                   # the wrapped model, to save or generate
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora.data import IGNORE_INDEX, model_inputs
from qlora.errors import QloraError
from qlora.evaluation import token_loss_sum

PROBE_TOKENS = 8
"""Length of the input on which the constructor checks that the chunked path reproduces the model's logits."""


def loss_inputs(batch: dict[str, torch.Tensor], device: torch.device, rows: int | None = None,
                tokens: int | None = None) -> dict[str, torch.Tensor]:
    """The loss module's arguments for a collated batch (or its first rows x tokens), on `device`: the model's inputs,
    the labels, and a preference batch's precomputed reference log-probs."""
    batch = {k: (v[:rows] if v.dim() == 1 else v[:rows, :tokens]).to(device, non_blocking=True)
             for k, v in batch.items()}
    inputs = {**model_inputs(batch), "labels": batch["labels"]}
    if "reference_logps" in batch:
        inputs["reference_logps"] = batch["reference_logps"]
    return inputs


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy of a causal LM, counted as `token_loss_sum` counts it, computed in forward."""

    def __init__(self, model: nn.Module, chunk_tokens: int) -> None:
        """
        Args:
            model: a transformers `*ForCausalLM`, or a peft `PeftModel` around one; `.model` gives it back.
            chunk_tokens: 0 to take the model's full logits; N > 0 to compute the output embeddings and the loss
                over N trained positions at a time (see the module docstring).

        Raises:
            QloraError: chunk_tokens > 0 and the model's logits are not its output embeddings applied to its
                decoder's last hidden states (softcapped as its config says). The constructor checks this by
                running the model once on a few tokens, without gradients.
        """
        super().__init__()
        if chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0 (got {chunk_tokens})")
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.softcap: float | None = None
        if chunk_tokens:
            base = _base_model(model)
            self.softcap = _softcap(base)
            problem = _chunking_problem(model, self.softcap)
            if problem:
                raise QloraError(f"train.loss_chunk_tokens={chunk_tokens} computes the loss from the decoder's hidden "
                                 f"states and the output embeddings, but {type(base).__name__} {problem}; set "
                                 "train.loss_chunk_tokens=0 to compute it from the model's full logits")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """The summed loss over the positions whose next-token label is not IGNORE_INDEX (0 when there are none),
        in float32. Other keyword arguments go to the model (chunked: to its decoder, with use_cache=False)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **kwargs}
        if not self.chunk_tokens:
            return token_loss_sum(self.model(**inputs).logits, labels)
        # Looked up on every call: FSDP may have replaced submodules since the constructor ran.
        decoder, head = _decoder_and_head(_base_model(self.model))
        hidden = decoder(**{**inputs, "use_cache": False}).last_hidden_state
        return chunked_token_loss_sum(hidden, labels, head, self.chunk_tokens, softcap=self.softcap)


    def sequence_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, *, labels: torch.Tensor,
                       **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed log-probability of its trained tokens (float32), and how many there are: the
        per-sequence scores preference objectives compare. Computed as forward computes the loss (in chunks of
        chunk_tokens trained positions when set, never holding the full logits)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **kwargs}
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        if not self.chunk_tokens:
            logits = self.model(**inputs).logits[:, :-1]
            logits = logits if logits.dtype == torch.float64 else logits.float()
            losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1).to(logits.device),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
            return -losses.sum(-1), trained.sum(-1)
        decoder, head = _decoder_and_head(_base_model(self.model))
        hidden = decoder(**{**inputs, "use_cache": False}).last_hidden_state
        rows, picked = hidden[:, :-1][trained], targets[trained]
        losses = torch.cat([checkpoint(_chunk_token_losses, head, r, t, self.softcap, use_reentrant=False)
                            for r, t in zip(rows.split(self.chunk_tokens), picked.split(self.chunk_tokens),
                                            strict=True)])
        row_of = trained.nonzero()[:, 0].to(losses.device)
        summed = torch.zeros(len(labels), dtype=losses.dtype, device=losses.device).index_add(0, row_of, -losses)
        return summed, trained.sum(-1)


def chunked_token_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_tokens: int, *,
                           softcap: float | None = None) -> torch.Tensor:
    """`token_loss_sum` of the logits `head(hidden)`, softcapped to (-softcap, softcap) when given, computed
    `chunk_tokens` trained positions at a time; each chunk's logits are recomputed in backward, not saved.

    Args:
        hidden: [batch, seq, hidden] last hidden states.
        labels: [batch, seq] token ids, IGNORE_INDEX where a position is not trained.
        head: the output embeddings, [n, hidden] -> [n, vocab].
    """
    targets = labels[:, 1:].to(hidden.device)
    trained = targets != IGNORE_INDEX
    rows, targets = hidden[:, :-1][trained], targets[trained]
    # With no trained position there is one empty chunk: the loss is 0 and, like the full logits' loss, still
    # depends on every parameter (DDP expects a gradient for each, and backward() works).
    sums = [checkpoint(_chunk_loss_sum, head, r, t, softcap, use_reentrant=False)
            for r, t in zip(rows.split(chunk_tokens), targets.split(chunk_tokens), strict=True)]
    return torch.stack(sums).sum()


def _chunk_loss_sum(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor,
                    softcap: float | None) -> torch.Tensor:
    logits = _final_logits(head(rows), softcap)
    return F.cross_entropy(logits, targets.to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_token_losses(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor,
                        softcap: float | None) -> torch.Tensor:
    logits = _final_logits(head(rows), softcap)
    return F.cross_entropy(logits, targets.to(logits.device), reduction="none")


def _final_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The head's output in float32 (float64 stays), softcapped as Gemma 2 does."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _softcap(base: nn.Module) -> float | None:
    """The final logit softcapping of the model's (text) config: Gemma 2 and later cap logits at +-30."""
    config = getattr(base, "config", None)
    return None if config is None else getattr(config.get_text_config(), "final_logit_softcapping", None)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft PeftModel, or `model` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if get_base_model is not None else model


def _decoder_and_head(base: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The decoder (input ids -> last hidden states) and output embeddings of a `*ForCausalLM`, or None when it
    does not have both."""
    if not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        return None
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if head is None or decoder is base:  # get_decoder() falls back to the model itself
        return None
    return decoder, head


def _chunking_problem(model: nn.Module, softcap: float | None) -> str | None:
    """Why the chunked path would not compute the loss of `model`'s own logits, or None when it would."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and (config.is_prompt_learning or getattr(config, "alora_invocation_tokens", None)):
        return f"has a {config.peft_type.value} adapter, which changes the inputs the decoder sees"
    parts = _decoder_and_head(_base_model(model))
    if parts is None:
        return "is not a decoder with output embeddings (no get_decoder() / get_output_embeddings())"
    return _probe(model, *parts, softcap)


def _probe(model: nn.Module, decoder: nn.Module, head: nn.Module, softcap: float | None) -> str | None:
    """Run `model` on a few tokens and check, in that one pass, that its head ran once on the decoder's last hidden
    states and that its logits are the head's output, softcapped by `softcap` and nothing else (Cohere scales its
    logits, Granite divides them, Chameleon masks image tokens: all read from their forward, not their config)."""
    seen: dict[str, list] = {"hidden": [], "head": []}
    hooks = [decoder.register_forward_hook(lambda m, args, out: seen["hidden"].append(out.last_hidden_state)),
             head.register_forward_hook(lambda m, args, out: seen["head"].append((args[0], out)))]
    embeddings = model.get_input_embeddings()
    ids = torch.arange(PROBE_TOKENS, device=embeddings.weight.device).remainder(embeddings.num_embeddings)[None]
    # Train mode, as the loss runs: in eval mode without gradients bitsandbytes repacks 4-bit weights on some CPUs
    # into a layout without autograd. Nothing random matters here, as both sides come from the same pass.
    modes = {m: m.training for m in model.modules()}
    try:
        model.train()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.training = training

    if len(seen["hidden"]) != 1 or len(seen["head"]) != 1:
        return f"ran its decoder {len(seen['hidden'])} and its output embeddings {len(seen['head'])} times per forward"
    (head_in, head_out), hidden = seen["head"][0], seen["hidden"][0]
    if not torch.equal(head_in, hidden.to(head_in.dtype)):  # a head kept in half precision casts its input
        return "does not apply its output embeddings to its decoder's last hidden states"
    ours, theirs = _final_logits(head_out, softcap), logits.float()
    tolerance = 4 * torch.finfo(logits.dtype).eps * float(theirs.abs().max())  # rounding of the model's own softcap
    if ours.shape != theirs.shape or float((ours - theirs).abs().max()) > tolerance:
        return "changes its output embeddings' logits in ways the chunked loss does not reproduce"
    return None
