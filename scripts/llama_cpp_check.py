"""Run an exported GGUF file in llama.cpp itself and compare it with what transformers reads from the same file.

Two venvs, two steps (llama-cpp-python builds llama.cpp from source, so it lives in a venv of its own):

    .venv/bin/python scripts/llama_cpp_check.py reference FILE.gguf REF.npz    # transformers' read-back
    VENV/bin/python scripts/llama_cpp_check.py compare FILE.gguf REF.npz      # llama.cpp, against it

`reference` tokenizes fixed texts with the tokenizer transformers builds from the file and saves the ids and the
float32 logits of transformers' read-back. `compare` tokenizes the same texts with llama.cpp (the ids must be
equal), evaluates them, and prints the mean KL and top-1 agreement of llama.cpp's next-token distributions against
the reference, then answers one chat prompt greedily through the file's own chat template. docs/export.md has
what it printed.
"""

from __future__ import annotations

import sys

import numpy as np

TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n1. Eat a balanced diet.",
    "The water cycle describes how water moves through the environment: it evaporates, condenses into clouds and "
    "falls again as rain or snow.",
]


def reference(gguf_path: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.rsplit("/", 1) if "/" in gguf_path else (".", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    arrays = {}
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        arrays[f"ids{i}"], arrays[f"logits{i}"] = np.array(ids), logits
    np.savez(out, **arrays)
    print(f"wrote {out}: {len(TEXTS)} texts, {sum(len(arrays[f'ids{i}']) for i in range(len(TEXTS)))} tokens")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(gguf_path: str, ref: str) -> None:
    from llama_cpp import Llama

    saved = np.load(ref)
    llm = Llama(model_path=gguf_path, n_ctx=512, logits_all=True, n_threads=2, verbose=False, seed=0)
    kl, agree, positions = 0.0, 0, 0
    for i, text in enumerate(TEXTS):
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        expected = saved[f"ids{i}"].tolist()
        if ids != expected:
            raise SystemExit(f"llama.cpp tokenizes text {i} differently: {ids[:12]} ... vs {expected[:12]} ...")
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)])
        log_p, log_q = _log_softmax(saved[f"logits{i}"]), _log_softmax(logits)
        kl += (np.exp(log_p) * (log_p - log_q)).sum()
        agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
        positions += len(ids)
    print(f"llama.cpp vs transformers on the same file: {positions} positions, mean KL {kl / positions:.3g} nats, "
          f"top-1 agreement {100 * agree / positions:.1f}%; token ids equal")
    answer = llm.create_chat_completion([{"role": "user", "content": "Give three tips for staying healthy."}],
                                        max_tokens=48, temperature=0)
    print("chat (the file's template, greedy):", repr(answer["choices"][0]["message"]["content"]))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("reference", "compare"):
        raise SystemExit(__doc__)
    (reference if sys.argv[1] == "reference" else compare)(sys.argv[2], sys.argv[3])
