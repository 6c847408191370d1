"""The OpenAI-compatible engine against a real `vllm serve` (vLLM's CPU build) on tiny models.

Servers (tests/vllm_server.py) run the tiny Llama of tests/tiny_llm.py in float32 with
4-character pieces and 64-wide heads, so labels span several tokens and share first tokens;
the engine's confidences must equal the transformers engine's label probabilities within
1e-4, in both request shapes (`scoring: nodes`, vLLM's logprob_token_ids on token-id prompts,
and `scoring: prompt_logprobs`), and its captions the transformers engine's greedy captions.
One server per tokenizer family: the byte-level BPE one serves the whole module; the
SentencePiece-style Unigram one runs for its agreement test only (each start costs ~30 s).

What the real server is made to do: it is killed and started again on the same port in the
middle of a batch (retries with backoff carry the batch over), it answers a real HTTP 400 to
an invalid request, and it answers without log-probabilities or without token-id keys when
the request does not ask for them.

What needs the proxy (`FaultProxy`, a small HTTP server in front of the real one, which
forwards every request and only alters what a marker in the item text asks for): behaviours
a healthy vLLM never shows on demand. 429 ([busy:K], first attempt of each request; vLLM has
no rate limit), 500 once ([flaky:K]) or always ([down]) (vLLM answers 500 only when its engine
is broken, and then for every request), a reply slower than the client's timeout ([slow],
held back by the proxy), invalid JSON ([garbage], the real reply cut short), a position
without its token's log-probability ([gap], removed from the real reply). Markers that only
change the forwarded request, so vLLM itself produces the reply: [nologprobs] drops the
log-probability fields, [strkeys] drops return_tokens_as_token_ids (vLLM then keys by decoded
string), [noids] drops return_token_ids (an older server), [bad] sends a negative max_tokens
(vLLM's own 400). Token-id prompts are read back with the server's /detokenize to find the
markers.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.tiny_llm import build_tiny_llm
from tests.vllm_server import VLLMServer
from udfs.annotator import annotate_texts, caption_texts
from udfs.engines import build_engine, model_name
from udfs.engines.hf import TransformersEngine
from udfs.engines.openai import (RequestFailed, default_tokenize_url, group_nodes,
                                 node_request, parse_forced_logprobs, parse_node_logprobs,
                                 parse_prompt_logprobs,
                                 parse_tokenize, reply_usage, tokenize_request)
from udfs.engines.prompts import MalformedOutput, label_continuations, label_probabilities

SLOW_S = 12.0  # the proxy holds a [slow] reply back this long; the client waits 4 s
HOLD_S = 20.0  # the longest a held request waits for the others (under the client timeout)
SCORINGS = ["nodes", "prompt_logprobs"]
TEXTS = [
    "Alien (1979). Genres: Horror, Sci-Fi",
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
    "Up",
    "Casablanca (1942). Genres: Drama, Romance, War",
    "Ω ☃ unusual → text with ümlauts",
    "Heat (1995). Genres: Action, Crime, Thriller",
]


# -- pure functions: no server -------------------------------------------------------------

def test_node_request_asks_for_exactly_the_ids_after_token_id_prompts():
    body = node_request([(1, 5, 9), (1, 5, 9, 7)], (7, 3))
    assert body == {"prompt": [[1, 5, 9], [1, 5, 9, 7]], "max_tokens": 1, "temperature": 0.0,
                    "logprobs": 2, "logprob_token_ids": [7, 3],
                    "return_tokens_as_token_ids": True}
    assert "prompt_logprobs" not in body  # it would make vLLM skip its prefix cache
    # a forced child: generated first (allowed_token_ids), the ids scored after it as well
    assert node_request([(1, 5)], (7, 3), forced=7) == {
        "prompt": [[1, 5]], "max_tokens": 2, "temperature": 0.0, "logprobs": 2,
        "logprob_token_ids": [7, 3], "return_tokens_as_token_ids": True,
        "allowed_token_ids": [7]}


def test_group_nodes_keeps_each_request_within_vllms_id_limit():
    nodes = [((1,), (2, 3)), ((1, 2), (4,)), ((1, 3), (5, 6)), ((1, 2, 4), (2,))]
    assert group_nodes(nodes) == [(nodes, [2, 3, 4, 5, 6])]
    assert group_nodes(nodes, max_ids=3) == [(nodes[:2], [2, 3, 4]), (nodes[2:], [5, 6, 2])]
    # more children after one prefix than one request may ask for: asked in parts
    assert group_nodes([((1,), tuple(range(5)))], max_ids=4) == [
        ([((1,), (0, 1, 2, 3))], [0, 1, 2, 3]), ([((1,), (4,))], [4])]


def reply_of(*positions):
    return {"choices": [{"index": i, "text": "x", "logprobs": {
        "tokens": ["token_id:4"], "token_logprobs": [-0.5], "top_logprobs": [position]}}
        for i, position in enumerate(positions)]}


def test_parse_node_logprobs_reads_by_id():
    reply = reply_of({"token_id:4": -0.5, "token_id:7": -2.0, "token_id:3": -1.0},
                     {"token_id:4": -0.1, "token_id:7": -3.0, "token_id:3": -4.0})
    assert parse_node_logprobs(reply, [(7, 3), (3,)]) == [{7: -2.0, 3: -1.0}, {3: -4.0}]
    reply["choices"].reverse()  # choices are matched to prompts by index
    assert parse_node_logprobs(reply, [(7,), (7,)]) == [{7: -2.0}, {7: -3.0}]
    with pytest.raises(MalformedOutput, match="no finite logprob for token 9"):
        parse_node_logprobs(reply, [(7,), (9,)])
    with pytest.raises(MalformedOutput, match="3 prompts but choices"):
        parse_node_logprobs(reply, [(7,), (7,), (7,)])
    clamped = reply_of({"token_id:7": -9999.0})  # vLLM's JSON for -inf
    with pytest.raises(MalformedOutput, match="no finite logprob for token 7"):
        parse_node_logprobs(clamped, [(7,)])
    with pytest.raises(MalformedOutput, match="not keyed by token id"):
        parse_node_logprobs(reply_of({" dark": -1.0}), [(7,)])
    for bad in ({"choices": [{"index": 0, "text": "x", "logprobs": None}]}, {"choices": []},
                "nope", {"choices": [{"index": 0, "text": "x",
                                      "logprobs": {"top_logprobs": []}}]}):
        with pytest.raises(MalformedOutput):
            parse_node_logprobs(bad, [(7,)])


def test_parse_forced_logprobs_reads_both_steps():
    def reply(tokens, *steps):
        return {"choices": [{"index": 0, "text": "x", "logprobs": {
            "tokens": tokens, "token_logprobs": [-0.5] * len(tokens),
            "top_logprobs": list(steps)}}]}
    first = {"token_id:7": -2.0, "token_id:3": -1.0}
    second = {"token_id:7": -0.5, "token_id:3": -6.0, "token_id:8": -3.0}
    ok = reply(["token_id:7", "token_id:7"], first, second)
    assert parse_forced_logprobs(ok, [7, 3], 7, [8, 3]) == ({7: -2.0, 3: -1.0}, {8: -3.0, 3: -6.0})
    for bad in (reply(["token_id:3", "token_id:7"], first, second),  # not the forced token
                reply(["token_id:7"], first)):  # no second step
        with pytest.raises(MalformedOutput):
            parse_forced_logprobs(bad, [7, 3], 7, [8])


def test_parse_tokenize_and_its_url():
    assert tokenize_request("a b") == {"prompt": "a b", "add_special_tokens": True}
    assert parse_tokenize({"count": 2, "max_model_len": 512, "tokens": [1, 2]}) == [1, 2]
    for bad in ({"tokens": "12"}, {"count": 2}, [1, 2], {"tokens": [1, "2"]}):
        with pytest.raises(MalformedOutput, match="/tokenize"):
            parse_tokenize(bad)
    assert default_tokenize_url("http://h:8000/v1/") == "http://h:8000/tokenize"
    assert default_tokenize_url("http://h/api") == "http://h/api/tokenize"


def test_parse_prompt_logprobs_reads_by_id():
    reply = {"choices": [{"text": "x", "prompt_token_ids": [1, 5, 9],
                          "prompt_logprobs": [None, {"5": {"logprob": -2.0, "rank": 4},
                                                     "3": {"logprob": -0.5, "rank": 1}},
                                              {"9": {"logprob": -1.0, "rank": 1}}]}]}
    assert parse_prompt_logprobs(reply) == [(1, None), (5, -2.0), (9, -1.0)]
    reply["choices"][0]["prompt_logprobs"][2] = {"3": {"logprob": -0.1, "rank": 1}}
    with pytest.raises(MalformedOutput, match="no logprob for prompt token 9"):
        parse_prompt_logprobs(reply)


def test_reply_usage_counts_tokens():
    usage = {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41,
             "prompt_tokens_details": {"cached_tokens": 32}}
    assert reply_usage({"usage": usage}) == (40, 32, 1)
    usage["prompt_tokens_details"] = None  # a server without --enable-prompt-tokens-details
    assert reply_usage({"usage": usage}) == (40, 0, 1)
    assert reply_usage({}) == reply_usage("x") == reply_usage({"usage": "?"}) == (0, 0, 0)


def test_an_unknown_scoring_is_refused():
    with pytest.raises(ValueError, match="scoring must be one of"):
        build_engine({"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                      "scoring": "guess"})


def test_a_chat_part_is_a_clear_row_error_before_any_request(spec):
    """The server's chat template is not the engine's to read: chat: true says so per row,
    without sending a request (the URL below has no server)."""
    import dataclasses
    engine = build_engine({"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                           "max_retries": 0})
    texts = pd.Series(["Heat (1995)", "Up"])
    out = annotate_texts(engine, dataclasses.replace(spec.attributes["vibe"], chat=True), texts)
    assert out["label"].isna().all()
    assert out["error"].str.contains("chat template .chat: true. but openai:m has no local "
                                     "tokenizer").all()
    caps = caption_texts(engine, dataclasses.replace(spec.caption, chat=True), texts)
    assert caps["caption"].isna().all() and caps["error"].str.contains("chat: true").all()
    engine.close()


# -- the real server, and a fault proxy in front of it ---------------------------------------

class FaultProxy:
    """Forwards to the real server; a marker in the (detokenised) prompt alters the exchange."""

    def __init__(self, upstream: VLLMServer):
        self.upstream = upstream
        self.client = httpx.Client(timeout=120)
        self.lock = threading.Condition()
        self.detok: dict[tuple[int, ...], str] = {}
        self.reset()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with proxy.lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                    proxy.lock.notify_all()
                    # hold: wait for that many in flight at once, so a loaded machine's
                    # late thread start cannot pass for a concurrency bound
                    proxy.lock.wait_for(lambda: proxy.max_in_flight >= proxy.hold,
                                        timeout=HOLD_S)
                try:
                    time.sleep(proxy.delay)
                    status, payload = proxy.handle(self.path, body, dict(self.headers))
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): that is the point of [slow]

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.root_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.base_url = f"{self.root_url}/v1"

    def reset(self, delay: float = 0.0, hold: int = 0) -> None:
        with self.lock:
            self.delay, self.hold = delay, hold
            self.requests: list[tuple[str, dict]] = []
            self.headers: list[dict] = []
            self.seen: dict[str, int] = {}
            self.in_flight = self.max_in_flight = 0

    def count(self, marker: str) -> int:
        """Requests (attempts) whose prompt holds the marker."""
        return sum(n for key, n in self.seen.items() if marker in key)

    def distinct(self, marker: str) -> int:
        return sum(1 for key in self.seen if marker in key)

    def text_of(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if prompt and isinstance(prompt[0], list):  # several token-id prompts
            return "\n".join(map(self.text_of, prompt))
        key = tuple(prompt)
        if key not in self.detok:
            reply = self.client.post(f"{self.upstream.root_url}/detokenize",
                                     json={"model": "tiny", "tokens": list(key)})
            self.detok[key] = reply.json()["prompt"]
        return self.detok[key]

    def handle(self, path: str, body: dict, headers: dict) -> tuple[int, bytes]:
        text = self.text_of(body.get("prompt", ""))
        key = f"{path} {json.dumps(body.get('prompt'))} {text}"  # one per distinct request
        with self.lock:
            self.requests.append((path, body))
            self.headers.append(headers)
            self.seen[key] = self.seen.get(key, 0) + 1
            first = self.seen[key] == 1
        if "[flaky:" in text and first:
            return 500, b"upstream hiccup"
        if "[busy:" in text and first:
            return 429, b"slow down"
        if "[down]" in text:
            return 500, b"engine dead"
        if "[slow]" in text:
            time.sleep(SLOW_S)
        forwarded = dict(body)
        completion = path == "/v1/completions"
        if completion and "[nologprobs]" in text:
            for field in ("logprobs", "logprob_token_ids", "prompt_logprobs"):
                forwarded.pop(field, None)
        if completion and "[strkeys]" in text:
            forwarded.pop("return_tokens_as_token_ids", None)
        if completion and "[noids]" in text:
            forwarded.pop("return_token_ids", None)
        if completion and "[bad]" in text:
            forwarded["max_tokens"] = -5
        response = self.client.post(self.upstream.root_url + path, json=forwarded)
        payload = response.content
        if "[garbage]" in text:
            payload = payload[:len(payload) // 2]
        elif completion and "[gap]" in text and response.status_code == 200:
            reply = response.json()
            choice = reply["choices"][0]
            if body.get("logprob_token_ids"):  # drop the first child asked for
                choice["logprobs"]["top_logprobs"][0].pop(
                    f"token_id:{body['logprob_token_ids'][0]}", None)
            elif choice.get("prompt_logprobs"):  # drop the prompt token of the last position
                choice["prompt_logprobs"][-1].pop(str(choice["prompt_token_ids"][-1]), None)
            payload = json.dumps(reply).encode()
        return response.status_code, payload

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.client.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {family: build_tiny_llm(tmp_path_factory.mktemp(f"tiny_{family}"), family=family,
                                   max_token_length=4, hidden_size=128)
            for family in ("bpe", "unigram")}


@pytest.fixture(scope="module")
def server(models):
    with VLLMServer(models["bpe"], extra_args=("--enable-prompt-tokens-details",)) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(server):
    fake = FaultProxy(server)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def references(models):
    built = {f: TransformersEngine(str(path), dtype="float32") for f, path in models.items()}
    yield built
    for engine in built.values():
        engine.close()


def make_engine(base_url, **options):
    config = {"type": "openai", "base_url": base_url, "model": "tiny", "timeout": 60,
              "max_retries": 2, "backoff": 0.01, **options}
    return build_engine(config)


@pytest.fixture(params=SCORINGS)
def engine(request, proxy):
    proxy.reset()
    eng = make_engine(proxy.base_url, api_key="sk-test", scoring=request.param)
    yield eng
    eng.close()


def expected_probabilities(reference, texts, attribute) -> np.ndarray:
    return label_probabilities(reference.label_loglik(texts, attribute))


def check_agreement(engine, reference, spec, texts=TEXTS):
    for attribute in spec.attributes.values():
        out = engine.classify(texts, attribute)
        expected = expected_probabilities(reference, texts, attribute)
        assert set(out.labels) <= set(attribute.labels)
        assert out.labels == [attribute.labels[i] for i in expected.argmax(axis=1)]
        np.testing.assert_allclose(out.confidences, expected.max(axis=1), atol=1e-4)
        np.testing.assert_allclose(
            label_probabilities(engine.label_loglik(texts, attribute)), expected, atol=1e-4)


def test_more_label_tokens_than_one_request_may_ask_for(server, references, spec,
                                                       monkeypatch):
    """Past vLLM's 128 logprob_token_ids per request (a large label set), the root and any
    node are asked in parts: the same numbers. The limit is lowered so the labels split."""
    import udfs.engines.openai as openai_engine
    monkeypatch.setattr(openai_engine, "MAX_LOGPROB_TOKEN_IDS", 2)
    eng = make_engine(server.base_url, scoring="nodes")
    try:
        check_agreement(eng, references["bpe"], spec)
    finally:
        eng.close()


def test_the_labels_span_several_tokens_and_share_first_ones(references, spec):
    for reference in references.values():
        encode = lambda s: reference.tokenizer(s).input_ids  # noqa: E731
        _, conts = label_continuations(encode, spec.attributes["vibe"].render(TEXTS[0]),
                                       spec.attributes["vibe"].labels)
        assert max(map(len, conts)) > 1
        assert len({c[0] for c in conts}) < len(conts)


@pytest.mark.parametrize("scoring", SCORINGS)
def test_bpe_confidences_are_the_transformers_label_probabilities(server, references, spec,
                                                                  scoring):
    eng = make_engine(server.base_url, scoring=scoring)
    try:
        check_agreement(eng, references["bpe"], spec)
        usage = eng.usage()
    finally:
        eng.close()
    assert set(usage) == set(spec.attributes)
    for counts in usage.values():
        assert counts["prompt_tokens"] > 0 and counts["generated_tokens"] > 0
        if scoring == "nodes":  # the deeper nodes read the prompt's blocks from the cache
            assert counts["cached_tokens"] > 0
        else:  # vLLM does not read its prefix cache for prompt_logprobs requests
            assert counts["cached_tokens"] == 0


def test_multi_label_and_ordinal_scores_agree_on_vllm_serve(server, references, kinds_spec):
    """Per-label P(yes) and the ordinal distribution through the server, both scorings: the
    transformers engine's numbers."""
    multi, ordinal = kinds_spec.attributes["genres"], kinds_spec.attributes["intensity"]
    expected = references["bpe"].tag(TEXTS, multi)
    for scoring in SCORINGS:
        eng = make_engine(server.base_url, scoring=scoring)
        try:
            np.testing.assert_allclose(eng.tag(TEXTS, multi), expected, atol=1e-4)
            np.testing.assert_allclose(eng.classify(TEXTS, ordinal).scores,
                                       references["bpe"].classify(TEXTS, ordinal).scores,
                                       atol=1e-4)
        finally:
            eng.close()


