"""The Ollama Modelfile written beside every GGUF export: the file, its prompt format as a Go template, its stop
tokens and sampling defaults, so `ollama create NAME -f Modelfile` gives a model that prompts and stops as trained.

The template is read off the run's own chat template: rendered with marker messages, it splits into the text
around a user message, the generation prompt, and the text after an assistant message. A template that does not
split that way (one that renders a user turn differently by position, say) gets no TEMPLATE line, and Ollama
falls back to the chat template embedded in the GGUF file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

_USER, _ANSWER = "\x00qlora-user\x00", "\x00qlora-answer\x00"


@dataclass(frozen=True)
class ChatPieces:
    """A one-turn chat template as literal text: before + user + after_user + generation, answer + after_answer."""

    before_user: str
    after_user: str
    generation: str
    after_answer: str


def chat_pieces(tokenizer) -> ChatPieces | None:
    """The run's chat template split around a user and an assistant message, or None if it does not split."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        return None

    def render(messages, generation: bool) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        bos = tokenizer.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text  # llama.cpp adds BOS as the file says

    user = [{"role": "user", "content": _USER}]
    asked, prompted = render(user, False), render(user, True)
    answered = render([*user, {"role": "assistant", "content": _ANSWER}], False)
    if asked.count(_USER) != 1 or not prompted.startswith(asked) or not answered.startswith(asked):
        return None
    before_user, _, after_user = asked.partition(_USER)
    generation = prompted[len(asked):]
    head, found, after_answer = answered[len(asked):].partition(_ANSWER)
    if not found or head != generation:
        return None
    return ChatPieces(before_user, after_user, generation, after_answer)


def modelfile(gguf_name: str, tokenizer, generation_config) -> str:
    """The Modelfile's text for the GGUF file `gguf_name` (in the same folder)."""
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME (written by qlora export)",
             f"FROM ./{gguf_name}"]
    pieces = chat_pieces(tokenizer)
    literals = [] if pieces is None else [pieces.before_user, pieces.after_user, pieces.generation,
                                          pieces.after_answer]
    if pieces is not None and not any("{{" in t or '"""' in t for t in literals):
        content = "{{ .Content }}"
        template = ('{{- range .Messages }}{{ if eq .Role "user" }}' + pieces.before_user + content
                    + pieces.after_user + pieces.generation + '{{ else if eq .Role "assistant" }}' + content
                    + pieces.after_answer + "{{ end }}{{ end }}")
        lines.append(f'TEMPLATE """{template}"""')
    else:
        log.info("Modelfile: the chat template does not split into one user and one assistant turn; Ollama will "
                 "use the template embedded in the GGUF file")
    eos = generation_config.eos_token_id
    for token_id in eos if isinstance(eos, list) else [eos] if eos is not None else []:
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token:
            lines.append(f'PARAMETER stop "{token}"')
    for key in ("temperature", "top_p", "top_k"):
        value = getattr(generation_config, key, None)
        if value is not None and getattr(generation_config, "do_sample", False):
            lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
