"""An OpenAI-compatible completions server (e.g. `vllm serve`), spoken to with httpx.

Requests go to {base_url}/completions (and, for label scoring, the server's /tokenize); up
to `concurrency` are in flight at once. Connection errors, timeouts, 429 and 5xx are retried
with exponential backoff (backoff * 2**attempt); other 4xx, unparseable replies and replies
without what was asked for fail that text at once. A batch raises when any text failed, and
`udfs.annotator` bisects it down to the failing rows; every text's result is kept in a small
per-worker cache as soon as it is complete, so the bisection does not ask the server again
for the texts that succeeded.

classify scores labels the way the other generative engines do (udfs.engines.prompts), by
token id, in one of two request shapes (`scoring`):

- "nodes" (the default; a vLLM server whose /v1/completions takes logprob_token_ids): the
  way the in-process vllm engine scores. The prompt and prompt + " " + label are tokenised by
  the server's own tokenizer (POST /tokenize, special tokens added as for a prompt); the
  labels' continuations form a trie (`label_continuations`, `label_nodes`). The root (the
  prompt's ids, whose children are the labels' first tokens) is one completion with
  `max_tokens: 1`, `temperature: 0` and vLLM's `logprob_token_ids` set to its children (with
  `return_tokens_as_token_ids`, so the reply's top_logprobs are keyed "token_id:<id>", never
  by decoded string); where a label has several tokens, one child is forced as the generated
  token (`allowed_token_ids`, `max_tokens: 2`) and its node is scored at the second step
  (prompts.plan_segments). Once it is answered, the other deeper nodes go in one more request (several
  if their children exceed vLLM's 128 ids), a list of token-id prompts with
  logprob_token_ids = the union of their children: they find the prompt's KV blocks in
  vLLM's prefix cache and compute only the tokens past its last full block. vLLM reads these
  log-probabilities from the raw logits (vllm/v1/sample/sampler.py,
  gather_specific_token_logprobs; the server's default --logprobs-mode raw_logprobs), so
  asking for extra ids changes none of them.
- "prompt_logprobs" (any server with vLLM's `prompt_logprobs` + `return_token_ids`
  extensions): one completion per (text, label) with prompt + " " + label as text; the server
  returns the log-probability of every prompt token keyed by id, and a label's score is the
  sum past the prefix all labels share. vLLM does not read its prefix cache for such requests
  (vllm/sampling_params.py, skip_reading_prefix_cache), so each costs a whole prompt.

A softmax over the labels gives the confidence. No token string is ever matched, and a
missing log-probability fails the row (never a renormalised 1.0).
"""
from __future__ import annotations

import math
import time
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Hashable, Sequence

import httpx

import numpy as np

from udfs.engines.prompts import (LabelScoringEngine, MalformedOutput, Node, caption_request,
                                  continuation_logliks, label_continuations, label_nodes,
                                  plan_segments)
from udfs.spec import Attribute, Caption

SCORING = ("nodes", "prompt_logprobs")
#: how vLLM writes -inf into JSON (vllm/entrypoints/openai/completion/serving.py)
CLAMPED_LOGPROB = -9999.0
TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids form
MAX_LOGPROB_TOKEN_IDS = 128  # vllm/sampling_params.py


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


# -- "prompt_logprobs" scoring ----------------------------------------------------------------

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


# -- "nodes" scoring ---------------------------------------------------------------------------

def reply_usage(reply: object) -> tuple[int, int, int]:
    """(prompt, cached, generated) tokens of a completion reply's `usage`; cached_tokens is
    there when vLLM runs with --enable-prompt-tokens-details, else 0. Missing usage: zeros."""
    usage = reply.get("usage") if isinstance(reply, dict) else None
    if not isinstance(usage, dict):
        return 0, 0, 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None

    def number(value: object) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return number(usage.get("prompt_tokens")), number(cached), number(
        usage.get("completion_tokens"))


def tokenize_request(text: str) -> dict:
    """Body (less the model) of POST /tokenize: the model's ids for `text` as a prompt."""
    return {"prompt": text, "add_special_tokens": True}


