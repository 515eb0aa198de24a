"""Rendering one record of each data format into text segments, each marked trained or not.

A sample is a list of segments `(text, trained)`. Segments are tokenized separately and concatenated, so the
boundary between prompt and response falls exactly between two tokens whatever the tokenizer; masking is
decided per segment, never by searching the text for a response marker.

Chat conversations are rendered by the chat template itself: for each assistant turn k, the template's
rendering of messages[:k] with the generation prompt is what the model sees before answering, and its
rendering of messages[:k+1] is that plus the answer. The difference is the trained segment: the assistant's
text and whatever end-of-turn marker the template writes, so the model learns to stop.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from qlora.config import CHAT_TEMPLATE_NAMES, ColumnsConfig, DataConfig, DataFormat, RolesConfig
from qlora.errors import QloraError

Segment = tuple[str, bool]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# The text of the built-in chat templates (data.chat_template=NAME; the names are the config's), for tokenizers
# that ship none.
CHAT_TEMPLATES = {
    # ChatML (OpenAI, Qwen): <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3 instruct: header tokens around the role, <|eot_id|> after each turn.
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


class RecordError(ValueError):
    """What is wrong with one record (the caller adds which file and row)."""


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt for an instruction (and optional input), ending where the response starts."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def alpaca_chat_template(bos: bool) -> str:
    """A Jinja chat template that renders a user message as the Alpaca prompt (instruction only), so that
    `apply_chat_template` in any runtime prompts an Alpaca-trained model as it was trained."""
    head, _, tail = ALPACA_PROMPT.partition("{instruction}")
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% for message in messages %}{% if message['role'] == 'user' %}"
        + "{{ " + json.dumps(head) + " + message['content'] + " + json.dumps(tail) + " }}"
        + "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    )


def resolve_chat_template(cfg: DataConfig, tokenizer) -> str | None:
    """The Jinja chat template that data.chat_template selects: None for alpaca and text data, and for preference
    data when neither data.chat_template nor the tokenizer has one."""
    if cfg.format == DataFormat.preference:  # message-list pairs need one, text pairs are used as written
        if cfg.chat_template is None:
            own = tokenizer.chat_template
            return own if isinstance(own, str) and own else None
    elif cfg.format != DataFormat.chat:
        return None
    choice = cfg.chat_template
    if choice is None:
        if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template:
            raise QloraError(f"the tokenizer {tokenizer.name_or_path or ''} has no chat template; set "
                              f"data.chat_template to one of {', '.join(CHAT_TEMPLATE_NAMES)} or to a Jinja template")
        return tokenizer.chat_template
    return CHAT_TEMPLATES.get(choice, choice)  # a built-in template's name, or (as validated) a Jinja template


def render(record: dict, cfg: DataConfig, tokenizer, template: str | None) -> list[Segment]:
    """The record as segments, or RecordError naming the field at fault."""
    if cfg.format == DataFormat.alpaca:
        return render_alpaca(record, cfg.columns)
    if cfg.format == DataFormat.chat:
        return render_chat(messages(record, cfg.columns, cfg.roles), tokenizer, template)
    return [(_text(record, cfg.columns.text), True)]


def render_alpaca(record: dict, columns: ColumnsConfig) -> list[Segment]:
    instruction = _text(record, columns.instruction)
    output = _text(record, columns.output)
    context = record.get(columns.input)
    if context is not None and not isinstance(context, str):
        raise RecordError(f"'{columns.input}' is a {type(context).__name__}, expected text")
    return [(alpaca_prompt(instruction, context or ""), False), (output, True)]


def sample_texts(record: dict, cfg: DataConfig) -> tuple[str, str]:
    """A valid alpaca, chat or preference record's prompt and answer, for people: the instruction (and input) and the
    output; the user turn before the first assistant turn, and that turn; the prompt and the chosen answer."""
    if cfg.format == DataFormat.alpaca:
        context = record.get(cfg.columns.input)
        instruction = _text(record, cfg.columns.instruction)
        return (f"{instruction}\n\n{context}" if context else instruction), _text(record, cfg.columns.output)
    if cfg.format == DataFormat.preference:
        return _pair_texts(record, cfg)
    conversation = messages(record, cfg.columns, cfg.roles)
    first = next(n for n, m in enumerate(conversation) if m["role"] == "assistant")
    asked = [m["content"] for m in conversation[:first] if m["role"] == "user"]
    return (asked[-1] if asked else ""), conversation[first]["content"]


def messages(record: dict, columns: ColumnsConfig, roles: RolesConfig) -> list[dict]:
    """The record's conversation as [{role, content}] with roles system / user / assistant.

    Messages after the last assistant turn are left out: nothing after it is trained.
    """
    field = columns.messages or next((k for k in ("messages", "conversations") if k in record), None)
    if field is None or field not in record:
        raise RecordError(f"no '{columns.messages or 'messages'}' (or 'conversations') field")
    normalised = _turns(record[field], field, columns, roles)
    last = max((n for n, m in enumerate(normalised) if m["role"] == "assistant"), default=None)
    if last is None:
        raise RecordError(f"'{field}' has no assistant turn, so nothing would be trained")
    return normalised[:last + 1]


def _turns(value, field: str, columns: ColumnsConfig, roles: RolesConfig) -> list[dict]:
    """A field's list of messages as [{role, content}] with roles system / user / assistant."""
    turns = _maybe_json(value)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"'{field}' must be a non-empty list of messages")
    by_name = {name: role for role, names in vars(roles).items() for name in names}
    normalised = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"'{field}'[{n}] is a {type(turn).__name__}, expected a message object")
        role_key = columns.role or ("role" if "role" in turn else "from")
        content_key = columns.content or ("content" if "content" in turn else "value")
        name = turn.get(role_key)
        if name not in by_name:
            raise RecordError(f"'{field}'[{n}].{role_key} is {name!r}, not a known speaker ({', '.join(by_name)}); "
                              "add it to data.roles.user / assistant / system")
        content = turn.get(content_key)
        if not isinstance(content, str) or (not content.strip() and by_name[name] != "system"):
            raise RecordError(f"'{field}'[{n}].{content_key} is missing or empty")
        normalised.append({"role": by_name[name], "content": content})
    return normalised


