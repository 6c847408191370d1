"""The OpenAI-compatible engine against a real HTTP server on 127.0.0.1 that misbehaves.

The server is a small deterministic "model": each choice c gets a weight w_c from a hash of the
prompt, answers are spelled in 3-character tokens, and at every step half the probability mass
goes to the grammar-allowed next tokens (in proportion to the weights of the choices behind
them) and half to an off-grammar token. The true constrained probability of a label is then
w_label / sum(w), which the engine must recover from the logprobs alone.
Markers in the item text make it misbehave: [flaky:K] 500 once, [busy:K] 429 once, [down]
always 500, [slow] answers after the client timeout, [offlabel] answers outside the labels,
[nospace] answers a label but not as offered (" " + label), [garbage] sends invalid JSON,
[nologprobs] omits logprobs, [bad] is a 400.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from udfs.annotator import annotate_texts, caption_texts
from udfs.engines import build_engine
from udfs.engines.openai import RequestFailed, parse_choice_reply
from udfs.engines.prompts import MalformedOutput

OFF_GRAMMAR = "!?"
SLOW_S = 1.0


def weights(prompt: str, options: list[str]) -> dict[str, float]:
    return {c: 1 + int(hashlib.sha256((prompt + c).encode()).hexdigest()[:6], 16) % 997
            for c in options}


def chunks(s: str) -> list[str]:
    return [s[i:i + 3] for i in range(0, len(s), 3)]


def choice_reply(prompt: str, options: list[str], chosen: str | None = None) -> dict:
    """The completion reply of the fake model, choosing the heaviest option unless told."""
    w = weights(prompt, options)
    chosen = chosen or max(options, key=w.get)
    tokens, token_lps, tops, prefix = [], [], [], ""
    for tok in chunks(chosen):
        alive = [c for c in options if c.startswith(prefix)]
        total = sum(w[c] for c in alive)
        probs = {OFF_GRAMMAR: 0.5}
        for c in alive:
            nxt = c[len(prefix):len(prefix) + 3]
            probs[nxt] = probs.get(nxt, 0.0) + 0.5 * w[c] / total
        top = {t: math.log(p) for t, p in probs.items()}
        tokens.append(tok)
        token_lps.append(top[tok])
        tops.append(top)
        prefix += tok
    return {"id": "cmpl-1", "object": "text_completion",
            "choices": [{"index": 0, "text": chosen, "finish_reason": "stop",
                         "logprobs": {"tokens": tokens, "token_logprobs": token_lps,
                                      "top_logprobs": tops, "text_offset": []}}]}


def caption_text(prompt: str, max_tokens: int) -> str:
    words = re.findall(r"[A-Za-z]+", prompt)
    return " " + " ".join(words[-max_tokens:]) + "  "


class FakeServer:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self, delay: float = 0.0) -> None:
        with self.lock:
            self.delay = delay
            self.requests: list[dict] = []
            self.headers: list[dict] = []
            self.seen: dict[str, int] = {}
            self.in_flight = self.max_in_flight = 0

    def count(self, marker: str) -> int:
        return sum(n for p, n in self.seen.items() if marker in p)

    def handle(self, body: dict, headers: dict) -> tuple[int, bytes]:
        prompt = body["prompt"]
        with self.lock:
            self.requests.append(body)
            self.headers.append(headers)
            self.seen[prompt] = self.seen.get(prompt, 0) + 1
            first = self.seen[prompt] == 1
        if "[flaky:" in prompt and first:
            return 500, b"upstream hiccup"
        if "[busy:" in prompt and first:
            return 429, b"slow down"
        if "[down]" in prompt:
            return 500, b"engine dead"
        if "[bad]" in prompt:
            return 400, b'{"error": "bad request"}'
        if "[slow]" in prompt:
            time.sleep(SLOW_S)
        if "[garbage]" in prompt:
            return 200, b"{not json"
        structured = body.get("structured_outputs")
        if structured:
            options = structured["choice"]
            if "[offlabel]" in prompt:
                reply = choice_reply(prompt, [" popcorn"])
            elif "[nospace]" in prompt:  # a label, but not as offered
                reply = choice_reply(prompt, [o.strip() for o in options])
            else:
                reply = choice_reply(prompt, options)
            if "[nologprobs]" in prompt:
                reply["choices"][0]["logprobs"] = None
        else:
            reply = {"choices": [{"index": 0, "finish_reason": "length",
                                  "text": caption_text(prompt, body["max_tokens"])}]}
        return 200, json.dumps(reply).encode()


@pytest.fixture(scope="module")
def server():
    fake = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with fake.lock:
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            try:
                time.sleep(fake.delay)
                if self.path != "/v1/completions":
                    status, payload = 404, b"not found"
                else:
                    status, payload = fake.handle(body, dict(self.headers))
            finally:
                with fake.lock:
                    fake.in_flight -= 1
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

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    fake.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


def make_engine(server, **options):
    config = {"type": "openai", "base_url": server.base_url, "model": "tiny",
              "timeout": 0.4, "max_retries": 2, "backoff": 0.01, **options}
    return build_engine(config)


@pytest.fixture
def engine(server):
    server.reset()
    eng = make_engine(server, api_key="sk-test")
    yield eng
    eng.close()


TEXTS = [f"Movie number {i}. Genres: Drama" for i in range(10)]


def test_classify_recovers_labels_and_true_probabilities(engine, server, spec):
    attribute = spec.attributes["vibe"]
    out = engine.classify(TEXTS, attribute)
    options = [" " + lab for lab in attribute.labels]
    for text, label, conf in zip(TEXTS, out.labels, out.confidences):
        w = weights(attribute.render(text), options)
        assert " " + label == max(options, key=w.get)
        assert conf == pytest.approx(w[" " + label] / sum(w.values()), rel=1e-9)
    body = server.requests[0]
    assert body["model"] == "tiny" and body["temperature"] == 0.0
    assert body["structured_outputs"] == {"choice": options}
    assert body["logprobs"] == 20 and body["max_tokens"] >= max(map(len, options))
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert engine.model_name == "openai:tiny"


def test_confidences_over_all_labels_sum_to_one(spec):
    """Forcing each label in turn: the renormalised probabilities form a distribution."""
    attribute = spec.attributes["vibe"]  # 'thrilling' and 'thoughtful' share a first token
    options = [" " + lab for lab in attribute.labels]
    prompt = attribute.render(TEXTS[0])
    probs = [parse_choice_reply(choice_reply(prompt, options, chosen=c), attribute)[1]
             for c in options]
    assert sum(probs) == pytest.approx(1.0, rel=1e-9)
    assert all(0 < p < 1 for p in probs)


def test_captions(engine, server, spec):
    caps = engine.caption(TEXTS[:3], spec.caption)
    assert caps == [caption_text(spec.caption.render(t), spec.caption.max_tokens).strip()
                    for t in TEXTS[:3]]
    assert all(r["max_tokens"] == spec.caption.max_tokens for r in server.requests)


@pytest.mark.parametrize("marker", ["[flaky:a]", "[busy:b]"])
def test_transient_errors_are_retried(engine, server, spec, marker):
    attribute = spec.attributes["audience"]
    out = engine.classify([f"Heat {marker}", "Up"], attribute)
    assert set(out.labels) <= set(attribute.labels)
    assert server.count(marker) == 2  # one failure, one retry that succeeded


def test_a_dead_row_fails_alone_after_retries(engine, server, spec):
    attribute = spec.attributes["vibe"]
    texts = pd.Series(TEXTS[:3] + ["Broken [down]"] + TEXTS[3:6])
    res = annotate_texts(engine, attribute, texts)
    assert res.loc[3, "label"] is None
    assert "RequestFailed" in res.loc[3, "error"] and "HTTP 500" in res.loc[3, "error"]
    assert "3 attempts" in res.loc[3, "error"]
    ok = res.drop(index=3)
    assert ok["error"].isna().all() and ok["label"].isin(attribute.labels).all()
    # every attempt was made, and the rows that succeeded were asked once despite bisection
    assert server.count("[down]") % 3 == 0 and server.count("[down]") >= 3
    assert all(server.seen[attribute.render(t)] == 1 for t in texts.drop(index=3))


def test_a_request_past_the_timeout_is_a_row_error(server, spec):
    server.reset()
    eng = make_engine(server, timeout=0.3, max_retries=1)
    try:
        t0 = time.monotonic()
        res = annotate_texts(eng, spec.attributes["audience"], pd.Series(["Up", "Jaws [slow]"]))
        elapsed = time.monotonic() - t0
    finally:
        eng.close()
    assert res.loc[0, "error"] is None and res.loc[0, "label"] in ("kids", "teens", "adults")
    assert "ReadTimeout" in res.loc[1, "error"]
    assert server.count("[slow]") >= 2  # the timeout was retried once per call
    assert elapsed < 4 * SLOW_S  # the client gave up instead of waiting for the server


@pytest.mark.parametrize("marker,error", [
    ("[offlabel]", "not one of"),
    ("[nospace]", "offered choices"),
    ("[garbage]", "invalid JSON"),
    ("[nologprobs]", "no usable logprobs"),
    ("[bad]", "HTTP 400"),
])
def test_bad_replies_fail_their_row_without_retries(engine, server, spec, marker, error):
    attribute = spec.attributes["vibe"]
    with pytest.raises((MalformedOutput, RequestFailed), match=re.escape(error)):
        engine.classify([f"Alien {marker}"], attribute)
    assert server.count(marker) == 1
    res = annotate_texts(engine, attribute, pd.Series(["Up", f"Alien {marker}", "Heat"]))
    assert res["error"].notna().tolist() == [False, True, False]
    assert error in res.loc[1, "error"]


def test_caption_failures_are_row_errors(engine, spec):
    res = caption_texts(engine, spec.caption, pd.Series(["Up", "Jaws [down]"]))
    assert isinstance(res.loc[0, "caption"], str) and res.loc[0, "error"] is None
    assert res.loc[1, "caption"] is None and "HTTP 500" in res.loc[1, "error"]


def test_concurrency_is_bounded(server, spec):
    server.reset(delay=0.15)
    eng = make_engine(server, concurrency=4, timeout=5)
    try:
        texts = [f"Film {i}" for i in range(16)]
        t0 = time.monotonic()
        out = eng.classify(texts, spec.attributes["audience"])
        elapsed = time.monotonic() - t0
    finally:
        eng.close()
    assert len(out.labels) == 16
    assert server.max_in_flight == 4  # never more than asked, and really in parallel
    assert elapsed < 16 * 0.15 / 2  # parallel, not one by one


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
