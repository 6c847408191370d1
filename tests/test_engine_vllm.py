"""The vLLM engine, driven through what vLLM returns, built from real components.

vLLM needs a GPU, so `tests/vllm_double.py` stands in for the `vllm` package: it runs a real
tiny causal LM with transformers and answers LLM.generate the way vLLM does (raw logprobs,
per-id decoded tokens, prompt logprobs, a choice grammar, an engine-core child process). The
model is built here twice, around two locally trained tokenizers of different families: a
byte-level BPE and a SentencePiece-style Unigram with the "▁" marker, whose word-initial
tokens lose their leading space when vLLM decodes them one by one. The real VLLMEngine code
runs on top; its confidences must be the transformers engine's label probabilities for the
same model, prompts and labels.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests import vllm_double
from tests.tiny_llm import build_tiny_llm
from udfs.engines import build_engine
from udfs.engines.hf import TransformersEngine
from udfs.engines.prompts import MalformedOutput, label_probabilities
from udfs.engines.vllm import VLLMEngine, forced_logprob, label_steps

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "Alien (1979). Genres: Horror, Sci-Fi",
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
    "Up",
    "Casablanca (1942). Genres: Drama, Romance, War",
    "Ω ☃ unusual → text with ümlauts",
]
FAMILIES = ["bpe", "unigram"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    # short pieces: labels span several tokens and " thrilling" / " thoughtful" share one
    return {family: build_tiny_llm(tmp_path_factory.mktemp(f"tiny_{family}"), family=family,
                                   max_token_length=4) for family in FAMILIES}


@pytest.fixture
def vllm(monkeypatch):
    vllm_double.install(monkeypatch)
    engines: list[VLLMEngine] = []

    def make(model: Path, **options) -> VLLMEngine:
        engine = build_engine({"type": "vllm", "model": str(model), **options})
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
    vllm_double.EngineCoreClient.kill_leftovers()


def test_the_double_decodes_ids_one_by_one_like_vllm(models, vllm, spec):
    """Why decoded strings cannot be trusted: vLLM's per-id decoding of a SentencePiece
    word-initial token drops its leading space, so " dark" never appears as a token text."""
    engine = vllm(models["unigram"])
    tokenizer = engine.tokenizer
    prompt = spec.attributes["vibe"].render("Up")
    word = tokenizer(prompt + " dark").input_ids[len(tokenizer(prompt).input_ids)]
    assert tokenizer.convert_ids_to_tokens(word).startswith("▁")
    params = vllm_double.SamplingParams(temperature=0.0, max_tokens=1, logprobs=0,
                                        allowed_token_ids=[word])
    (out,) = engine.llm.generate([{"prompt_token_ids": tokenizer(prompt).input_ids}], params)
    assert out.outputs[0].logprobs[0][word].decoded_token == tokenizer.decode([word])
    assert not out.outputs[0].logprobs[0][word].decoded_token.startswith(" ")


@pytest.mark.parametrize("family", FAMILIES)
def test_confidences_are_the_transformers_label_probabilities(models, vllm, spec, family):
    engine = vllm(models[family])
    reference = TransformersEngine(str(models[family]), batch_size=4)
    try:
        for attribute in spec.attributes.values():
            out = engine.classify(TEXTS, attribute)
            expected = label_probabilities(reference.label_loglik(TEXTS, attribute))
            assert out.labels == [attribute.labels[i] for i in expected.argmax(axis=1)]
            np.testing.assert_allclose(out.confidences, expected.max(axis=1), atol=1e-5)
            # every label's probability, not only the winner's
            np.testing.assert_allclose(
                label_probabilities(engine.label_loglik(TEXTS, attribute)), expected, atol=1e-5)
    finally:
        reference.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_one_generate_call_of_forced_single_tokens(models, vllm, spec, family):
    engine = vllm(models[family])
    attribute = spec.attributes["vibe"]
    engine.classify(TEXTS[:2], attribute)
    llm = engine.llm
    assert llm.generate_calls == 1
    tokenizer = engine.tokenizer
    for ids, params in llm.requests:
        assert params.max_tokens == 1 and params.logprobs == 0 and params.temperature == 0.0
        assert len(params.allowed_token_ids) == 1 and params.detokenize is False
        assert params.structured_outputs is None
    # one request per label token, shared prefixes asked once
    expected = set()
    for text in TEXTS[:2]:
        prompt = attribute.render(text)
        context = tokenizer(prompt).input_ids
        for label in attribute.labels:
            full = tokenizer(f"{prompt} {label}").input_ids
            assert full[:len(context)] == context  # the labels are tokenised in context
            expected |= {(tuple(full[:i]), full[i]) for i in range(len(context), len(full))}
    asked = [(tuple(ids), params.allowed_token_ids[0]) for ids, params in llm.requests]
    assert len(asked) == len(set(asked)) and set(asked) == expected


def test_label_steps():
    assert label_steps([1, 2], [[5], [6, 7]]) == [[((1, 2), 5)], [((1, 2), 6), ((1, 2, 6), 7)]]


def forced_output(token_ids, logprobs):
    completion = vllm_double.CompletionOutput(0, "", token_ids, None, logprobs)
    return vllm_double.RequestOutput("0", None, [1, 2], None, [completion])


def test_a_missing_probability_is_an_error_never_one():
    Logprob = vllm_double.Logprob
    assert forced_logprob(forced_output([7], [{7: Logprob(-1.5, 3)}]), 7) == -1.5
    with pytest.raises(MalformedOutput, match="only token 7 was allowed"):
        forced_logprob(forced_output([8], [{8: Logprob(-0.1, 1)}]), 7)
    with pytest.raises(MalformedOutput, match="no logprobs"):
        forced_logprob(forced_output([7], None), 7)
    with pytest.raises(MalformedOutput, match="no finite logprob"):
        forced_logprob(forced_output([7], [{8: Logprob(-0.1, 1)}]), 7)
    with pytest.raises(MalformedOutput, match="no finite logprob"):  # a masked distribution
        forced_logprob(forced_output([7], [{7: Logprob(float("-inf"), 1)}]), 7)


def test_logprobs_must_stay_raw(models, vllm):
    with pytest.raises(ValueError, match="raw log-probabilities"):
        vllm(models["bpe"], engine_args={"logprobs_mode": "processed_logprobs"})


def test_captions_are_greedy_generations(models, vllm, spec):
    engine = vllm(models["unigram"])
    reference = TransformersEngine(str(models["unigram"]))
    try:
        assert engine.caption(TEXTS[:2], spec.caption) == reference.caption(TEXTS[:2], spec.caption)
    finally:
        reference.close()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return gone(pid)


def test_close_shuts_the_engine_core_down(models, vllm):
    engine = vllm(models["bpe"])
    core = engine.llm.llm_engine.engine_core
    before = vllm_double.EngineCoreClient.shutdowns
    engine.close()
    assert vllm_double.EngineCoreClient.shutdowns == before + 1
    assert wait_gone(core.proc.pid, 5)
    assert engine.llm is None
    engine.close()  # twice is harmless


# A Python worker as PySpark ends it: SIGKILL (a killed task) or os._exit (after any task
# error, or when a non-reused worker finishes): no atexit, no finaliser runs.
WORKER = """
import os, sys, time
from tests import vllm_double
sys.modules.update(vllm_double.modules())
from udfs.engines import build_engine
engine = build_engine({"type": "vllm", "model": sys.argv[1]})
print(engine.llm.llm_engine.engine_core.proc.pid, flush=True)
if sys.stdin.readline().strip() == "exit":
    os._exit(1)
