"""Engine registry: build an engine from a plain, picklable config dict.

    {"type": "embedding"}                                   # the embedded default
    {"type": "transformers", "model": "/path/to/hf-dir"}
    {"type": "transformers", "model": "smollm2-135m-instruct"}   # a packaged model, by name
    {"type": "vllm", "model": "/path/or/name", "gpu_memory_utilization": 0.9}
    {"type": "openai", "base_url": "http://host:8000/v1", "model": "name"}
    {"type": "student", "path": "/path/to/student"}          # distilled from a teacher engine

A model option takes a path or a packaged model's name (udfs.engines.models, the one place
that knows where model files live). Backends are imported lazily so a worker only imports the
libraries its engine needs. A type of the form "package.module:ClassName" loads a custom
Engine subclass (a plugin).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

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


# Engines that load a local model directory: the driver checks it exists before any task runs.
_LOCAL_MODEL_KEY = {"embedding": "model_path", "transformers": "model", "student": "path"}
# Model options that may name a packaged model (udfs.engines.models): build_engine resolves
# them (converting on first use, in the worker); check_config only checks the name.
_MODEL_NAME_KEY = {"embedding": "model_path", "transformers": "model", "vllm": "model"}


def _engine_path(kind) -> str:
    path = _BACKENDS.get(kind) or (kind if isinstance(kind, str) and ":" in kind else None)
    if path is None:
        raise EngineConfigError(f"unknown engine type {kind!r}; choose one of "
                                f"{sorted(_BACKENDS)} or give 'package.module:ClassName'")
    return path


def _load(kind) -> type[Engine]:
    module, cls = _engine_path(kind).split(":")
    try:
        engine_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise EngineConfigError(f"cannot load engine {kind!r}: {exc}") from None
    if not (isinstance(engine_cls, type) and issubclass(engine_cls, Engine)):
        raise EngineConfigError(f"engine {kind!r} is not a subclass of udfs.engines.Engine")
    return engine_cls


def check_config(config: dict | None) -> None:
    """Fail fast, on the driver, on a config no worker could build."""
    config = config or DEFAULT_ENGINE
    kind = config.get("type")
    if kind in _BACKENDS:  # built-ins import heavy libraries: leave that to the workers
        key = _LOCAL_MODEL_KEY.get(kind) or _MODEL_NAME_KEY.get(kind)
        value = config.get(key) if key else None
        if value is not None and not os.path.exists(value):
            from udfs.engines import models
            if key == _MODEL_NAME_KEY.get(kind) and models.is_known(value):
                models.check(value)  # the package is installed; converting is the worker's
            elif kind in _LOCAL_MODEL_KEY:
                hint = (f" (packaged models: {', '.join(sorted(models.MODELS))})"
                        if key == _MODEL_NAME_KEY.get(kind) and isinstance(value, str)
                        and models._looks_like_name(value) else "")
                raise EngineConfigError(
                    f"engine {kind!r}: model path not found: {value}{hint}")
    else:
        _load(kind)


def model_name(config: dict | None) -> str | None:
    """The model_name the engine `config` builds will have, without building it (None where
    only the built engine knows; see Engine.name_for)."""
    config = dict(config or DEFAULT_ENGINE)
    kind = config.pop("type", None)
    try:
        return _load(kind).name_for(config)
    except (KeyError, OSError) as exc:  # a missing option or path: building will say so
        raise EngineConfigError(f"engine {kind!r}: cannot name its model: {exc!r}") from None


def label_models(config: dict | None) -> list[str] | None:
    """The model names whose labels the engine `config` would reproduce (model_name first),
    or None where only the built engine knows its name."""
    name = model_name(config)
    if name is None:
        return None
    return _load(dict(config or DEFAULT_ENGINE).get("type")).same_labels(name)


def can_tag(config: dict | None) -> bool:
    """Whether the engine `config` builds scores multi-label attributes (implements
    Engine.tag), known from its class without building it."""
    engine_cls = _load(dict(config or DEFAULT_ENGINE).get("type"))
    return engine_cls.tag is not Engine.tag


def parse_engine(value: str | None) -> dict:
    """An --engine option: a type name, inline JSON, or a YAML/JSON file with a 'type' key."""
    if not value:
        return dict(DEFAULT_ENGINE)
    if value.lstrip().startswith("{"):
        try:
            config = json.loads(value)
        except json.JSONDecodeError as exc:
            raise EngineConfigError(f"--engine is not valid JSON: {exc}") from None
    elif Path(value).is_file():
        import yaml
        config = yaml.safe_load(Path(value).read_text())
    else:
        return {"type": value}
    if not isinstance(config, dict) or "type" not in config:
        raise EngineConfigError(f"engine config {value!r} must be a mapping with a 'type' key")
    return config


def build_engine(config: dict | None) -> Engine:
    config = dict(config or DEFAULT_ENGINE)
    kind = config.pop("type", None)
    engine_cls = _load(kind)
    key = _MODEL_NAME_KEY.get(kind)
    if key and isinstance(config.get(key), str):
        from udfs.engines import models
        if models.is_known(config[key]) and not os.path.exists(config[key]):
            config[key] = models.resolve(config[key])
    try:
        return engine_cls(**config)
    except TypeError as exc:
        raise EngineConfigError(f"bad options for engine {kind!r}: {exc}") from None


__all__ = ["Engine", "Labels", "EngineConfigError", "build_engine", "check_config",
           "parse_engine", "model_name", "can_tag", "DEFAULT_ENGINE"]
