"""Generating text: `qlora generate` answers a prompt with a trained run (base loaded as trained, plus adapter) or a
merged export, formatted as the model was trained and streamed to the terminal; `greedy_answers` are the samples a
training run writes before and after it trains."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from qlora.config import GenerateCommand, validate_generate
from qlora.device import default_device
from qlora.errors import QloraError, first_line

log = logging.getLogger(__name__)


def generate(cmd: GenerateCommand, out=None) -> str:
    """Generate an answer to cmd.prompt; prints it (token by token with cmd.stream) and returns it."""
    validate_generate(cmd)
    out = out or sys.stdout
    device = default_device()
    model, tokenizer, ids, stop = _load(cmd, device)
    if cmd.seed is not None:
        torch.manual_seed(cmd.seed)
    sampling = {"do_sample": True, "temperature": cmd.temperature, "top_p": cmd.top_p} if cmd.temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    streamer = _Streamer(tokenizer, out) if cmd.stream else None
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=cmd.max_new_tokens, eos_token_id=stop,
                                pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling)
    text = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
    if not cmd.stream:
        print(text, file=out)
    return text


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                   device: torch.device) -> list[str]:
    """Greedy continuations of prompts given as token ids (the new text, special tokens removed)."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def _load(cmd: GenerateCommand, device: torch.device):
    """Model, tokenizer, prompt token ids and stop token ids, for a run or an export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cmd.run_dir is not None:
        from qlora import data as qdata
        from qlora import demo, hub
        from qlora.model import load_trained_model
        from qlora.runfolder import read_trained

        run = read_trained(cmd.run_dir)
        hub.prepare(hub.hub_ids(run.config))
        demo.prepare_assets(run.config)
        tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer))
        model = load_trained_model(run.config, run.adapter, device)
        ids = qdata.prompt_ids(cmd.prompt, run.config.data, tokenizer) if cmd.template else _plain(cmd, tokenizer)
        return model, tokenizer, ids, qdata.stop_token_ids(run.config.data, tokenizer)

    name = cmd.model
    if Path(name).expanduser().exists() and not (Path(name).expanduser() / "config.json").is_file():
        raise QloraError(f"model={name} is not a model folder (no config.json); give a merged export "
                         "(qlora export output_dir) or use run_dir= for a run folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype="auto", device_map={"": device}).eval()
    except (OSError, ValueError) as e:
        from qlora import hub

        why = first_line(e) if Path(name).expanduser().exists() else hub.unavailable(name)
        raise QloraError(f"could not load model={name}: {why}") from e
    if cmd.template and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": cmd.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = _plain(cmd, tokenizer)
    stop = model.generation_config.eos_token_id
    return model, tokenizer, ids, stop if stop is not None else tokenizer.eos_token_id


def _plain(cmd: GenerateCommand, tokenizer) -> list[int]:
    return tokenizer(cmd.prompt)["input_ids"]


class _Streamer(TextStreamer):
    """Prints the generated text to `out` as it arrives."""

    def __init__(self, tokenizer, out) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()
