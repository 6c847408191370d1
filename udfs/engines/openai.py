"""An OpenAI-compatible completions server (e.g. `vllm serve`), spoken to with httpx.

Each text is one POST {base_url}/completions; up to `concurrency` are in flight at once.
Connection errors, timeouts, 429 and 5xx are retried with exponential backoff
(backoff * 2**attempt); other 4xx, unparseable replies and answers outside the labels fail
that text at once. A batch raises when any text failed, and `udfs.annotator` bisects it down
to the failing rows; replies already received are kept in a small cache, so the bisection
does not ask the server again for the rows that succeeded.

classify sends vLLM's `structured_outputs: {"choice": [...]}` extension with `logprobs`, and
the confidence is the generated label's probability renormalised over the tokens the choice
allows (udfs.engines.prompts.constrained_probability).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Hashable, Sequence

import httpx

from udfs.engines.base import Engine, Labels
from udfs.engines.prompts import (MalformedOutput, caption_request, choices,
                                  classify_request, constrained_probability, label_of)
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


def parse_choice_reply(reply: object, attribute: Attribute) -> tuple[str, float]:
    """(label, confidence) from a /completions reply to a constrained choice request."""
    choice = _first_choice(reply)
    label = label_of(choice["text"], attribute)
    lp: Any = choice.get("logprobs")
    try:
        tokens = lp["tokens"]
        # The generated token's own logprob is always known; the top-k may omit it.
        steps = [{**(top or {}), tok: tok_lp} for tok, tok_lp, top
                 in zip(tokens, lp["token_logprobs"], lp["top_logprobs"])]
    except (KeyError, TypeError) as exc:
        raise MalformedOutput(f"reply has no usable logprobs ({exc!r}); the server must "
                              "support `logprobs` on /completions") from None
    return label, constrained_probability(tokens, steps, choice["text"], choices(attribute))


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
        self.top_logprobs = top_logprobs
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
        body = {"model": self.model, **classify_request(attribute, self.top_logprobs)}

        def one(i: int) -> tuple[str, float]:
            reply = self._post({**body, "prompt": attribute.render(texts[i])})
            return parse_choice_reply(reply, attribute)

        pairs = self._map([("classify", attribute.version, t) for t in texts], one)
        return Labels(labels=[p[0] for p in pairs], confidences=[p[1] for p in pairs])

    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        body = {"model": self.model, **caption_request(caption)}

        def one(i: int) -> str:
            reply = self._post({**body, "prompt": caption.render(texts[i])})
            return _first_choice(reply)["text"].strip()

        return self._map([("caption", caption.version, t) for t in texts], one)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
