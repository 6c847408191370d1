"""A tiny, random, local Llama-style causal LM for tests: no hub, built in about a second.

The weights are random (fixed seed), so its answers are arbitrary but deterministic; what it
exercises is the real path: AutoTokenizer/AutoModelForCausalLM loading from a directory,
padding, batched scoring and generation.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from udfs.spec import load_spec

SPEC = Path(__file__).resolve().parents[1] / "specs" / "movielens.yaml"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

_TITLES = ["The Dark Knight", "Toy Story", "Pride and Prejudice", "Alien", "Amelie",
           "The Godfather", "Finding Nemo", "Heat", "Casablanca", "Spirited Away",
           "Jaws", "Notting Hill", "Schindler's List", "Shrek", "Inception", "Up"]
_GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Drama",
           "Fantasy", "Horror", "Mystery", "Romance", "Sci-Fi", "Thriller", "War"]


def corpus() -> list[str]:
    """A few hundred strings: the spec's prompts, labels and definitions, and movie-like text."""
    spec = load_spec(SPEC)
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


def build_tiny_llm(path: str | Path, seed: int = 0) -> Path:
    """Train a byte-level BPE, build a 2-layer Llama around it, save both under `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>")

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64,
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