def test_unigram_confidences_and_captions_agree(models, references, spec):
    with VLLMServer(models["unigram"]) as unigram:
        for scoring in SCORINGS:
            eng = make_engine(unigram.base_url, scoring=scoring)
            try:
                check_agreement(eng, references["unigram"], spec)
                if scoring == "nodes":
                    assert eng.caption(TEXTS, spec.caption) == \
                        references["unigram"].caption(TEXTS, spec.caption)
            finally:
                eng.close()


def test_captions_are_the_transformers_greedy_captions(server, references, spec):
    eng = make_engine(server.base_url)
    try:
        assert eng.caption(TEXTS, spec.caption) == references["bpe"].caption(TEXTS, spec.caption)
        usage = eng.usage()["caption"]
    finally:
        eng.close()
    assert usage["prompt_tokens"] > 0 and 0 < usage["generated_tokens"] <= \
        len(TEXTS) * spec.caption.max_tokens


@pytest.fixture
def proxied(proxy):
    """An engine behind the proxy, in the request shape the test asks for."""
    built = []

    def make(scoring):
        proxy.reset()
        built.append(make_engine(proxy.base_url, api_key="sk-test", scoring=scoring))
        return built[-1]

    yield make
    for eng in built:
        eng.close()


def test_node_requests_send_token_ids_root_first(proxied, proxy, spec):
    engine = proxied("nodes")
    attribute = spec.attributes["vibe"]
    engine.classify(TEXTS[:2], attribute)
    paths = [path for path, _ in proxy.requests]
    assert set(paths) == {"/tokenize", "/v1/completions"}
    tokenised = {body["prompt"] for path, body in proxy.requests if path == "/tokenize"}
    assert tokenised == {attribute.render(t) for t in TEXTS[:2]} | {
        f"{attribute.render(t)} {label}" for t in TEXTS[:2] for label in attribute.labels}
    nodes = [body for path, body in proxy.requests if path == "/v1/completions"]
    assert all(b["temperature"] == 0 and b["logprob_token_ids"]
               and all(isinstance(p, list) and all(isinstance(t, int) for t in p)
                       for p in b["prompt"])
               and b["return_tokens_as_token_ids"] is True and "prompt_logprobs" not in b
               and b["model"] == "tiny" for b in nodes)
    # per text: the root alone, one child forced (scored at the second step: the labels
    # span several tokens), then its other deeper nodes together, which extend the root's ids
    def extends(a, b):  # a's ids continue b's
        return len(a) > len(b) and a[:len(b)] == b
    roots = [b for b in nodes if not any(extends(b["prompt"][0], o["prompt"][0]) for o in nodes)]
    assert len(roots) == 2 and all(len(b["prompt"]) == 1 for b in roots) and len(nodes) == 4
    assert all(b["max_tokens"] == 2 and len(b["allowed_token_ids"]) == 1 for b in roots)
    assert all(b["max_tokens"] == 1 and "allowed_token_ids" not in b
               for b in nodes if b not in roots)
    for root in (b["prompt"][0] for b in roots):
        deeper = [b for b in nodes if extends(b["prompt"][0], root)]
        assert len(deeper) == 1 and nodes.index(deeper[0]) > [b["prompt"] for b in nodes].index(
            [root])
        assert all(p[:len(root)] == root and len(p) > len(root) for p in deeper[0]["prompt"])
    assert proxy.headers[0]["Authorization"] == "Bearer sk-test"
    assert engine.model_name == "openai:tiny"
    assert model_name({"type": "openai", "model": "tiny", "base_url": proxy.base_url}) == \
        engine.model_name


