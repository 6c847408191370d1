"""Per-Python-worker state: the GPU this worker is pinned to and its one engine.

Spark reuses Python workers across tasks (spark.python.worker.reuse=true, the default), so
the engine built here survives from task to task: a model loads once per worker, not once
per batch or task. A worker never holds two engines: asking for a different config closes the
old one first, which keeps one vLLM engine per GPU.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from udfs.engines import Engine, build_engine

log = logging.getLogger(__name__)

_engine: Engine | None = None
_engine_key: str | None = None
_CUDA_MODULES = ("torch.cuda", "vllm", "cupy")
# CPU engines that take a `threads` option: sized to the task's cores, so N concurrent
# workers do not each start one thread per machine core and oversubscribe the CPU.
_CPU_THREADED = {"embedding", "transformers", "student"}


def task_gpu_addresses() -> list[str]:
    """The GPU addresses Spark assigned to the running task (empty outside a GPU task)."""
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover - pyspark is a core dependency
        return []
    ctx = TaskContext.get()
    if ctx is None:
        return []
    gpu = ctx.resources().get("gpu")
    return list(gpu.addresses) if gpu is not None else []


def pin_gpu() -> str | None:
    """Point CUDA_VISIBLE_DEVICES at the task's GPU(s), before any CUDA library is imported.

    Returns the pinned value, or None when the task has no GPU (CPU engines, local mode).
    """
    addresses = task_gpu_addresses()
    if not addresses:
        return None
    value = ",".join(addresses)
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current != value and any(m in sys.modules for m in _CUDA_MODULES):
        # CUDA reads the variable once, at initialisation: changing it now would be a lie.
        raise RuntimeError(
            f"task was given GPU {value} but this worker already initialised CUDA on "
            f"{current!r}; run one task per GPU (spark.task.resource.gpu.amount=1)")
    os.environ["CUDA_VISIBLE_DEVICES"] = value
    return value


def task_cpus() -> int | None:
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover
        return None
    ctx = TaskContext.get()
    return ctx.cpus() if ctx is not None else None


def effective_config(config: dict | None) -> dict:
    """The config as built in this worker: CPU engines get threads = the task's cores."""
    config = dict(config or {"type": "embedding"})
    cpus = task_cpus()
    if config.get("type") in _CPU_THREADED and "threads" not in config and cpus:
        config["threads"] = cpus
    return config


def get_engine(config: dict | None) -> Engine:
    """This worker's engine for `config`, built on first use and then reused."""
    global _engine, _engine_key
    key = json.dumps(config or {}, sort_keys=True, default=str)
    if _engine is None or _engine_key != key:
        if _engine is not None:
            _engine.close()
            _engine = None
        pinned = pin_gpu()
        log.info("building engine %s (pid %d, gpu %s)", key, os.getpid(), pinned)
        _engine = build_engine(effective_config(config))
        _engine_key = key
    return _engine
