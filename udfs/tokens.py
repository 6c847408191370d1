"""Caption tokens as stable categorical ids.

A caption's words become int64 ids by hashing (BLAKE2b, 8 bytes, sign bit cleared), so an id
means the same word in every job, on every machine, with no vocabulary to ship. A ranker
folds them into a fixed number of buckets (`bucket_counts`).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"[\w][\w'-]*", re.UNICODE)


def words(caption: str | None) -> list[str]:
    return _WORD.findall(caption.lower()) if caption else []


def token_id(word: str) -> int:
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def caption_tokens(caption: str | None) -> list[int] | None:
    """Ids of the caption's words in order; None for a missing caption."""
    if caption is None:
        return None
    return [token_id(w) for w in words(caption)]


def bucket_counts(token_lists, n_buckets: int) -> np.ndarray:
    """Hashed bag of tokens: a (rows, n_buckets) float32 count matrix."""
    out = np.zeros((len(token_lists), n_buckets), dtype=np.float32)
    for i, toks in enumerate(token_lists):
        if toks is None:
            continue
        for t in toks:
            out[i, int(t) % n_buckets] += 1.0
    return out