def test_prompt_logprobs_requests_send_prompt_and_label(proxied, proxy, spec):
    engine = proxied("prompt_logprobs")
    attribute = spec.attributes["vibe"]
    engine.classify(TEXTS[:2], attribute)
    bodies = [body for _, body in proxy.requests]
    assert {path for path, _ in proxy.requests} == {"/v1/completions"}
    assert all(b["prompt_logprobs"] == 0 and b["return_token_ids"] is True
               and b["max_tokens"] == 1 for b in bodies)
    assert {b["prompt"] for b in bodies} == {
        f"{attribute.render(t)} {label}" for t in TEXTS[:2] for label in attribute.labels}


def test_a_server_without_token_ids_gives_the_same_answer(proxy, spec, references):
    proxy.reset()
    eng = make_engine(proxy.base_url, scoring="prompt_logprobs")
    try:
        attribute = spec.attributes["audience"]
        texts = [f"{t} [noids]" for t in TEXTS[:3]]
        out = eng.classify(texts, attribute)
        expected = expected_probabilities(references["bpe"], texts, attribute)
        np.testing.assert_allclose(out.confidences, expected.max(axis=1), atol=1e-4)
    finally:
        eng.close()


@pytest.mark.parametrize("marker", ["[flaky:a]", "[busy:b]"])
def test_transient_errors_are_retried(engine, proxy, spec, references, marker):
    attribute = spec.attributes["audience"]
    texts = [f"Heat {marker}", "Up"]
    out = engine.classify(texts, attribute)
    expected = expected_probabilities(references["bpe"], texts, attribute)
    np.testing.assert_allclose(out.confidences, expected.max(axis=1), atol=1e-4)
    # every request of the marked text failed once and was retried once
    assert proxy.count(marker) == 2 * proxy.distinct(marker) > 0


