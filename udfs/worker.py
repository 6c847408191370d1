"""Per-Python-worker state: the GPU this worker is pinned to and its one engine.

Spark reuses Python workers across tasks (spark.python.worker.reuse=true, the default), so
the engine built here survives from task to task: a model loads once per worker, not once
per batch or task. A worker never holds two engines: asking for a different config closes the
old one first, which keeps one vLLM engine per GPU.

A reused worker can be handed a task on another GPU (an executor that owns several GPUs gives
each task whichever address is free). The engine is therefore keyed on (config, the task's GPU
addresses): a task on another GPU closes the engine and builds it again on that GPU. CUDA reads
CUDA_VISIBLE_DEVICES once, when it initialises in a process; after that, re-pinning would be a
lie, so only then does the worker refuse (GpuPinningError). Whether CUDA is initialised is
asked of CUDA itself (`cuda_initialized`), not guessed from loaded modules: `import torch`
loads torch.cuda without touching a GPU, and a CPU engine's worker may switch GPUs freely.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import sys

from udfs.engines import Engine, build_engine

log = logging.getLogger(__name__)

# slot -> ((config, GPU addresses), engine). "main" annotates (routing swaps head and tail
# engines in it: never two large models at once); "embed" holds the semantic-ID embedder
# when it is another engine than the main one (a small CPU/GPU encoder beside an LLM).
_slots: dict[str, tuple[tuple[str, tuple[str, ...]], Engine]] = {}
MAIN, EMBED = "main", "embed"
_exit_hook = False
# CPU engines that take a `threads` option: sized to the task's cores, so N concurrent
# workers do not each start one thread per machine core and oversubscribe the CPU.
_CPU_THREADED = {"embedding", "transformers", "student"}
_CUDA_ERROR_NOT_INITIALIZED = 3


class GpuPinningError(RuntimeError):
    """A task's GPU differs from the one CUDA already initialised on in this worker."""


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


def _driver_initialized() -> bool:
    """Whether this process called cuInit: the CUDA driver answers CUDA_ERROR_NOT_INITIALIZED
    to any call made before it. RTLD_NOLOAD only finds a libcuda already loaded, so asking
    neither loads the driver nor initialises it (no libcuda loaded: no CUDA in this process)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        count = ctypes.c_int()
        return libcuda.cuDeviceGetCount(ctypes.byref(count)) != _CUDA_ERROR_NOT_INITIALIZED
    except (OSError, AttributeError):
        return False


def cuda_initialized() -> bool:
    """Whether CUDA is initialised in this process, which freezes its visible devices.

    torch.cuda.is_initialized() is torch's own answer (vLLM asks the same, in
    vllm/utils: cuda_is_initialized); the driver is asked too, because
    torch.cuda.is_available() initialises the driver without torch counting it.
    """
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return True
    except AttributeError:  # a torch without CUDA support
        pass
    return _driver_initialized()


def pin_gpu(addresses: list[str] | None = None) -> str | None:
    """Point CUDA_VISIBLE_DEVICES at the task's GPU(s) (by default the running task's).

    Returns the pinned value, or None when the task has no GPU (CPU engines, local mode).
    Raises GpuPinningError when CUDA is already initialised in this process on other GPUs.
    """
    addresses = task_gpu_addresses() if addresses is None else list(addresses)
    if not addresses:
        return None
    value = ",".join(addresses)
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current != value and cuda_initialized():
        # CUDA read the variable when it initialised: changing it now would be a lie.
        raise GpuPinningError(
            f"this task was given GPU {value}, but this Python worker (pid {os.getpid()}) "
            f"already initialised CUDA with CUDA_VISIBLE_DEVICES={current!r}, and CUDA "
            "cannot move to another GPU in the same process; give each executor one GPU "
            "(spark.executor.resource.gpu.amount=1) or use an engine that runs CUDA in a "
            "child process (vllm)")
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


def close_engine(slot: str | None = None) -> None:
    """Close this worker's engine in `slot`, or every engine (also run at interpreter exit)."""
    for name in [slot] if slot else list(_slots):
        held = _slots.pop(name, None)
        if held is not None:
            held[1].close()


def get_engine(config: dict | None, slot: str = MAIN) -> Engine:
    """This worker's engine for `config` on the task's GPUs, built on first use, then reused.

    One engine per slot: a new config in a slot closes the slot's old engine; a task on
    other GPUs closes every engine first (each is rebuilt where the task runs)."""
    global _exit_hook
    addresses = tuple(task_gpu_addresses())
    key = (json.dumps(config or {}, sort_keys=True, default=str), addresses)
    # the embedder may be the main engine itself, and the main engine the embedder the
    # semantic-ID fit built (its text-embedding cache then serves the annotation too)
    for name in (slot, MAIN, EMBED):
        held = _slots.get(name)
        if held is not None and held[0] == key:
            return held[1]
    pinned = pin_gpu(list(addresses))  # may refuse: then the old engines stay as they were
    if any(k[1] != addresses for k, _ in _slots.values()):
        close_engine()
    close_engine(slot)
    log.info("building engine %s in slot %s (pid %d, gpu %s)", key[0], slot, os.getpid(), pinned)
    engine = build_engine(effective_config(config))
    _slots[slot] = (key, engine)
    if not _exit_hook:
        # A Python worker that exits normally closes its engine. PySpark's daemon ends
        # workers with os._exit or SIGKILL, which skip this: the vllm engine guards its
        # engine-core process against that itself (udfs.engines.vllm).
        atexit.register(close_engine)
        _exit_hook = True
    return engine