def parse_tokenize(reply: object) -> list[int]:
    """The token ids of a vLLM /tokenize reply ({"count", "max_model_len", "tokens"})."""
    try:
        tokens = reply["tokens"]  # type: ignore[index]
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise TypeError("tokens is not a list of ints")
        return tokens
    except (KeyError, TypeError) as exc:
        raise MalformedOutput(f"unexpected /tokenize reply ({exc!r}): {str(reply)[:200]}") \
            from None


def node_request(prefixes: Sequence[Sequence[int]], token_ids: Sequence[int],
                 forced: int | None = None) -> dict:
    """Body (less the model) asking for the log-probabilities of `token_ids` after each of the
    token-id prompts `prefixes` (one completion request, one choice per prompt): vLLM's
    logprob_token_ids (which needs `logprobs` set; the server then returns exactly those ids
    besides the generated one), keyed by id in the reply. forced: a token generated first
    (vLLM's allowed_token_ids, applied after the raw log-probabilities are taken), so that
    the same ids are scored after it too, one decode step later."""
    body = {"prompt": [[int(t) for t in prefix] for prefix in prefixes], "max_tokens": 1,
            "temperature": 0.0, "logprobs": len(token_ids),
            "logprob_token_ids": [int(t) for t in token_ids],
            "return_tokens_as_token_ids": True}
    if forced is not None:
        body.update(max_tokens=2, allowed_token_ids=[int(forced)])
    return body


def _choice_logprobs(choice: dict, children: Sequence[int], step: int = 0) -> dict[int, float]:
    logprobs = choice.get("logprobs")
    top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(top, list) or len(top) <= step or not isinstance(top[step], dict):
        raise MalformedOutput("reply has no logprobs; the server must support vLLM's "
                              "`logprob_token_ids`, or use scoring: prompt_logprobs: "
                              f"{str(choice)[:200]}")
    position = top[step]
    by_id: dict[int, float] = {}
    for key, value in position.items():
        if not (isinstance(key, str) and key.startswith(TOKEN_ID_PREFIX)):
            raise MalformedOutput(f"logprobs are not keyed by token id ({key!r}); the server "
                                  "must support return_tokens_as_token_ids")
        try:
            by_id[int(key[len(TOKEN_ID_PREFIX):])] = float(value)
        except (TypeError, ValueError):
            raise MalformedOutput(f"bad logprob entry {key!r}: {value!r}") from None
    out = {}
    for token in children:
        lp = by_id.get(int(token))
        if lp is None or not math.isfinite(lp) or lp <= CLAMPED_LOGPROB:
            raise MalformedOutput(f"no finite logprob for token {token} in "
                                  f"{str(position)[:200]}; the server must support "
                                  "logprob_token_ids with --logprobs-mode raw_logprobs")
        out[int(token)] = lp
    return out


def parse_node_logprobs(reply: object, children: Sequence[Sequence[int]]
                        ) -> list[dict[int, float]]:
    """Per prompt of node_request(prefixes, ...), {child id: log-probability} of its children.

    vLLM answers a list of prompts with one choice per prompt, `index` = the prompt's
    position. Each choice's logprobs.top_logprobs[0] is {"token_id:<id>": logprob} for the
    generated token and every id of logprob_token_ids (return_tokens_as_token_ids), with
    -inf written as -9999.0. Keys in any other form (decoded strings: a server that ignored
    return_tokens_as_token_ids), a missing choice, or a missing or infinite child fail the
    row.
    """
    try:
        choices = {int(c["index"]): c for c in reply["choices"]}  # type: ignore[index]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedOutput(f"unexpected completion reply ({exc!r}): {str(reply)[:200]}") \
            from None
    if sorted(choices) != list(range(len(children))):
        raise MalformedOutput(f"{len(children)} prompts but choices {sorted(choices)}")
    return [_choice_logprobs(choices[i], kids) for i, kids in enumerate(children)]