def render_chat(conversation: list[dict], tokenizer, template: str) -> list[Segment]:
    """Segments of a conversation as its chat template renders it; every assistant turn is trained."""

    def apply(turns: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2 errors, and templates that raise on purpose (e.g. no system role)
            raise RecordError(f"the chat template failed on this conversation ({type(e).__name__}: {e})") from e

    full = apply(conversation, False)
    segments, done = [], 0
    for k, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = apply(conversation[:k], True) if k else _generation_prompt_only(apply)
        after = apply(conversation[:k + 1], False)
        if not (after.startswith(before) and full.startswith(after) and len(before) >= done):
            raise RecordError("the chat template renders earlier turns differently once later turns follow, so "
                              "turns cannot be masked exactly; use a template that renders each turn once")
        answer = after[len(before):]
        if message["content"].strip() not in answer:
            raise RecordError("the chat template renders no assistant turn (the assistant's text does not appear "
                              "after the generation prompt); check data.chat_template")
        segments += [(full[done:len(before)], False), (answer, True)]
        done = len(after)
    if done < len(full):
        segments.append((full[done:], False))
    return [(text, trained) for text, trained in segments if text]


def _generation_prompt_only(apply) -> str:
    # A conversation that opens with the assistant: the template's prefix for an empty history, where it has one.
    try:
        return apply([], True)
    except RecordError:
        return ""


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise RecordError(f"'{key}' is missing")
    if not isinstance(value, str):
        raise RecordError(f"'{key}' is a {type(value).__name__}, expected text")
    if not value.strip():
        raise RecordError(f"'{key}' is empty")
    return value


def _maybe_json(value):
    # csv files carry conversations as JSON strings
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


HH_ASSISTANT = "\n\nAssistant:"
"""Where an assistant turn starts in an Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""


class Pair(NamedTuple):
    """A preference record rendered: the prompt once for both answers, and each answer as the text its tokens are
    scored on (with the end of turn the template writes)."""

    prompt: list[str]
    """The prompt's segments, tokenized separately as chat SFT tokenizes them."""
    chosen: str
    rejected: str
    templated: bool
    """Rendered by the chat template (which writes its own BOS), not used as written."""


def render_pair(record: dict, cfg: DataConfig, tokenizer, template: str | None) -> Pair:
    """A preference record as a Pair, or RecordError naming the field at fault.

    Layouts: text prompt / chosen / rejected (used as written); chosen and rejected as message lists sharing their
    turns before the last assistant turn, with an optional prompt list (rendered by the chat template as chat SFT
    renders them; only the last assistant turn is scored); chosen and rejected as Human / Assistant transcripts,
    whose prompt is their shared text up to the last assistant turn.
    """
    columns = cfg.columns
    for key in (columns.chosen, columns.rejected):
        if record.get(key) is None:
            raise RecordError(f"'{key}' is missing")
    chosen, rejected = _maybe_json(record[columns.chosen]), _maybe_json(record[columns.rejected])
    templated = isinstance(chosen, list) and isinstance(rejected, list)
    if templated:
        prompt, answers = _chat_pair(record, chosen, rejected, cfg, tokenizer, template)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        prompt, answers = _text_pair(record, columns)
    else:
        raise RecordError(f"'{columns.chosen}' and '{columns.rejected}' must both be text or both be message lists "
                          f"(got {type(chosen).__name__} and {type(rejected).__name__})")
    if answers[0] == answers[1]:
        raise RecordError(f"'{columns.chosen}' and '{columns.rejected}' are the same answer, so there is nothing "
                          "to prefer")
    return Pair(prompt, *answers, templated)


def _text_pair(record: dict, columns: ColumnsConfig) -> tuple[list[str], tuple[str, str]]:
    chosen, rejected = _text(record, columns.chosen), _text(record, columns.rejected)
    if record.get(columns.prompt) is not None:
        return [_text(record, columns.prompt)], (chosen, rejected)
    # Anthropic HH: both transcripts repeat the conversation, and differ in the last assistant turn.
    if HH_ASSISTANT not in chosen or HH_ASSISTANT not in rejected:
        raise RecordError(f"no '{columns.prompt}' field, and '{columns.chosen}' / '{columns.rejected}' are not "
                          "Human / Assistant transcripts (no '\\n\\nAssistant:' turn); give a prompt field")
    cut_chosen = chosen.rindex(HH_ASSISTANT) + len(HH_ASSISTANT)
    cut_rejected = rejected.rindex(HH_ASSISTANT) + len(HH_ASSISTANT)
    if chosen[:cut_chosen] != rejected[:cut_rejected]:
        raise RecordError(f"'{columns.chosen}' and '{columns.rejected}' diverge before their last assistant turn, so "
                          "they answer different prompts")
    answers = chosen[cut_chosen:], rejected[cut_rejected:]
    for key, answer in zip((columns.chosen, columns.rejected), answers, strict=True):
        if not answer.strip():
            raise RecordError(f"'{key}' has an empty last assistant turn")
    return [chosen[:cut_chosen]], answers


def _chat_pair(record: dict, chosen: list, rejected: list, cfg: DataConfig, tokenizer,
               template: str | None) -> tuple[list[str], tuple[str, str]]:
    columns, roles = cfg.columns, cfg.roles
    if template is None:
        raise RecordError(f"'{columns.chosen}' and '{columns.rejected}' are message lists, and the tokenizer has no "
                          f"chat template to render them; set data.chat_template (one of "
                          f"{', '.join(CHAT_TEMPLATE_NAMES)}, or a Jinja template)")
    conversations = [_turns(chosen, columns.chosen, columns, roles), _turns(rejected, columns.rejected, columns, roles)]
    prompt = record.get(columns.prompt)
    if isinstance(_maybe_json(prompt), list):
        given = _turns(prompt, columns.prompt, columns, roles)
        conversations = [given + c for c in conversations]
    elif isinstance(prompt, str) and all(m["role"] == "assistant" for c in conversations for m in c):
        conversations = [[{"role": "user", "content": prompt}] + c for c in conversations]  # answers given alone
    cuts = []
    for key, conversation in zip((columns.chosen, columns.rejected), conversations, strict=True):
        last = max((n for n, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
        if last is None:
            raise RecordError(f"'{key}' has no assistant turn, so there is no answer to score")
        cuts.append(last)
    (chosen, rejected), (n_chosen, n_rejected) = conversations, cuts
    if chosen[:n_chosen] != rejected[:n_rejected]:
        raise RecordError(f"'{columns.chosen}' and '{columns.rejected}' diverge before their last assistant turn "
                          f"(message {_first_difference(chosen[:n_chosen], rejected[:n_rejected])}), so they answer "
                          "different prompts")
    rendered = []
    for conversation, last in zip(conversations, cuts, strict=True):
        segments = render_chat(conversation[:last + 1], tokenizer, template)
        answer = max(n for n, (_, trained) in enumerate(segments) if trained)
        rendered.append(([text for text, _ in segments[:answer]], segments[answer][0]))
    (prompt_chosen, answer_chosen), (prompt_rejected, answer_rejected) = rendered
    if prompt_chosen != prompt_rejected:
        raise RecordError("the chat template renders the shared prompt differently before each answer, so the pair "
                          "cannot share one prompt; check data.chat_template")
    return prompt_chosen, (answer_chosen, answer_rejected)


def _first_difference(a: list, b: list) -> int:
    return next((n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _pair_texts(record: dict, cfg: DataConfig) -> tuple[str, str]:
    """A valid preference record's last user request and chosen answer, as written."""
    columns = cfg.columns
    chosen, prompt = _maybe_json(record[columns.chosen]), _maybe_json(record.get(columns.prompt))
    if isinstance(chosen, str):
        if isinstance(prompt, str):
            return prompt, chosen
        asked, _, answer = chosen.rpartition(HH_ASSISTANT)
        return asked.rpartition("\n\nHuman:")[2].strip(), answer.strip()
    turns = (_turns(prompt, columns.prompt, columns, cfg.roles) if isinstance(prompt, list) else []) \
        + _turns(chosen, columns.chosen, columns, cfg.roles)
    last = max(n for n, m in enumerate(turns) if m["role"] == "assistant")
    asked = [m["content"] for m in turns[:last] if m["role"] == "user"]
    return (asked[-1] if asked else prompt if isinstance(prompt, str) else ""), turns[last]["content"]
