"""The chunked loss is the full-logits loss, with the same LoRA gradients, without saving the logits for backward."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from qlora.data import IGNORE_INDEX
from qlora.errors import QloraError
from qlora.evaluation import scored_tokens, token_loss_sum
from qlora.loss import CausalLMLoss, chunked_token_loss_sum

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def tiny_llama(vocab_size: int = 1000, **config) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, vocab_size=vocab_size, **config))


def with_lora(model, **lora) -> peft.PeftModel:
    # Random B (not peft's zeros), so that every LoRA weight gets a non-zero gradient to compare.
    config = peft.LoraConfig(r=4, target_modules=lora.pop("target_modules", LINEARS), init_lora_weights=False, **lora)
    return peft.get_peft_model(model, config)


def batch(vocab_size: int = 1000, rows: int = 3, seq: int = 12) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs and labels with prompt segments and right padding that are not trained: 19 trained tokens."""
    input_ids = torch.randint(vocab_size, (rows, seq), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    labels = input_ids.clone()
    labels[0, :5] = IGNORE_INDEX  # prompt
    labels[1, :3] = labels[1, 8:] = IGNORE_INDEX  # prompt, padding
    labels[2, 2:6] = IGNORE_INDEX  # a second turn's prompt mid-row
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def loss_and_grads(loss_module: CausalLMLoss, inputs: dict, labels: torch.Tensor):
    model = loss_module.model
    model.zero_grad(set_to_none=True)
    loss = loss_module(**inputs, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_loss_and_grads(model, chunk_tokens: int, inputs: dict, labels: torch.Tensor) -> dict:
    """Compare the chunked path with the full logits; returns the gradients."""
    loss, grads = loss_and_grads(CausalLMLoss(model, 0), inputs, labels)
    chunked_loss, chunked_grads = loss_and_grads(CausalLMLoss(model, chunk_tokens), inputs, labels)
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(token_loss_sum(model(**inputs).logits, labels)), rel=1e-6)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=0)
    assert chunked_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
    return grads


VARIANTS = {
    "lora": lambda: with_lora(tiny_llama()),
    "lm_head trained": lambda: with_lora(tiny_llama(), modules_to_save=["lm_head"]),
    "lora on lm_head": lambda: with_lora(tiny_llama(), target_modules=[*LINEARS, "lm_head"]),
    "tied embeddings": lambda: with_lora(tiny_llama(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("chunk_tokens", [4, 19, 64], ids=["smaller", "equal", "larger"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_loss_and_grads_equal_the_full_logits(variant, chunk_tokens):
    model = VARIANTS[variant]()
    inputs, labels = batch()
    assert scored_tokens(labels) == 19
    grads = assert_same_loss_and_grads(model, chunk_tokens, inputs, labels)
    assert all(g.abs().max() > 0 for g in grads.values())
    if variant in ("lm_head trained", "lora on lm_head"):  # the head's own trainable weights got their gradient
        assert any("lm_head" in name for name in grads)


def test_no_trained_tokens_is_zero_loss_and_zero_grads():
    model = with_lora(tiny_llama(), modules_to_save=["lm_head"])
    inputs, labels = batch()
    labels[:] = IGNORE_INDEX
    loss, grads = loss_and_grads(CausalLMLoss(model, 4), inputs, labels)
    assert loss == 0
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads.values())  # every parameter has a (zero) grad


def test_nf4_base(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant,
                                                             device_map={"": "cpu"})
    model = with_lora(base).train()
    assert type(model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    inputs, labels = batch()
    assert_same_loss_and_grads(model, 5, inputs, labels)


def test_gradient_checkpointing_still_applies_to_the_decoder():
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = with_lora(model).train()
    inputs, labels = batch()
    assert_same_loss_and_grads(model, 4, inputs, labels)

    layers = model.get_base_model().model.layers
    calls = []
    hooks = [layer.mlp.register_forward_hook(lambda *_: calls.append(1)) for layer in layers]
    loss_and_grads(CausalLMLoss(model, 4), inputs, labels)
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2 * len(layers)  # forward, then the recompute in backward


def test_gemma2_softcapping():
    torch.manual_seed(0)
    # Wider initial weights than Gemma's default, for logits of magnitude ~10 that a cap of 3 bends.
    config = transformers.Gemma2Config(**TINY, head_dim=16, vocab_size=1000, initializer_range=0.2,
                                       final_logit_softcapping=3.0)
    model = with_lora(transformers.Gemma2ForCausalLM(config))
    inputs, labels = batch()
    assert_same_loss_and_grads(model, 4, inputs, labels)

    # The cap binds: without it the loss differs.
    base = model.get_base_model()
    with torch.no_grad():
        hidden = base.model(**inputs).last_hidden_state
        capped = chunked_token_loss_sum(hidden, labels, base.lm_head, 4, softcap=3.0)
        uncapped = chunked_token_loss_sum(hidden, labels, base.lm_head, 4)
        full = token_loss_sum(model(**inputs).logits, labels)
    assert float(capped) == pytest.approx(float(full), rel=1e-5)
    assert abs(float(uncapped) - float(capped)) > 0.1 * float(capped)


def test_chunked_loss_sum_equals_a_manual_softcapped_reference():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 9, 16), torch.nn.Linear(16, 50)
    labels = torch.randint(50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    logits = torch.tanh(head(hidden[:, :-1]) / 3.0) * 3.0
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    reference = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    torch.testing.assert_close(chunked_token_loss_sum(hidden, labels, head, 5, softcap=3.0), reference)


def test_chunked_path_saves_no_full_logits_for_backward():
    vocab, rows, seq, chunk = 32000, 2, 256, 64
    model = with_lora(tiny_llama(vocab_size=vocab))
    input_ids = torch.randint(vocab, (rows, seq), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :6] = IGNORE_INDEX
    logit_bytes = rows * (seq - 1) * vocab * 4  # the float32 logits of every position the full path scores

    def saved_bytes(chunk_tokens: int) -> int:
        storages = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()  # a tensor saved twice (or its views) counts once
            return t

        loss_module = CausalLMLoss(model, chunk_tokens)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_module(input_ids, labels=labels)
        loss.backward()
        return sum(storages.values())

    full, chunked = saved_bytes(0), saved_bytes(chunk)
    print(f"saved for backward: full logits {full / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB, "
          f"logits {logit_bytes / 2**20:.1f} MiB")
    assert full > logit_bytes  # the measurement sees the full path's logits
    assert full - chunked > 0.9 * logit_bytes
    assert chunked < 0.25 * logit_bytes


@pytest.mark.parametrize("case", ["not a causal LM", "scaled logits", "prompt tuning"])
def test_models_the_chunked_path_cannot_reproduce_are_a_clear_error(case):
    if case == "not a causal LM":
        model = torch.nn.Linear(4, 4)
    elif case == "scaled logits":
        torch.manual_seed(0)
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**TINY, vocab_size=1000, logit_scale=0.25))
    else:
        model = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(QloraError, match=r"set train\.loss_chunk_tokens=0"):
        CausalLMLoss(model, 8)
    if case == "scaled logits":  # the plain path is the model's own logits
        inputs, labels = batch()
        with torch.no_grad():
            loss = CausalLMLoss(model, 0)(**inputs, labels=labels)
            assert float(loss) == pytest.approx(float(token_loss_sum(model(**inputs).logits, labels)))