def parse_forced_logprobs(reply: object, children: Sequence[int], forced: int,
                          next_children: Sequence[int]) -> tuple[dict[int, float],
                                                                 dict[int, float]]:
    """From the reply to node_request([prefix], ids, forced): the children's log-probabilities
    after the prefix, and next_children's after the forced token, which the reply must show
    as its first generated token."""
    choice = _first_choice(reply)
    here = _choice_logprobs(choice, children)  # also checks the logprobs are keyed by id
    tokens = choice["logprobs"].get("tokens")
    if not isinstance(tokens, list) or tokens[:1] != [f"{TOKEN_ID_PREFIX}{forced}"]:
        raise MalformedOutput(f"the server generated {str(tokens)[:100]} where token {forced} "
                              "was forced (allowed_token_ids)")
    return here, _choice_logprobs(choice, next_children, 1)


def group_nodes(nodes: Sequence[Node], max_ids: int = MAX_LOGPROB_TOKEN_IDS
                ) -> list[tuple[list[Node], list[int]]]:
    """Nodes packed into requests, in order: each request's ids (the union of its nodes'
    children) at most max_ids long, vLLM's limit on logprob_token_ids; a node with more
    children is asked in parts, one prompt per part."""
    groups: list[tuple[list[Node], list[int]]] = []
    parts = [(tuple(prefix), tuple(kids[i:i + max_ids])) for prefix, kids in
             ((p, list(dict.fromkeys(c))) for p, c in nodes) for i in range(0, len(kids), max_ids)]
    for node in parts:
        children = list(node[1])
        if groups:
            members, ids = groups[-1]
            union = list(dict.fromkeys([*ids, *children]))
            if len(union) <= max_ids:
                members.append(node)
                groups[-1] = (members, union)
                continue
        groups.append(([node], children))
    return groups


