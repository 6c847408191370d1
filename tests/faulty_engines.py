"""Engines that fail on purpose, loaded as plugins ("tests.faulty_engines:Name").

The _Wrapping ones wrap the real embedding engine, so the rows that do get through are real
annotations; OutOfMemory and GpuProbe stand for a GPU engine whose GPU is full and for any
engine built in a GPU task.
"""
from __future__ import annotations

import os
import time

from udfs.engines.base import Engine
from udfs.engines.embedding import EmbeddingEngine


class _Wrapping(Engine):
    def __init__(self, **kwargs):
        self.inner = EmbeddingEngine(**kwargs)
        self.model_name = self.inner.model_name

    def classify(self, texts, attribute):
        return self.inner.classify(texts, attribute)

    def caption(self, texts, caption):
        return self.inner.caption(texts, caption)


class CrashFirstAttempt(_Wrapping):
    """Kills its Python worker during the first attempt of partition 0's task."""

    def classify(self, texts, attribute):
        from pyspark import TaskContext
        ctx = TaskContext.get()
        if ctx is not None and ctx.partitionId() == 0 and ctx.attemptNumber() == 0:
            os._exit(13)
        return super().classify(texts, attribute)


class RaiseOnKeyword(_Wrapping):
    """Raises for any batch holding a text with the keyword (a model that chokes on input)."""

    def classify(self, texts, attribute):
        if any("EXPLODE" in t for t in texts):
            raise RuntimeError("engine choked on this input")
        return super().classify(texts, attribute)


class Slow(_Wrapping):
    """Sleeps before every batch, so a job can be killed while it runs."""

    def classify(self, texts, attribute):
        time.sleep(float(os.environ.get("ANNOFEAT_TEST_SLEEP", "2")))
        return super().classify(texts, attribute)


class OutOfMemory(Engine):
    """A GPU engine whose GPU is full: every batch raises torch's CUDA out-of-memory error.

    Each call appends a line to `calls_file`, so a test can count engine calls across the
    Python workers Spark runs.
    """
    model_name = "oom"

    def __init__(self, calls_file: str, **_):
        self.calls_file = calls_file

    def _fail(self, texts):
        import torch
        with open(self.calls_file, "a") as f:
            f.write(f"{os.getpid()} {len(texts)}\n")
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "79.11 GiB of which 1.06 GiB is free.")

    def classify(self, texts, attribute):
        self._fail(texts)

    def caption(self, texts, caption):
        self._fail(texts)


class GpuProbe(Engine):
    """A CPU engine that records the CUDA_VISIBLE_DEVICES it was built under and its closes."""
    model_name = "gpu-probe"
    built: list["GpuProbe"] = []

    def __init__(self, name: str = "probe", threads: int | None = None):
        self.name = name
        self.cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.closed = False
        GpuProbe.built.append(self)

    def classify(self, texts, attribute):
        from udfs.engines.base import Labels
        return Labels([attribute.labels[0]] * len(texts), [1.0] * len(texts))

    def caption(self, texts, caption):
        return [self.cuda_visible_devices or ""] * len(texts)

    def close(self):
        self.closed = True
