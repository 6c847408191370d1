"""Sentence encoders for the embedding and student engines: texts -> unit vectors.

Two backends compute the same thing, sentence-transformers' mean pooling over the last hidden
state and L2 normalisation, from the same MiniLM weights:

    "onnx"   ONNX Runtime on the model exported once to ONNX (udfs.engines.models, kinds
             "onnx" / "onnx-int8"), tokenised by the model's own tokenizer.json with the
             `tokenizers` library. Imports neither torch nor sentence-transformers, so a Spark
             worker holds the runtime and the model, not a deep-learning framework.
    "torch"  sentence-transformers on PyTorch (the reference).

Batches are sorted by length before padding, as sentence-transformers does (by characters;
the ONNX path by tokens, having tokenised every text once), so a batch of short titles never
pays for one long text.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

ONNX_FILE = "model.onnx"


def onnx_file(directory) -> Path | None:
    """The ONNX graph of a model directory (as this project or optimum writes it), if any."""
    for rel in (ONNX_FILE, "onnx/model.onnx"):
        path = Path(directory) / rel
        if path.is_file():
            return path
    return None


class TorchEncoder:
    backend = "torch"

    def __init__(self, model_dir: str, device: str = "cpu", threads: int | None = None):
        import torch
        from sentence_transformers import SentenceTransformer
        if threads:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(model_dir, device=device)
        dim = getattr(self.model, "get_embedding_dimension", None)  # renamed in ST 5
        self.dim = (dim or self.model.get_sentence_embedding_dimension)()

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)

    def overlong(self, texts: Sequence[str]) -> int:
        """How many of `texts` the encoder cuts at its max_seq_length (it reads the start)."""
        limit = self.model.max_seq_length
        long = [t for t in texts if len(t) + 2 > limit]  # a word piece is >= 1 character
        if not long:
            return 0
        ids = self.model.tokenizer(long, add_special_tokens=True)["input_ids"]
        return sum(len(i) > limit for i in ids)


def _max_seq_length(model_dir: Path, default: int = 256) -> int:
    try:
        return int(json.loads((model_dir / "sentence_bert_config.json").read_text())
                   ["max_seq_length"])
    except (OSError, ValueError, KeyError):
        return default


class OnnxEncoder:
    backend = "onnx"

    def __init__(self, model_dir: str, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer
        model_dir = Path(model_dir)
        graph = onnx_file(model_dir)
        if graph is None:
            raise FileNotFoundError(f"no {ONNX_FILE} in {model_dir}")
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json pads every text to a fixed length; pad per batch instead
        self.tokenizer.no_padding()
        self.max_seq_length = _max_seq_length(model_dir)
        self.tokenizer.enable_truncation(self.max_seq_length)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(graph), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def _batch(self, encodings: list) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n], types[row, :n], mask[row, :n] = e.ids, e.type_ids, 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)

    def overlong(self, texts: Sequence[str]) -> int:
        """How many of `texts` the encoder cuts at its max_seq_length (it reads the start)."""
        long = [t for t in texts if len(t) + 2 > self.max_seq_length]  # a piece >= 1 char
        return sum(bool(e.overflowing) for e in self.tokenizer.encode_batch(long)) if long else 0

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """Tokenised once, then batched by token count (longest first), each batch padded
        to its own longest text: the least padding a batch size allows; rows come back in
        the order given."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(texts)
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._batch([encodings[i] for i in rows])
        return out
