"""A tiny, random, local Llama-style causal LM for tests: no hub, built in about a second.

The weights are random (fixed seed), so its answers are arbitrary but deterministic; what it
exercises is the real path: AutoTokenizer/AutoModelForCausalLM loading from a directory,
padding, batched scoring and generation.

Two tokenizer families, both trained here on a small corpus: a byte-level BPE (GPT-2/Qwen
style: a leading space is the byte "Ġ" inside the token) and a SentencePiece-style Unigram
(Llama/Mistral style: Metaspace with the "▁" marker prepended to the text, a BOS added by the
post-processor). With `max_token_length` pieces stay short, so labels span several tokens and
share first tokens (" thrilling" / " thoughtful").
"""
from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest

from udfs.spec import Example, load_spec

SPEC = Path(__file__).resolve().parents[1] / "specs" / "movielens.yaml"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# A chat template of the usual shape (the BOS written by the template, a generation prompt
# that opens the assistant's turn), for specs that set `chat: true`.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant:\n"
                 "{% endif %}")

_TITLES = ["The Dark Knight", "Toy Story", "Pride and Prejudice", "Alien", "Amelie",
           "The Godfather", "Finding Nemo", "Heat", "Casablanca", "Spirited Away",
           "Jaws", "Notting Hill", "Schindler's List", "Shrek", "Inception", "Up"]
_GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Drama",
           "Fantasy", "Horror", "Mystery", "Romance", "Sci-Fi", "Thriller", "War"]


def corpus() -> list[str]:
    """A few hundred strings: the spec's prompts, labels and definitions, and movie-like text."""
    spec = load_spec(SPEC)
    # the vibe example the demo spec had until its prompts started with the item: kept here
    # so the tiny models (and the tests' expectations of them) do not move with that edit
    vibe = spec.attributes["vibe"]
    spec = dataclasses.replace(spec, attributes={**spec.attributes, "vibe": dataclasses.replace(
        vibe, examples=(Example("The Exorcist (1973). Genres: Horror, Mystery", "dark"),))})
    lines = []
    for i, title in enumerate(_TITLES):
        genres = ", ".join(_GENRES[(i + k) % len(_GENRES)] for k in range(1 + i % 3))
        text = f"{title} ({1950 + 4 * i}). Genres: {genres}"
        lines.append(text)
        for attr in spec.attributes.values():
            lines.append(attr.render(text))
            lines.extend(f"{attr.render(text)} {label}" for label in attr.labels)
        if spec.caption:
            lines.append(spec.caption.render(text) + f" a {genres.lower()} movie")
    for attr in spec.attributes.values():
        lines.extend(f"{label}: {d}" for label, d in zip(attr.labels, attr.definitions))
    if spec.caption:
        lines.extend(spec.caption.descriptors)
    return lines


def train_tokenizer(family: str = "bpe", max_token_length: int | None = None):
    """A PreTrainedTokenizerFast of the given family ("bpe" or "unigram"), trained on corpus()."""
    from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)
    from transformers import PreTrainedTokenizerFast

    if family == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus(), trainers.BpeTrainer(
            vocab_size=600, special_tokens=SPECIALS, max_token_length=max_token_length,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    elif family == "unigram":
        # Llama-2/Mistral's tokenizer.json: SentencePiece's add_dummy_prefix as a normalizer
        # (" dark" alone is "▁▁dark", after a prompt "...▁dark"), pieces split at "▁", and a
        # decoder that strips the leading space, so a word-initial id decodes without it
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        tok.train_from_iterator(corpus(), trainers.UnigramTrainer(
            vocab_size=400, special_tokens=SPECIALS, unk_token="<unk>",
            max_piece_length=max_token_length or 16, show_progress=False))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        raise ValueError(f"unknown tokenizer family {family!r}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llm(path: str | Path, seed: int = 0, family: str = "bpe",
                   max_token_length: int | None = None, hidden_size: int = 32) -> Path:
    """Train a tokenizer, build a 2-layer, 2-head Llama around it, save both under `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = train_tokenizer(family, max_token_length)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))
