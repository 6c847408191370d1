"""The OpenAI-compatible engine against a real HTTP server on 127.0.0.1 that misbehaves.

The server answers like `vllm serve`: label-scoring requests (vLLM's `prompt_logprobs` and
`return_token_ids` extensions) are answered by the vLLM stand-in of tests/vllm_double.py,
which runs the tiny Llama of tests/tiny_llm.py, and serialised the way vLLM's server does
(prompt_logprobs: None, then {token id as a JSON string: {logprob, rank, decoded_token}} per
position). The engine's confidences must therefore be the transformers engine's label
probabilities for the same model. Captions come from a cheap deterministic rule.
Markers in the item text make it misbehave: [flaky:K] 500 once, [busy:K] 429 once, [down]
always 500, [slow] answers after the client timeout, [garbage] sends invalid JSON,
[nologprobs] omits prompt_logprobs, [gap] drops the prompt token from one position, [noids]
omits prompt_token_ids (an older server), [bad] is a 400.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from tests import vllm_double
from udfs.annotator import annotate_texts, caption_texts
from udfs.engines import build_engine
from udfs.engines.hf import TransformersEngine
from udfs.engines.openai import RequestFailed, parse_prompt_logprobs
from udfs.engines.prompts import MalformedOutput, label_probabilities

SLOW_S = 1.0


def caption_text(prompt: str, max_tokens: int) -> str:
    words = re.findall(r"[A-Za-z]+", prompt)
    return " " + " ".join(words[-max_tokens:]) + "  "


def serialise_prompt_logprobs(positions) -> list:
    """vLLM's server: dict[int, Logprob] per position, as JSON (keys become strings)."""
    return [None if p is None else
            {str(i): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for i, lp in p.items()} for p in positions]


class FakeServer:
    def __init__(self, model_dir):
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()
        self.llm = vllm_double.LLM(str(model_dir))
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
        if body.get("prompt_logprobs") is not None:
            params = vllm_double.SamplingParams(
                temperature=body["temperature"], max_tokens=body["max_tokens"],
                prompt_logprobs=body["prompt_logprobs"])
            with self.model_lock:
                (out,) = self.llm.generate([prompt], params, use_tqdm=False)
            choice = {"index": 0, "text": out.outputs[0].text, "logprobs": None,
                      "finish_reason": out.outputs[0].finish_reason,
                      "prompt_logprobs": serialise_prompt_logprobs(out.prompt_logprobs)}
            if body.get("return_token_ids") and "[noids]" not in prompt:
                choice["prompt_token_ids"] = out.prompt_token_ids
                choice["token_ids"] = out.outputs[0].token_ids
            if "[nologprobs]" in prompt:
                choice["prompt_logprobs"] = None
            if "[gap]" in prompt:
                position = choice["prompt_logprobs"][-1]
                position.pop(str(out.prompt_token_ids[-1]))
                position["7"] = {"logprob": -0.1, "rank": 1, "decoded_token": "x"}
            reply = {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}
        else:
            reply = {"choices": [{"index": 0, "finish_reason": "length",
                                  "text": caption_text(prompt, body["max_tokens"])}]}
        return 200, json.dumps(reply).encode()


@pytest.fixture(scope="module")
def server(tiny_llm_dir):
    fake = FakeServer(tiny_llm_dir)

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
    fake.llm.llm_engine.engine_core.shutdown()


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


TEXTS = [f"Movie number {i}. Genres: Drama" for i in range(6)]


@pytest.fixture(scope="module")
def reference(tiny_llm_dir):
    eng = TransformersEngine(str(tiny_llm_dir), batch_size=8)
    yield eng
    eng.close()


def expected_probabilities(reference, texts, attribute) -> np.ndarray:
    return label_probabilities(reference.label_loglik(texts, attribute))


def test_confidences_are_the_transformers_label_probabilities(engine, server, spec, reference):
    for attribute in spec.attributes.values():
        out = engine.classify(TEXTS, attribute)
        expected = expected_probabilities(reference, TEXTS, attribute)
        assert out.labels == [attribute.labels[i] for i in expected.argmax(axis=1)]
        np.testing.assert_allclose(out.confidences, expected.max(axis=1), atol=1e-5)
    body = server.requests[0]
    attribute = spec.attributes["vibe"]
    assert body["model"] == "tiny" and body["temperature"] == 0.0 and body["max_tokens"] == 1
    assert body["prompt_logprobs"] == 0 and body["return_token_ids"] is True
    assert "structured_outputs" not in body and "logprobs" not in body
    assert {r["prompt"] for r in server.requests[:len(TEXTS) * len(attribute.labels)]} == {
        f"{attribute.render(t)} {label}" for t in TEXTS for label in attribute.labels}
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert engine.model_name == "openai:tiny"


def test_a_server_without_token_ids_gives_the_same_answer(engine, spec, reference):
    attribute = spec.attributes["audience"]
    texts = [f"{t} [noids]" for t in TEXTS[:3]]
    out = engine.classify(texts, attribute)
    expected = expected_probabilities(reference, texts, attribute)
    np.testing.assert_allclose(out.confidences, expected.max(axis=1), atol=1e-5)


def test_parse_prompt_logprobs_reads_by_id():
    reply = {"choices": [{"text": "x", "prompt_token_ids": [1, 5, 9],
                          "prompt_logprobs": [None, {"5": {"logprob": -2.0, "rank": 4},
                                                     "3": {"logprob": -0.5, "rank": 1}},
                                              {"9": {"logprob": -1.0, "rank": 1}}]}]}
    assert parse_prompt_logprobs(reply) == [(1, None), (5, -2.0), (9, -1.0)]
    reply["choices"][0]["prompt_logprobs"][2] = {"3": {"logprob": -0.1, "rank": 1}}
    with pytest.raises(MalformedOutput, match="no logprob for prompt token 9"):
        parse_prompt_logprobs(reply)


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
    # per label request: one failure, one retry that succeeded
    assert server.count(marker) == 2 * len(attribute.labels)


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
    assert all(server.seen[f"{attribute.render(t)} {label}"] == 1
               for t in texts.drop(index=3) for label in attribute.labels)


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
    ("[garbage]", "invalid JSON"),
    ("[nologprobs]", "no prompt_logprobs"),
    ("[gap]", "no logprob for prompt token"),
    ("[bad]", "HTTP 400"),
])
def test_bad_replies_fail_their_row_without_retries(engine, server, spec, marker, error):
    attribute = spec.attributes["vibe"]
    with pytest.raises((MalformedOutput, RequestFailed), match=re.escape(error)):
        engine.classify([f"Alien {marker}"], attribute)
    assert server.count(marker) == len(attribute.labels)  # one request per label, no retry
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
        out = eng.caption(texts, spec.caption)
        elapsed = time.monotonic() - t0
    finally:
        eng.close()
    assert len(out) == 16
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
