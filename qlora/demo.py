"""The offline demo's assets: a generated instruction dataset, its word-level tokenizer, and scratch models
(with that tokenizer, or a byte-level BPE trained on a data file).

The dataset is a small world of animal facts (what each animal says, eats and where it lives) asked in
several phrasings. It is generated here, deterministically, so the default recipe needs no network and no
third-party data, and it is learnable by a tiny model in a minute on a CPU: the answer is a fixed function of
the animal and the relation, which LoRA on a frozen random base can pick up from the prompt. Held-out records
ask known facts in phrasings not seen with that animal, so eval loss measures more than memorised strings.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

from qlora.config import (
    Config,
    ScratchArchitecture,
    ScratchModelConfig,
    ScratchTokenizer,
    builds_scratch_model,
    generates_demo_data,
)
from qlora.errors import QloraError
from qlora.files import write_text_atomic

# animal: (sound, food, home)
ANIMALS: dict[str, tuple[str, str, str]] = {
    "cow": ("moo", "grass", "barn"),
    "dog": ("woof", "bones", "kennel"),
    "cat": ("meow", "fish", "house"),
    "duck": ("quack", "bread", "pond"),
    "sheep": ("baa", "clover", "meadow"),
    "pig": ("oink", "apples", "sty"),
    "horse": ("neigh", "hay", "stable"),
    "lion": ("roar", "meat", "savanna"),
    "owl": ("hoot", "mice", "tree"),
    "frog": ("croak", "flies", "swamp"),
    "bee": ("buzz", "nectar", "hive"),
    "snake": ("hiss", "eggs", "burrow"),
    "wolf": ("howl", "deer", "forest"),
    "mouse": ("squeak", "cheese", "hole"),
    "crow": ("caw", "seeds", "nest"),
    "donkey": ("bray", "straw", "field"),
    "goat": ("bleat", "weeds", "hill"),
    "monkey": ("chatter", "bananas", "jungle"),
    "bear": ("growl", "berries", "cave"),
    "goose": ("honk", "corn", "lake"),
}

# relation -> (question phrasings, answer template)
RELATIONS: dict[str, tuple[list[str], str]] = {
    "sound": (
        ["What sound does a {a} make?", "What does a {a} say?", "How does a {a} sound?"],
        "A {a} says {x}.",
    ),
    "food": (
        ["What does a {a} eat?", "What food does a {a} like?", "What is the favorite food of a {a}?"],
        "A {a} eats {x}.",
    ),
    "home": (
        ["Where does a {a} live?", "Where is the home of a {a}?", "Where can you find a {a}?"],
        "A {a} lives in a {x}.",
    ),
}

SAMPLE_PROMPTS = ["What sound does a cow make?", "Where does a duck live?", "What does a monkey eat?"]


def prepare_assets(config: Config) -> None:
    """Build what the config asks to be generated and is not there yet: a scratch model, the demo dataset."""
    data_path = Path(config.data.path).expanduser()
    if generates_demo_data(config) and not data_path.exists():
        write_demo_dataset(data_path)
    if builds_scratch_model(config.model):
        ensure_scratch_model(Path(config.model.name_or_path).expanduser(), config.model.scratch)


def demo_records() -> list[dict[str, str]]:
    """Every demo record (animal x relation x phrasing) in Alpaca layout, in a fixed order."""
    records = []
    for animal, facts in ANIMALS.items():
        for (questions, answer), fact in zip(RELATIONS.values(), facts, strict=True):
            for question in questions:
                records.append({"instruction": question.format(a=animal), "input": "",
                                "output": answer.format(a=animal, x=fact)})
    return records


def write_demo_dataset(path: Path) -> None:
    """Write the demo dataset as JSON Lines (shuffled with a fixed seed), atomically."""
    records = demo_records()
    random.Random(0).shuffle(records)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def build_demo_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A word-level tokenizer over the demo's vocabulary (with the Alpaca template's words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qlora.data import alpaca_prompt

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for record in demo_records():
        text = alpaca_prompt(record["instruction"], record["input"]) + record["output"]
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        model_max_length=4096,
    )


def build_bpe_tokenizer(corpus: str, vocab_size: int):  # -> transformers.PreTrainedTokenizerFast
    """A byte-level BPE tokenizer trained on every string in the records of the data file `corpus`.

    Its special tokens are <s>, </s>, <pad> and ChatML's <|im_start|> / <|im_end|>, and it carries the
    ChatML chat template, so every data format works with it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from qlora.data import CHAT_TEMPLATES, read_source

    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_strings(read_source(corpus, "train").rows), trainer=trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1 << 20, chat_template=CHAT_TEMPLATES["chatml"])


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def ensure_scratch_model(path: Path, shape: ScratchModelConfig) -> None:
    """Build a random-init model of `shape.architecture` and its tokenizer at `path`, once.

    An existing folder is reused if it was built from the same shape, and refused otherwise, so a cached
    model can never silently stand in for a different one.
    """
    if path.exists():
        built = path / "qlora_scratch.json"
        if not built.is_file() or json.loads(built.read_text()) != _shape_dict(shape):
            raise QloraError(
                f"model.scratch.path {path} exists but was not built from this model.scratch shape; "
                "delete the folder or set model.scratch.path elsewhere"
            )
        return
    import torch
    from transformers import AutoModelForCausalLM

    if shape.tokenizer == ScratchTokenizer.bpe:
        tokenizer = build_bpe_tokenizer(shape.tokenizer_corpus, shape.tokenizer_vocab_size)
    else:
        tokenizer = build_demo_tokenizer()
    config = scratch_config(shape, shape.vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shape.seed)
        model = AutoModelForCausalLM.from_config(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "qlora_scratch.json").write_text(json.dumps(_shape_dict(shape)))
    try:
        os.replace(staging, path)
    except OSError:  # another process built it meanwhile; theirs is identical (same shape, same seed)
        shutil.rmtree(staging)
        if not path.exists():
            raise


