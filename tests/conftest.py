"""Shared fixtures: one local SparkSession and one embedded engine per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "specs" / "movielens.yaml"

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's CPU build: 1 GiB of KV cache per engine (its default is 4), quiet logs
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def spec():
    from udfs.spec import load_spec
    return load_spec(SPEC_PATH)


@pytest.fixture(scope="session")
def kinds_spec():
    """One attribute of each kind: single (vibe), multi (genres), ordinal (intensity)."""
    from udfs.spec import load_spec
    return load_spec(ROOT / "specs" / "movielens_kinds.yaml")


@pytest.fixture(scope="session")
def embedding_engine():
    from udfs.engines import build_engine
    return build_engine({"type": "embedding"})


@pytest.fixture(scope="session")
def spark():
    from spark_jobs.session import get_spark
    session = get_spark("annofeat-tests", "local[2]", {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "64",
    })
    yield session
    session.stop()


@pytest.fixture(scope="session")
def items_small():
    """The first 60 MovieLens items, as the demo prepares them."""
    from spark_jobs.movielens import load_items
    return load_items().head(60).reset_index(drop=True)


from tests.redis_server import redis_server  # noqa: E402,F401  (session fixture)
from tests.tiny_llm import tiny_llm_dir  # noqa: E402,F401  (session fixture)
from tests.packaged_models import model_cache, smollm2_dir  # noqa: E402,F401  (session fixtures)