def default_tokenize_url(base_url: str) -> str:
    """vLLM serves /tokenize at the server root, beside /v1."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[:-3]
    return root + "/tokenize"


class OpenAIEngine(LabelScoringEngine):
    @classmethod
    def name_for(cls, options: dict) -> str:
        return f"openai:{options['model']}"

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 30, max_retries: int = 3,
                 backoff: float = 0.5, top_logprobs: int = 20, cache_size: int = 10_000,
                 scoring: str = "nodes", tokenize_url: str | None = None):
        if concurrency < 1 or max_retries < 0:
            raise ValueError("concurrency must be at least 1 and max_retries at least 0")
        if scoring not in SCORING:
            raise ValueError(f"scoring must be one of {SCORING}, not {scoring!r}")
        self.url = base_url.rstrip("/") + "/completions"
        self.tokenize_url = tokenize_url or default_tokenize_url(base_url)
        self.model = model
        self.scoring = scoring
        self.max_retries = max_retries
        self.backoff = backoff
        self.top_logprobs = top_logprobs  # accepted for older configs; scoring reads ids
        self.model_name = self.name_for({"model": model})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout), headers=headers,
            limits=httpx.Limits(max_connections=concurrency,
                                max_keepalive_connections=concurrency))
        self._pool = ThreadPoolExecutor(max_workers=concurrency,
                                        thread_name_prefix="openai-engine")
        self._cache: OrderedDict[Hashable, object] = OrderedDict()
        self._cache_size = cache_size
        self._usage_lock = threading.Lock()

    def _complete(self, part: str, body: dict) -> object:
        """One completion, its tokens (the reply's usage) counted under `part`."""
        reply = self._post({"model": self.model, **body})
        prompt, cached, generated = reply_usage(reply)
        with self._usage_lock:  # the pool's threads count concurrently
            self.count_tokens(part, prompt=prompt, cached=cached, generated=generated)
        return reply

    def _post(self, body: dict, url: str | None = None) -> object:
        """One request, retried on transient failures; the parsed JSON reply."""
        url = url or self.url
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as exc:  # connection errors and timeouts
                error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise RequestFailed(f"HTTP {response.status_code} from {url}: "
                                    f"{response.text[:300]}")
            try:
                return response.json()
            except ValueError:
                raise MalformedOutput(
                    f"server replied with invalid JSON: {response.text[:200]!r}") from None
        raise RequestFailed(f"{url} failed after {self.max_retries + 1} attempts; "
                            f"last error: {error}")

    def _map(self, keys: Sequence[Hashable], fn: Callable[[int], object]) -> list:
        """fn(i) for every i whose key is not cached, concurrently; raise if any failed.
        Results that succeeded are cached even when another one failed."""
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

    # one text's label log-likelihoods, in each request shape (run in the pool, one per text)

    def _encode(self, text: str) -> list[int]:
        return parse_tokenize(self._post({"model": self.model, **tokenize_request(text)},
                                         self.tokenize_url))

    def _nodes(self, part: str, nodes: Sequence[Node]
               ) -> dict[tuple[int, ...], dict[int, float]]:
        """The children's log-probabilities of every node: one request per group of nodes."""
        out: dict[tuple[int, ...], dict[int, float]] = {}
        for members, ids in group_nodes(nodes, MAX_LOGPROB_TOKEN_IDS):
            reply = self._complete(part, node_request([p for p, _ in members], ids))
            found = parse_node_logprobs(reply, [c for _, c in members])
            for (prefix, _), logprobs in zip(members, found):
                out.setdefault(tuple(prefix), {}).update(logprobs)
        return out

    def _loglik_nodes(self, part: str, prompt: str, labels: Sequence[str]) -> np.ndarray:
        context, conts = label_continuations(self._encode, prompt, labels)
        context = tuple(context)
        nodes = label_nodes(context, conts)  # the root (the prompt) comes first
        # the root, and one child forced in the same request (prompts.plan_segments)
        first, second = plan_segments(dict(nodes), {context}, MAX_LOGPROB_TOKEN_IDS)
        ((_, kids, forced, next_kids),) = first
        if forced is None:
            logprob = self._nodes(part, [(context, kids)])
        else:
            reply = self._complete(part, node_request(
                [context], list(dict.fromkeys([*kids, *next_kids])), forced))
            here, after = parse_forced_logprobs(reply, kids, forced, next_kids)
            logprob = {context: here, context + (forced,): after}
        # the other nodes, and the root's children past vLLM's id limit
        deeper = [node for node in nodes if node[0] not in logprob] + [
            (prefix, ids) for prefix, ids, _, _ in second if prefix == context]
        if deeper:  # once the root is computed: its KV blocks are in the prefix cache
            for prefix, logprobs in self._nodes(part, deeper).items():
                logprob.setdefault(prefix, {}).update(logprobs)
        return np.array([sum(logprob[context + tuple(ids[:i])][t] for i, t in enumerate(ids))
                         for ids in conts], dtype=np.float64)

    def _loglik_prompt_logprobs(self, part: str, prompt: str, labels: Sequence[str]
                                ) -> np.ndarray:
        scored = [parse_prompt_logprobs(self._complete(part, score_request(prompt, label)))
                  for label in labels]
        return np.array(continuation_logliks(scored), dtype=np.float64)

    def label_loglik(self, texts: Sequence[str], attribute: Attribute) -> np.ndarray:
        """Summed log-likelihood of each label after each text's prompt: [texts, labels]."""
        one_text = (self._loglik_nodes if self.scoring == "nodes"
                    else self._loglik_prompt_logprobs)

        def one(i: int) -> np.ndarray:
            # a chat part raises ChatTemplateError: the server's template is not ours to read
            return one_text(attribute.name, self.prompt(attribute, texts[i]), attribute.labels)

        rows = self._map([("label", self.scoring, attribute.version, t) for t in texts], one)
        return np.array(rows, dtype=np.float64).reshape(len(texts), len(attribute.labels))

    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        body = caption_request(caption)

        def one(i: int) -> str:
            reply = self._complete("caption", {**body, "prompt": self.prompt(caption, texts[i])})
            return _first_choice(reply)["text"].strip()

        return self._map([("caption", caption.version, t) for t in texts], one)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
