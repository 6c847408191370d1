"""GPU-free helpers shared by the generative engines: request building and output parsing.

Labels are offered to a model as " " + label, the way a completion after "Answer:" naturally
continues (and the way the transformers engine scores them), so the constrained choice and
the log-likelihood scoring see the same tokens. A reply is parsed back into a declared label
or rejected with `MalformedOutput`, which `udfs.annotator` turns into that row's error.

Confidence from a constrained choice. The choice grammar lets the sampler pick, at each step,
only tokens that keep the text a prefix of some choice. `constrained_probability` replays
that: at every generated step it renormalises the returned top-k log-probabilities over the
tokens the grammar allows and multiplies the chosen token's share. The product is the
probability the model, restricted to the declared labels, gives to the generated answer; over
all labels these sum to 1 when every allowed token is within the top-k. Tokens are compared
as decoded strings, so this works the same for vLLM's in-process output (token ids with
decoded strings) and for an OpenAI-compatible server (token strings only), and needs no
tokenizer on the client.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from udfs.spec import Attribute, Caption


class MalformedOutput(ValueError):
    """A model reply that is not one of the declared labels (or lacks what we asked for)."""


def choices(attribute: Attribute) -> list[str]:
    return [" " + label for label in attribute.labels]


def label_of(text: str | None, attribute: Attribute) -> str:
    """The declared label a reply names, or MalformedOutput."""
    label = (text or "").strip()
    if label not in attribute.labels:
        raise MalformedOutput(
            f"model answered {text!r}, which is not one of {list(attribute.labels)}")
    return label


def classify_request(attribute: Attribute, top_logprobs: int) -> dict:
    """Sampling options for a constrained, greedy choice among the labels.

    The same mapping is vLLM's SamplingParams kwargs (with structured_outputs wrapped in
    StructuredOutputsParams) and the body extension of vLLM's OpenAI-compatible server.
    """
    # A byte-level token covers at least one byte, so this bounds the longest label; the
    # grammar ends the answer as soon as a label is complete.
    longest = max(len(c.encode("utf-8")) for c in choices(attribute))
    return {"temperature": 0.0, "max_tokens": longest + 1, "logprobs": top_logprobs,
            "structured_outputs": {"choice": choices(attribute)}}


def caption_request(caption: Caption) -> dict:
    return {"temperature": 0.0, "max_tokens": caption.max_tokens}


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def constrained_probability(tokens: Sequence[str], steps: Sequence[Mapping[str, float]],
                            chosen: str, options: Sequence[str]) -> float:
    """Probability of generating `chosen` token by token when only `options` are allowed.

    tokens: the generated tokens as strings; steps: per generated token, the returned
    top log-probabilities {token string: logprob} (the generated token's own logprob must be
    among them). Tokens past the end of `chosen` (end-of-sequence) are ignored.
    """
    if chosen not in options:
        raise MalformedOutput(f"answer {chosen!r} is not one of the offered choices {options}")
    if len(tokens) != len(steps):
        raise MalformedOutput(f"{len(tokens)} tokens but {len(steps)} logprob steps")
    prefix, logp = "", 0.0
    for token, step in zip(tokens, steps):
        if len(prefix) >= len(chosen):
            break
        if not token:  # a special token that decodes to nothing carries no text
            continue
        if not chosen.startswith(prefix + token) or token not in step:
            raise MalformedOutput(
                f"generated token {token!r} after {prefix!r} does not spell {chosen!r} "
                "or has no logprob")
        allowed = [lp for t, lp in step.items()
                   if t and any(o.startswith(prefix + t) for o in options)]
        logp += step[token] - _logsumexp(allowed)
        prefix += token
    if prefix != chosen:
        raise MalformedOutput(f"generated tokens spell {prefix!r}, not {chosen!r}")
    return math.exp(logp)
