"""Engines that fail on purpose, loaded as plugins ("tests.faulty_engines:Name").

Each wraps the real embedding engine, so the rows that do get through are real annotations.
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