time.sleep(600)
"""


@pytest.mark.parametrize("death", ["SIGKILL", "os._exit"])
def test_engine_core_dies_with_its_worker(models, death):
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(models["bpe"])], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "ANNOFEAT_REAP_GRACE": "2"})
    core = None
    try:
        core = int(worker.stdout.readline())
        assert not gone(core)
        if death == "SIGKILL":
            worker.send_signal(signal.SIGKILL)
        else:
            worker.stdin.write("exit\n")
            worker.stdin.flush()
        worker.wait(timeout=30)
        assert wait_gone(core, 15), "the engine-core process outlived its worker"
    finally:
        if worker.poll() is None:
            worker.kill()
        if core is not None and not gone(core):
            os.kill(core, signal.SIGKILL)


def test_without_vllm_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now fails, as on a CPU node
    for make in (lambda: VLLMEngine("some/model"),
                 lambda: build_engine({"type": "vllm", "model": "some/model"})):
        with pytest.raises(ImportError, match=r"GPU nodes.*install the `vllm` extra"):
            make()


def _real_vllm() -> bool:  # pragma: no cover - GPU nodes only
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _real_vllm(), reason="GPU node test: needs a CUDA GPU and vLLM")
def test_real_vllm_engine(spec, tmp_path):  # pragma: no cover - needs a GPU and vLLM
    """On a GPU node: the real vLLM engine on ANNOFEAT_VLLM_MODEL (or a tiny Llama built
    here, heads of 64 for vLLM's attention kernels) agrees with the transformers engine on
    the same model, and close() leaves no engine-core process behind."""
    model = os.environ.get("ANNOFEAT_VLLM_MODEL") or str(build_tiny_llm(
        tmp_path / "tiny", family="unigram", max_token_length=4, hidden_size=128))
    engine = build_engine({"type": "vllm", "model": model, "gpu_memory_utilization": 0.5,
                           "max_model_len": 2048, "engine_args": {"dtype": "float32"}})
    children = psutil.Process().children(recursive=True)
    reference = TransformersEngine(model, device="cuda", dtype="float32")
    try:
        for attribute in spec.attributes.values():
            out = engine.classify(TEXTS, attribute)
            assert set(out.labels) <= set(attribute.labels)
            expected = label_probabilities(reference.label_loglik(TEXTS, attribute))
            np.testing.assert_allclose(out.confidences, expected.max(axis=1), atol=1e-3)
        assert all(isinstance(c, str) for c in engine.caption(TEXTS, spec.caption))
    finally:
        engine.close()
        reference.close()
    assert all(wait_gone(p.pid, 30) for p in children)
