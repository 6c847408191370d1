"""An OpenAI-compatible completions server (e.g. `vllm serve`), spoken to with httpx.

Each request is one POST {base_url}/completions; up to `concurrency` are in flight at once.
Connection errors, timeouts, 429 and 5xx are retried with exponential backoff
(backoff * 2**attempt); other 4xx, unparseable replies and replies without what was asked
for fail that text at once. A batch raises when any text failed, and `udfs.annotator`
bisects it down to the failing rows; replies already received are kept in a small cache, so
the bisection does not ask the server again for the rows that succeeded.

classify scores labels the way the other generative engines do (udfs.engines.prompts), by
token id: one request per (text, label) sends prompt + " " + label with vLLM's
`prompt_logprobs: 0` and `return_token_ids: true` extensions, so the server tokenises the
label in context with the model's own tokenizer and returns the log-probability of every
prompt token, keyed by id. A label's score is the sum over the positions after the prefix
all labels share; a softmax over the labels gives the confidence. No token string is ever
matched, and a missing log-probability fails the row (never a renormalised 1.0).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Hashable, Sequence

import httpx

import numpy as np

from udfs.engines.base import Engine, Labels
from udfs.engines.prompts import (MalformedOutput, caption_request, continuation_logliks,
                                  label_probabilities)
from udfs.spec import Attribute, Caption


class RequestFailed(RuntimeError):
    """The server did not answer a request successfully, retries included."""


def _first_choice(reply: object) -> dict:
    try:
        choice = reply["choices"][0]  # type: ignore[index]
        if not isinstance(choice.get("text"), str):
            raise TypeError("text is not a string")
        return choice
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise MalformedOutput(f"unexpected completion reply ({exc!r}): {str(reply)[:200]}") \
            from None


def score_request(prompt: str, label: str) -> dict:
    """Body (less the model) asking for the log-probability of every token of the prompt
    followed by the label; one token is generated because servers require max_tokens >= 1."""
    return {"prompt": f"{prompt} {label}", "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": 0, "return_token_ids": True}


def parse_prompt_logprobs(reply: object) -> list[tuple[int | None, float | None]]:
    """(token id, log-probability) per prompt position from a vLLM /completions reply.

    vLLM returns `prompt_logprobs` as a list with None for the first token and, for every
    later position, {token id (a JSON string): {"logprob", "rank", "decoded_token"}} holding
    the prompt token (with prompt_logprobs=0, only it), and `prompt_token_ids` when asked.
    """
    choice = _first_choice(reply)
    positions, ids = choice.get("prompt_logprobs"), choice.get("prompt_token_ids")
    if not isinstance(positions, list) or not positions:
        raise MalformedOutput("reply has no prompt_logprobs; the server must support vLLM's "
                              "`prompt_logprobs` extension on /completions")
    if ids is not None and len(ids) != len(positions):
        raise MalformedOutput(f"{len(ids)} prompt token ids but {len(positions)} logprobs")
    out: list[tuple[int | None, float | None]] = []
    for i, position in enumerate(positions):
        token = ids[i] if ids is not None else None
        if position is None:
            if i:
                raise MalformedOutput(f"no logprobs for prompt position {i}")
            out.append((token, None))
            continue
        try:
            if token is None:  # without the ids, each position must hold exactly its token
                (key, entry), = position.items()
                token = int(key)
            else:
                entry = position.get(str(token), position.get(token))
            logprob = entry["logprob"] if isinstance(entry, dict) else entry
            out.append((int(token), float(logprob)))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise MalformedOutput(f"no logprob for prompt token {token} at position {i} "
                                  f"({exc!r}): {str(position)[:200]}") from None
    return out


class OpenAIEngine(Engine):
    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 30, max_retries: int = 3,
                 backoff: float = 0.5, top_logprobs: int = 20, cache_size: int = 10_000):
        if concurrency < 1 or max_retries < 0:
            raise ValueError("concurrency must be at least 1 and max_retries at least 0")
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.top_logprobs = top_logprobs  # accepted for older configs; scoring reads ids
        self.model_name = f"openai:{model}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout), headers=headers,
            limits=httpx.Limits(max_connections=concurrency,
                                max_keepalive_connections=concurrency))
        self._pool = ThreadPoolExecutor(max_workers=concurrency,
                                        thread_name_prefix="openai-engine")
        self._cache: OrderedDict[Hashable, object] = OrderedDict()
        self._cache_size = cache_size

    def _post(self, body: dict) -> object:
        """One completion, retried on transient failures; the parsed JSON reply."""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TransportError as exc:  # connection errors and timeouts
                error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise RequestFailed(f"HTTP {response.status_code} from {self.url}: "
                                    f"{response.text[:300]}")
            try:
                return response.json()
            except ValueError:
                raise MalformedOutput(
                    f"server replied with invalid JSON: {response.text[:200]!r}") from None
        raise RequestFailed(f"{self.url} failed after {self.max_retries + 1} attempts; "
                            f"last error: {error}")

    def _map(self, keys: Sequence[Hashable], fn: Callable[[int], object]) -> list:
        """fn(i) for every i whose key is not cached, concurrently; raise if any failed."""
        results: dict[Hashable, object] = {}
        todo = {}
        for i, key in enumerate(keys):
            if key in results or key in todo:
                continue
            if key in self._cache:
                self._cache.move_to_end(key)
                results[key] = self._cache[key]
            else:
                todo[key] = self._pool.submit(fn, i)
        wait(todo.values())
        errors: list[BaseException] = []
        for key, future in todo.items():
            exc = future.exception()
            if exc is None:
                results[key] = self._cache[key] = future.result()
            else:
                errors.append(exc)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        if errors:
            raise errors[0]
        return [results[key] for key in keys]

    def classify(self, texts: Sequence[str], attribute: Attribute) -> Labels:
        pairs = [(text, label) for text in texts for label in attribute.labels]

        def one(i: int) -> list[tuple[int | None, float | None]]:
            text, label = pairs[i]
            body = {"model": self.model, **score_request(attribute.render(text), label)}
            return parse_prompt_logprobs(self._post(body))

        scored = self._map([("label", attribute.version, t, lab) for t, lab in pairs], one)
        k = len(attribute.labels)
        loglik = np.array([continuation_logliks(scored[i:i + k])
                           for i in range(0, len(scored), k)]).reshape(len(texts), k)
        probs = label_probabilities(loglik)
        best = probs.argmax(axis=1)
        return Labels(labels=[attribute.labels[i] for i in best],
                      confidences=probs[np.arange(len(best)), best].astype(float).tolist())

    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        body = {"model": self.model, **caption_request(caption)}

        def one(i: int) -> str:
            reply = self._post({**body, "prompt": caption.render(texts[i])})
            return _first_choice(reply)["text"].strip()

        return self._map([("caption", caption.version, t) for t in texts], one)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