def scratch_config(shape: ScratchModelConfig, vocab_size: int, **special_tokens):  # -> PretrainedConfig
    """The transformers config of the scratch model `shape` describes, with `vocab_size` embedding rows."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        shape.architecture.value,
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        **special_tokens,
    )


def _shape_dict(shape: ScratchModelConfig) -> dict:
    from dataclasses import asdict

    shape_dict = {k: v for k, v in asdict(shape).items() if k != "path"}
    if shape.tokenizer == ScratchTokenizer.demo:  # the bpe settings do not apply (and older builds lack them)
        for key in ("tokenizer", "tokenizer_corpus", "tokenizer_vocab_size"):
            del shape_dict[key]
    if shape.architecture == ScratchArchitecture.llama:  # older builds, all Llama, lack the key
        del shape_dict["architecture"]
    return shape_dict


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def concise_pairs(records: list[dict], *, max_chars: int = 400) -> list[dict]:
    """Preference pairs that teach short, on-topic answers, from Alpaca records whose output has two or more
    sentences (and at most `max_chars` characters): the chosen answer is the record's first sentence, the rejected one
    the next such record's whole output (long, and about something else). In the chat layout (chosen / rejected
    message lists sharing the user turn), so an instruct model sees them in its own chat template.

    The rejected answer is another record's so that the two share no answer prefix: with the whole output rejected,
    the first sentence is common to both and DPO's easiest way to widen the margin is an early end of turn, which
    left SmolLM2 answering nothing (docs/preference.md)."""
    kept = []
    for record in records:
        output = (record.get("output") or "").strip()
        sentences = SENTENCE_END.split(output)
        if len(sentences) >= 2 and len(output) <= max_chars and len(sentences[0]) >= 20:
            context = (record.get("input") or "").strip()
            request = f"{record['instruction']}\n\n{context}" if context else record["instruction"]
            kept.append(({"role": "user", "content": request}, sentences[0], output))
    return [{"chosen": [asked, {"role": "assistant", "content": first}],
             "rejected": [asked, {"role": "assistant", "content": kept[(n + 1) % len(kept)][2]}]}
            for n, (asked, first, _) in enumerate(kept)]
