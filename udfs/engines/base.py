"""The one engine interface every backend implements, and what counts as a fatal error.

An engine gets a batch of clean, de-duplicated texts and returns one result per text, in
order. Engines may raise on a whole batch; `udfs.annotator` isolates the failing rows, so a
backend never has to handle bad input or partial failure itself.

Some failures are not about the rows: the GPU ran out of memory, the GPU fell off the bus, the
engine's process died. Retrying rows on a broken engine only burns the batch again and again
and ends with every row in error, so these are fatal: `is_fatal` recognises them (by type
name and message, without importing torch or vllm), the annotator re-raises them as
FatalEngineError, the task fails, and Spark retries it (in a fresh Python worker, since a
worker whose task raised exits).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from udfs.spec import Attribute, Caption

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Labels:
    """Per text: the chosen label (always one of the attribute's labels) and its probability;
    optionally the whole distribution over the attribute's labels ([texts, labels], spec
    order), which an ordinal attribute's expected value needs."""
    labels: list[str]
    confidences: list[float]
    scores: "np.ndarray | None" = None


class FatalEngineError(RuntimeError):
    """The engine cannot go on in this process: fail the task, never a row."""


# Exception types that mean the engine is gone, whatever the rows: torch's CUDA OOM
# (torch.cuda.OutOfMemoryError, torch.OutOfMemoryError), vLLM's EngineDeadError
# (vllm/v1/engine/exceptions.py, raised when the engine-core process dies) and host OOM.
_FATAL_TYPES = {"OutOfMemoryError", "EngineDeadError", "MemoryError", "FatalEngineError"}
# Messages of the RuntimeErrors torch, NCCL and vLLM raise for a broken device or engine.
# Row errors (a reply outside the labels, which quotes the model) are never read for these.
_ROW_TYPES = {"MalformedOutput"}
_FATAL_MESSAGES = (
    "cuda out of memory", "hip out of memory", "cuda error", "cuda driver error",
    "cublas_status", "cudnn_status", "cudnn error", "nccl error", "device-side assert",
    "no cuda gpus are available", "gpu has fallen off the bus",
    "enginecore encountered an issue", "engine core proc", "engine core died",
    "engine loop has died", "engine is dead",
)


def is_fatal(exc: BaseException) -> bool:
    """Whether `exc` (or anything it was raised from) means the engine itself is broken."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(cls.__name__ in _ROW_TYPES for cls in type(exc).__mro__):
            return False
        if any(cls.__name__ in _FATAL_TYPES for cls in type(exc).__mro__):
            return True
        message = str(exc).lower()
        if any(m in message for m in _FATAL_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class EmbeddingUnsupported(NotImplementedError):
    """The engine has no `embed`: semantic IDs need an engine that can embed."""


#: what a generative engine counts per part: tokens it sent, of those the ones its server or
#: prefix cache did not recompute, tokens it generated, and item texts it cut to fit the model
TOKEN_COUNTS = ("prompt_tokens", "cached_tokens", "generated_tokens", "truncated_texts")


class Engine(ABC):
    #: identifies the model in the provenance columns (e.g. "embedding:all-MiniLM-L6-v2")
    model_name: str = "engine"

    @classmethod
    def name_for(cls, options: dict) -> str | None:
        """The model_name an engine built with `options` (its config less "type") will have,
        known without loading anything: the annotate job compares it with the model that
        labelled each row. None where only a built engine knows (a plugin naming itself at
        run time); such rows are never redone for their model."""
        return None if cls.model_name == Engine.model_name else cls.model_name

    @staticmethod
    def same_labels(name: str) -> list[str]:
        """The model names whose labels a model named `name` reproduces, itself first (e.g.
        one model's weights on two runtimes that compute the same numbers): rows labelled by
        any of them are not redone when the engine changes between them."""
        return [name]

    def count_tokens(self, part: str, prompt: int = 0, cached: int = 0,
                     generated: int = 0, truncated: int = 0) -> None:
        """Add to this engine's token counts for `part` (an attribute's name or "caption")."""
        usage = self.__dict__.setdefault("_usage", {})
        counts = usage.setdefault(part, dict.fromkeys(TOKEN_COUNTS, 0))
        counts["prompt_tokens"] += int(prompt)
        counts["cached_tokens"] += int(cached)
        counts["generated_tokens"] += int(generated)
        counts["truncated_texts"] += int(truncated)

    def usage(self) -> dict[str, dict[str, int]]:
        """Token counts per part since the engine was built (empty for engines that do not
        count tokens, such as the embedding engine)."""
        return {part: dict(c) for part, c in self.__dict__.get("_usage", {}).items()}

    @property
    def embedding_model(self) -> str:
        """The embedding space `embed` maps into: a semantic-ID quantiser fitted on one
        engine's embeddings only assigns codes to embeddings from the same space. Engines
        whose embeddings do not follow `model_name` override it."""
        return self.model_name

    @abstractmethod
    def classify(self, texts: Sequence[str], attribute: Attribute) -> Labels:
        """Pick one label per text."""

    def tag(self, texts: Sequence[str], attribute: Attribute) -> "np.ndarray":
        """A multi-label attribute: each label's own probability per text, [texts, labels]
        in spec order (they need not sum to one). Engines that cannot keep this default."""
        raise NotImplementedError(
            f"engine {self.model_name!r} ({type(self).__name__}) cannot score multi-label "
            f"attributes such as {attribute.name!r}; use the embedding, transformers, vllm or "
            "openai engine")

    @abstractmethod
    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        """Write a short caption per text."""

    def embed(self, texts: Sequence[str]) -> "np.ndarray":
        """Optional: one vector per text, as a (len(texts), dim) float array, the same text
        always giving the same vector (semantic IDs quantise them). Engines that cannot
        embed keep this default."""
        raise EmbeddingUnsupported(
            f"engine {self.model_name!r} ({type(self).__name__}) cannot embed; semantic IDs "
            "need an engine with embed(): name one for them, e.g. the annotate job's "
            "--embed-engine embedding (the embedded MiniLM)")

    def close(self) -> None:
        """Release the model (GPU memory, connections, child processes)."""


def can_embed(engine: Engine) -> bool:
    """Whether the engine implements `embed` (without calling it)."""
    return type(engine).embed is not Engine.embed