def test_a_dead_row_fails_alone_after_retries(engine, proxy, spec):
    attribute = spec.attributes["vibe"]
    texts = pd.Series(TEXTS[:3] + ["Broken [down]"] + TEXTS[3:6])
    res = annotate_texts(engine, attribute, texts)
    assert res.loc[3, "label"] is None
    assert "RequestFailed" in res.loc[3, "error"] and "HTTP 500" in res.loc[3, "error"]
    assert "3 attempts" in res.loc[3, "error"]
    ok = res.drop(index=3)
    assert ok["error"].isna().all() and ok["label"].isin(attribute.labels).all()
    # every attempt was made, and the rows that succeeded were asked once despite bisection
    assert proxy.count("[down]") % 3 == 0 and proxy.count("[down]") >= 3
    others = {k: n for k, n in proxy.seen.items() if "[down]" not in k}
    assert others and all(n == 1 for n in others.values())


def test_a_request_past_the_timeout_is_a_row_error(proxy, spec):
    proxy.reset()
    eng = make_engine(proxy.base_url, timeout=4.0, max_retries=1)
    try:
        t0 = time.monotonic()
        res = annotate_texts(eng, spec.attributes["audience"], pd.Series(["Up", "Jaws [slow]"]))
        elapsed = time.monotonic() - t0
    finally:
        eng.close()
    assert res.loc[0, "error"] is None and res.loc[0, "label"] in ("kids", "teens", "adults")
    assert "ReadTimeout" in res.loc[1, "error"]
    assert proxy.count("[slow]") >= 2  # the timeout was retried
    assert elapsed < 4 * SLOW_S  # the client gave up instead of waiting for the replies


