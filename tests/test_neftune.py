"""NEFTune: noise of the stated scale on training forwards' input embeddings only, per sample, none on padding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora import neftune
from qlora.config import LoraConfig
from qlora.lora import attach_lora

HIDDEN = 32


@pytest.fixture
def model():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    return attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))


def test_scale_uses_each_samples_own_length_and_spares_padding():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    s = neftune.scale(mask, None, alpha=5.0, hidden=HIDDEN)
    assert s[0, :4].tolist() == pytest.approx([5 / (4 * HIDDEN) ** 0.5] * 4)
    assert s[1, :2].tolist() == pytest.approx([5 / (2 * HIDDEN) ** 0.5] * 2)
    assert s[0, 4:].tolist() == [0, 0] and s[1, 2:].tolist() == [0] * 4
    # A packed row: samples of 3 and 2 tokens, then padding (the collator gives it positions of its own)
    packed = neftune.scale(torch.tensor([[1, 1, 1, 1, 1, 0, 0]]), torch.tensor([[0, 1, 2, 0, 1, 0, 1]]), 5.0, HIDDEN)
    assert packed[0].tolist() == pytest.approx([5 / (3 * HIDDEN) ** 0.5] * 3 + [5 / (2 * HIDDEN) ** 0.5] * 2 + [0, 0])


def _embeddings_seen(model, batch):
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with neftune.noisy(model, batch):
            model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"))
    finally:
        handle.remove()
    return seen[0]


def test_noise_has_the_stated_scale_in_training_only(model):
    torch.manual_seed(1)
    ids = torch.randint(1, 50, (8, 64))
    mask = torch.ones_like(ids)
    mask[4:, 16:] = 0  # rows 4-7: 16 real tokens, then padding
    batch = {"input_ids": ids, "attention_mask": mask}
    clean = model.get_input_embeddings()(ids).detach()
    neftune.attach(model, alpha=5.0)
    model.train()
    noise = _embeddings_seen(model, batch) - clean  # the hook registered last sees the noisy output
    full, short = 5 / (64 * HIDDEN) ** 0.5, 5 / (16 * HIDDEN) ** 0.5
    assert float(noise[:4].abs().max()) <= full and float(noise[:4].abs().max()) > 0.98 * full
    assert float(noise[:4].std()) == pytest.approx(full / 3 ** 0.5, rel=0.03)  # uniform on [-m, m]: std m / sqrt 3
    assert float(noise[4:, :16].std()) == pytest.approx(short / 3 ** 0.5, rel=0.05)
    assert torch.count_nonzero(noise[4:, 16:]) == 0  # padding untouched
    model.eval()
    assert torch.equal(_embeddings_seen(model, batch), clean)
    model.train()
    model(input_ids=ids)  # a training forward outside `noisy`: no noise, and no stale scale left behind
    assert model.get_input_embeddings()._qlora_neftune.scale is None


def test_generation_and_eval_scores_are_untouched(model):
    from qlora.evaluation import score
    from qlora.generate import greedy_answers

    class Tok:
        pad_token_id, eos_token_id = 0, None

        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids.tolist()))

    ids = torch.randint(1, 50, (2, 12))
    batches = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}]
    def answers_and_loss():
        return (greedy_answers(model, Tok(), [ids[0].tolist()], max_new_tokens=8, device=torch.device("cpu")),
                score(model, batches).mean_loss)

    before = answers_and_loss()
    neftune.attach(model, alpha=50.0)
    model.train()
    with neftune.noisy(model, batches[0]):  # even inside the context: generate and score switch to eval mode
        after = answers_and_loss()
    assert after == before
    assert model.training  # both put the mode back
