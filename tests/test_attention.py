"""Per-sample attention over packed rows computes what SDPA under transformers' block-diagonal mask computes, and
leaves everything else (padded batches, generation) to SDPA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from qlora.attention import PER_SAMPLE_SDPA, use_per_sample_sdpa
from qlora.data.batches import Collator
from qlora.data.encode import Example
from tests.runs import packed_batch


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def forward_and_grads(model, **inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(**inputs, use_cache=False).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_packed_rows_get_the_logits_and_gradients_of_the_masked_path(model):
    batch = packed_batch()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    masked, masked_grads = forward_and_grads(model, **inputs)
    assert use_per_sample_sdpa(model) and model.config._attn_implementation == PER_SAMPLE_SDPA
    per_sample, grads = forward_and_grads(model, **inputs)
    torch.testing.assert_close(per_sample, masked, rtol=0, atol=1e-5)
    for mine, theirs in zip(grads, masked_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-5)
    # and each sample is what it is alone: the second sample of row 0, the first of row 1
    with torch.no_grad():
        alone = model(input_ids=batch["input_ids"][:1, 7:17], use_cache=False).logits[0]
        first = model(input_ids=batch["input_ids"][1:, :12], use_cache=False).logits[0]
    torch.testing.assert_close(per_sample[0, 7:17], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(per_sample[1, :12], first, rtol=0, atol=1e-5)


def test_padded_batches_and_generation_take_sdpa_as_before(model):
    batch = Collator(pad_id=0, packed=False)([[Example(input_ids=list(range(5, 17)), labels=[0] * 12, record=0)],
                                               [Example(input_ids=list(range(20, 27)), labels=[0] * 7, record=1)]])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(**inputs, use_cache=False).logits
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0)
        assert use_per_sample_sdpa(model)
        torch.testing.assert_close(model(**inputs, use_cache=False).logits, before, rtol=0, atol=0)
        again = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
    assert again.tolist() == generated.tolist()


def test_other_attention_implementations_are_left_alone():
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert not use_per_sample_sdpa(eager) and eager.config._attn_implementation == "eager"