@pytest.mark.parametrize("marker,error", [
    ("[garbage]", "invalid JSON"),
    ("[nologprobs]", "no "),
    ("[gap]", "no "),
    ("[bad]", "HTTP 400"),
])
def test_bad_replies_fail_their_row_without_retries(engine, proxy, spec, marker, error):
    attribute = spec.attributes["vibe"]
    with pytest.raises((MalformedOutput, RequestFailed), match=re.escape(error)):
        engine.classify([f"Alien {marker}"], attribute)
    asked = [n for key, n in proxy.seen.items() if marker in key]
    assert asked and all(n == 1 for n in asked)  # a bad reply fails the text, no retry
    res = annotate_texts(engine, attribute, pd.Series(["Up", f"Alien {marker}", "Heat"]))
    assert res["error"].notna().tolist() == [False, True, False]
    assert error in res.loc[1, "error"]


def test_string_keyed_logprobs_fail_the_row(proxy, spec):
    proxy.reset()
    eng = make_engine(proxy.base_url, scoring="nodes")
    try:
        with pytest.raises(MalformedOutput, match="not keyed by token id"):
            eng.classify(["Alien [strkeys]"], spec.attributes["vibe"])
    finally:
        eng.close()


def test_caption_failures_are_row_errors(proxy, spec):
    proxy.reset()
    eng = make_engine(proxy.base_url)
    try:
        res = caption_texts(eng, spec.caption, pd.Series(["Up", "Jaws [down]"]))
    finally:
        eng.close()
    assert isinstance(res.loc[0, "caption"], str) and res.loc[0, "error"] is None
    assert res.loc[1, "caption"] is None and "HTTP 500" in res.loc[1, "error"]


