"""Engine registry: build an engine from a plain, picklable config dict.

    {"type": "embedding"}                                   # the embedded default
    {"type": "transformers", "model": "/path/to/hf-dir"}
    {"type": "vllm", "model": "/path/or/name", "gpu_memory_utilization": 0.9}
    {"type": "openai", "base_url": "http://host:8000/v1", "model": "name"}
    {"type": "student", "path": "/path/to/student"}          # distilled from a teacher engine

Backends are imported lazily so a worker only imports the libraries its engine needs.
"""
from __future__ import annotations

import importlib

from udfs.engines.base import Engine, Labels

_BACKENDS = {
    "embedding": "udfs.engines.embedding:EmbeddingEngine",
    "transformers": "udfs.engines.hf:TransformersEngine",
    "vllm": "udfs.engines.vllm:VLLMEngine",
    "openai": "udfs.engines.openai:OpenAIEngine",
    "student": "udfs.engines.student:StudentEngine",
}

DEFAULT_ENGINE = {"type": "embedding"}


class EngineConfigError(ValueError):
    """An engine config that cannot be built; the message says what to fix."""


def check_config(config: dict | None) -> None:
    """Fail fast, on the driver, on a config no worker could build."""
    kind = (config or DEFAULT_ENGINE).get("type")
    if kind not in _BACKENDS:
        raise EngineConfigError(
            f"unknown engine type {kind!r}; choose one of {sorted(_BACKENDS)}")


def build_engine(config: dict | None) -> Engine:
    check_config(config)
    config = dict(config or DEFAULT_ENGINE)
    kind = config.pop("type")
    module, cls = _BACKENDS[kind].split(":")
    engine_cls = getattr(importlib.import_module(module), cls)
    try:
        return engine_cls(**config)
    except TypeError as exc:
        raise EngineConfigError(f"bad options for engine {kind!r}: {exc}") from None


__all__ = ["Engine", "Labels", "EngineConfigError", "build_engine", "check_config",
           "DEFAULT_ENGINE"]
