"""The vLLM engine's GPU-free logic, fed outputs shaped like vLLM's, and its import guard.

The fake outputs mirror vllm.outputs.RequestOutput / CompletionOutput and vllm.logprobs.Logprob
(per generated token: {token_id: Logprob(logprob, rank, decoded_token)}, the sampled token
always included). They come from a small deterministic "model": each label has a weight w from
a hash of the prompt, answers are spelled in 3-character tokens, and at each step half the
probability goes to the tokens the choice grammar allows (in proportion to the weights of the
labels behind them), half to an off-grammar token. The true probability of a label among the
labels is then w_label / sum(w).
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass, field

import pytest

from udfs.engines import build_engine
from udfs.engines.prompts import MalformedOutput, classify_request
from udfs.engines.vllm import VLLMEngine, parse_choice, sampling_params


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = "stop"


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class Vocab(dict):
    """Token string -> id, growing as tokens are seen."""

    def __missing__(self, token: str) -> int:
        self[token] = len(self) + 10
        return self[token]


def weights(prompt: str, options: list[str]) -> dict[str, float]:
    return {c: 1 + int(hashlib.sha256((prompt + c).encode()).hexdigest()[:6], 16) % 997
            for c in options}


def fake_output(prompt: str, options: list[str], chosen: str | None = None,
                split_ids: bool = False) -> RequestOutput:
    """What vLLM returns for a constrained choice; split_ids spreads every token's mass
    over two ids that decode to the same string (as byte-level vocabularies can)."""
    vocab = Vocab()
    w = weights(prompt, options)
    chosen = chosen or max(options, key=w.get)
    token_ids, steps, prefix, cumulative = [], [], "", 0.0
    for tok in (chosen[i:i + 3] for i in range(0, len(chosen), 3)):
        alive = [c for c in options if c.startswith(prefix)]
        probs = {"!?": 0.5}
        for c in alive:
            nxt = c[len(prefix):len(prefix) + 3]
            probs[nxt] = probs.get(nxt, 0.0) + 0.5 * w[c] / sum(w[a] for a in alive)
        step = {}
        for rank, (t, p) in enumerate(sorted(probs.items(), key=lambda kv: -kv[1]), 1):
            if split_ids:
                step[vocab[t]] = Logprob(math.log(p * 0.25), rank, t)
                step[vocab[t + "#alias"]] = Logprob(math.log(p * 0.75), rank, t)
            else:
                step[vocab[t]] = Logprob(math.log(p), rank, t)
        token_ids.append(vocab[tok])
        steps.append(step)
        cumulative += step[vocab[tok]].logprob
        prefix += tok
    return RequestOutput("0", prompt, [CompletionOutput(0, chosen, token_ids, cumulative, steps)])


@pytest.fixture
def vibe(spec):
    return spec.attributes["vibe"]


def options_of(attribute) -> list[str]:
    return [" " + lab for lab in attribute.labels]


def test_parse_choice_recovers_label_and_true_probability(vibe):
    for i in range(8):
        prompt = vibe.render(f"Movie {i}")
        w = weights(prompt, options_of(vibe))
        label, conf = parse_choice(fake_output(prompt, options_of(vibe)), vibe)
        assert label in vibe.labels and " " + label == max(w, key=w.get)
        assert conf == pytest.approx(w[" " + label] / sum(w.values()), rel=1e-9)


def test_label_probabilities_sum_to_one_even_with_shared_first_tokens(vibe):
    # ' thrilling' and ' thoughtful' share their first token ' th'
    prompt = vibe.render("Heat (1995)")
    probs = [parse_choice(fake_output(prompt, options_of(vibe), chosen=c), vibe)[1]
             for c in options_of(vibe)]
    assert sum(probs) == pytest.approx(1.0, rel=1e-9) and all(0 < p < 1 for p in probs)


def test_token_ids_decoding_alike_are_merged(vibe):
    prompt = vibe.render("Alien (1979)")
    plain = parse_choice(fake_output(prompt, options_of(vibe)), vibe)
    split = parse_choice(fake_output(prompt, options_of(vibe), split_ids=True), vibe)
    assert split[0] == plain[0] and split[1] == pytest.approx(plain[1], rel=1e-9)


def test_malformed_outputs_raise(vibe):
    prompt = vibe.render("Up")
    off = fake_output(prompt, [" popcorn"])
    with pytest.raises(MalformedOutput, match="not one of"):
        parse_choice(off, vibe)
    missing = fake_output(prompt, options_of(vibe))
    missing.outputs[0].logprobs = None
    with pytest.raises(MalformedOutput, match="no logprobs"):
        parse_choice(missing, vibe)
    undecoded = fake_output(prompt, options_of(vibe))
    for step in undecoded.outputs[0].logprobs:
        for lp in step.values():
            lp.decoded_token = None
    with pytest.raises(MalformedOutput, match="decoded"):
        parse_choice(undecoded, vibe)
    respelled = fake_output(prompt, options_of(vibe))
    chosen = respelled.outputs[0].text.strip()
    respelled.outputs[0].text = " " + next(lab for lab in vibe.labels if lab != chosen)
    with pytest.raises(MalformedOutput, match="does not spell"):
        parse_choice(respelled, vibe)


@dataclass
class StructuredOutputsParams:  # the fields of vllm.sampling_params.StructuredOutputsParams
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


@dataclass
class SamplingParams:  # the subset of vllm.SamplingParams the engine sets
    temperature: float = 1.0
    max_tokens: int | None = 16
    logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None


def test_classify_sampling_params(vibe):
    params = sampling_params(classify_request(vibe, 20), SamplingParams, StructuredOutputsParams)
    assert isinstance(params.structured_outputs, StructuredOutputsParams)
    assert params.structured_outputs.choice == options_of(vibe)
    assert params.temperature == 0.0 and params.logprobs == 20
    # long enough for every label (tokens cover at least one byte each)
    assert params.max_tokens > max(len(o.encode()) for o in options_of(vibe))


def test_caption_sampling_params(spec):
    from udfs.engines.prompts import caption_request
    params = sampling_params(caption_request(spec.caption), SamplingParams,
                             StructuredOutputsParams)
    assert params.max_tokens == spec.caption.max_tokens and params.temperature == 0.0
    assert params.structured_outputs is None


def test_without_vllm_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now fails, as on a CPU node
    for make in (lambda: VLLMEngine("some/model"),
                 lambda: build_engine({"type": "vllm", "model": "some/model"})):
        with pytest.raises(ImportError, match=r"GPU nodes.*install the `vllm` extra"):
            make()


@pytest.mark.skipif(not os.environ.get("ANNOFEAT_VLLM_MODEL"),
                    reason="GPU node test: set ANNOFEAT_VLLM_MODEL to a local model directory")
def test_real_vllm_engine(spec):  # pragma: no cover - needs a GPU and vLLM
    engine = build_engine({"type": "vllm", "model": os.environ["ANNOFEAT_VLLM_MODEL"],
                           "gpu_memory_utilization": 0.5, "max_model_len": 2048})
    try:
        texts = ["Alien (1979). Genres: Horror, Sci-Fi", "Toy Story (1995). Genres: Animation"]
        for attribute in spec.attributes.values():
            out = engine.classify(texts, attribute)
            assert set(out.labels) <= set(attribute.labels)
            assert all(0 < c <= 1 for c in out.confidences)
        assert all(isinstance(c, str) for c in engine.caption(texts, spec.caption))
    finally:
        engine.close()