def test_concurrency_is_bounded(proxy, spec):
    proxy.reset(delay=0.5, hold=4)
    eng = make_engine(proxy.base_url, concurrency=4)
    try:
        texts = [f"Film {i}" for i in range(16)]
        out = eng.caption(texts, spec.caption)
        most = proxy.max_in_flight
    finally:
        eng.close()
        proxy.reset()
    assert len(out) == 16
    assert most == 4  # never more than asked, and really in parallel


def test_connection_refused_is_retried_then_fails(spec):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the engine connects
    eng = build_engine({"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                        "model": "tiny", "max_retries": 2, "backoff": 0.01})
    try:
        with pytest.raises(RequestFailed, match="3 attempts.*ConnectError"):
            eng.classify(["Up"], spec.attributes["audience"])
    finally:
        eng.close()


def test_a_server_restarted_mid_batch_loses_no_row(server, spec, scoring="nodes"):
    """Kill the real server while a batch is in flight and start it again on the same port:
    the retries (backoff 1, 2, 4, ... s; ~8 min in all) carry every row over. (Both request
    shapes share the retrying `_post`; one restart costs ~30-60 s, so only the default.)"""
    attribute = spec.attributes["vibe"]
    # texts the server has not seen (its prefix cache would make the batch too quick to catch)
    texts = pd.Series([f"Film {scoring} {i}. Genres: Drama, War" for i in range(60)])
    eng = make_engine(server.base_url, scoring=scoring, concurrency=2, max_retries=9,
                      backoff=1.0)
    answered = []  # requests answered so far: the batch is under way
    post = eng._post
    eng._post = lambda *args: answered.append(post(*args)) or answered[-1]
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(res=annotate_texts(eng, attribute, texts)), daemon=True)
    try:
        worker.start()
        deadline = time.monotonic() + 300
        while len(answered) < 20 and time.monotonic() < deadline and worker.is_alive():
            time.sleep(0.01)
        assert worker.is_alive(), "the batch finished before the server could be killed"
        server.stop()
        server.start()
        worker.join(timeout=600)
        assert not worker.is_alive()
    finally:
        eng.close()
    eng = make_engine(server.base_url, scoring=scoring)
    try:
        uninterrupted = annotate_texts(eng, attribute, texts)
    finally:
        eng.close()
    res = result["res"]
    assert res["error"].isna().all() and len(res) == len(texts)
    assert res["label"].tolist() == uninterrupted["label"].tolist()
    np.testing.assert_allclose(res["confidence"], uninterrupted["confidence"], rtol=0,
                               atol=1e-6)
    assert server.starts >= 2
