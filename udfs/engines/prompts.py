"""GPU-free helpers shared by the generative engines: how labels are scored, by token id.

Every generative engine (transformers, vllm, openai) gives the same answer for the same model:
a label's score is the summed log-probability of the tokens of " " + label after the rendered
prompt (of the label alone after a chat-template prompt), and a softmax over the labels gives
the distribution; the answer is its argmax and the confidence its probability. A multi-label
attribute asks one yes/no question per label (Attribute.questions) and a label's probability
is P(" yes") against P(" no"), scored the same way: every engine's numbers agree there too.

The tokens are the model's own, taken in context: `label_continuations` tokenises
prompt + " " + label with the model's tokenizer and keeps what follows the part all labels
(and the prompt) share. Probabilities are then read by token id at each position, never by
matching decoded strings: decoding ids one by one (as vLLM does for logprobs) loses the
leading-space marker of SentencePiece-style tokenizers ("▁dark" decodes to "dark"), and
several ids can decode alike. A needed probability that is missing is an error
(`MalformedOutput`, that row's error), never a renormalised 1.0.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from udfs.engines.base import Engine, Labels
from udfs.engines.calibration import calibrate
from udfs.spec import Attribute, Caption


#: what ends an item text cut to fit a model's context (LabelScoringEngine.fit_text)
TRUNCATION_MARK = " …"


class MalformedOutput(ValueError):
    """A model reply that lacks what we asked for (a row error, never a guess)."""


class ChatTemplateError(ValueError):
    """The spec asks for the chat template (`chat: true`) and the engine cannot apply one."""


def answer_separator(part: Attribute | Caption) -> str:
    """What comes between a prompt and a label: a space after a plain prompt ("Answer:
    Comedy"); nothing after a chat prompt, where the assistant's turn starts afresh."""
    return "" if part.chat else " "


def label_probabilities(loglik: np.ndarray) -> np.ndarray:
    """Softmax over labels (axis 1) of per-label summed log-likelihoods."""
    z = loglik - loglik.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class LabelScoringEngine(Engine):
    """A generative engine: labels from `label_loglik`, the same way for every backend.

    A part (attribute or caption) whose spec sets `chat: true` is rendered as chat messages
    through the model's own chat template, ready for the assistant's answer; `self.tokenizer`
    (a transformers tokenizer, as vLLM's get_tokenizer() also gives) applies it."""

    tokenizer = None  # engines with the model's tokenizer set it
    model_dir = None  # engines loading a local model directory set it (calibrates tag)

    def prompt_limit(self, part: Attribute | Caption) -> int | None:
        """The most tokens a prompt of `part` may have so that the model takes it with its
        answer (None: no limit known). Engines with a context limit override it."""
        return None

    def prompt(self, part: Attribute | Caption, text: str) -> str:
        """The prompt for one item, its text cut at the end to fit (fit_text)."""
        return self._render(part, self.fit_text(part, text, lambda t: self._render(part, t)))

    def fit_text(self, part: Attribute | Caption, text: str,
                 render: Callable[[str], str]) -> str:
        """`text`, or its longest word prefix marked with TRUNCATION_MARK whose `render`
        fits prompt_limit: the end of an item's text goes, never the prompt's question or
        the title at its start, and a row never fails for its length. Counted per part."""
        limit = self.prompt_limit(part)
        # a (byte-level) token covers at least one UTF-8 byte: a short prompt needs no
        # tokenizer (8: room for the special tokens the encoder adds)
        if limit is None or len(render(text).encode("utf-8")) + 8 <= limit:
            return text
        encode = self.encoder(part)
        if len(encode(render(text))) <= limit:
            return text
        words = text.split(" ")
        lo, hi = 0, len(words) - 1  # the most words that fit (0: the mark alone)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(encode(render(" ".join(words[:mid]) + TRUNCATION_MARK))) <= limit:
                lo = mid
            else:
                hi = mid - 1
        self.count_tokens(part.name if isinstance(part, Attribute) else "caption", truncated=1)
        return " ".join(words[:lo]) + TRUNCATION_MARK

    def _render(self, part: Attribute | Caption, text: str) -> str:
        if not part.chat:
            return part.render(text)
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ChatTemplateError(
                f"the spec asks for the chat template (chat: true) but {self.model_name} "
                + ("has none" if self.tokenizer is not None else
                   "has no local tokenizer to apply it; use the transformers or vllm engine, "
                   "or drop chat: true and write the template into the prompt"))
        return self.tokenizer.apply_chat_template(part.messages(text), tokenize=False,
                                                  add_generation_prompt=True)

    def encoder(self, part: Attribute | Caption) -> Callable[[str], list[int]]:
        """Text -> ids as the model reads this part's prompts: a plain prompt gets the
        tokenizer's special tokens (BOS); a chat prompt none, its template wrote them."""
        special = not part.chat
        return lambda s: list(self.tokenizer.encode(s, add_special_tokens=special))

    def label_loglik(self, texts: Sequence[str], attribute: Attribute) -> np.ndarray:
        """Summed log-likelihood of each label after each text's prompt: [texts, labels]."""
        raise NotImplementedError

    def classify(self, texts: Sequence[str], attribute: Attribute) -> Labels:
        probs = label_probabilities(self.label_loglik(texts, attribute))
        best = probs.argmax(axis=1)
        return Labels(labels=[attribute.labels[i] for i in best],
                      confidences=probs[np.arange(len(best)), best].astype(float).tolist(),
                      scores=probs)

    def tag(self, texts: Sequence[str], attribute: Attribute) -> np.ndarray:
        """Each label's P(yes) against P(no), all of a batch's questions in one engine call
        (the questions of one item share its prompt, which a prefix cache computes once)."""
        yes_no = attribute.yes_no()
        # every question carries the item's text: fit it to the longest question
        fitted = [self.fit_text(attribute, text, lambda t: self._render(
            yes_no, max(attribute.questions(t), key=len))) for text in texts]
        questions = [q for text in fitted for q in attribute.questions(text)]
        if not questions:
            return np.zeros((0, len(attribute.labels)))
        yes = label_probabilities(self.label_loglik(questions, yes_no))[:, 0]
        yes = yes.reshape(len(texts), len(attribute.labels))
        return calibrate(self.model_dir, attribute, yes)  # a tuned model's label thresholds


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        first = seqs[0][i]
        if any(s[i] != first for s in seqs[1:]):
            return i
    return n


def label_continuations(encode: Callable[[str], Sequence[int]], prompt: str,
                        labels: Sequence[str], sep: str = " "
                        ) -> tuple[list[int], list[list[int]]]:
    """(context ids, each label's continuation ids), tokenised in context.

    encode: the model's tokenizer, text -> ids, special tokens (BOS) included as for a prompt.
    Each label is tokenised as part of prompt + " " + label, so its tokens are those the model
    would see after the prompt (a SentencePiece tokenizer writes " dark" as "▁dark" there,
    but as "▁", "▁dark" on its own). The context is the longest prefix shared by the prompt's
    and every label's ids: normally the prompt's ids; shorter if a label merges into the
    prompt's last token, in which case the probability of the shared part is common to all
    labels and cancels in the softmax. sep: see answer_separator.
    """
    full = [list(encode(f"{prompt}{sep}{label}")) for label in labels]
    n = _common_prefix([list(encode(prompt)), *full])
    continuations = [ids[n:] for ids in full]
    for label, ids in zip(labels, continuations):
        if not ids:
            raise MalformedOutput(f"label {label!r} adds no token after the prompt")
    return full[0][:n], continuations


#: a trie node of one prompt's label continuations: (ids so far, the ids that may follow)
Node = tuple[tuple[int, ...], tuple[int, ...]]


def label_nodes(context: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[Node]:
    """The trie of the label continuations after `context`: every prefix a label's next token
    is scored after, with the tokens scored there. The root (the context) comes first."""
    children: dict[tuple[int, ...], dict[int, None]] = {}
    context = tuple(context)
    for ids in continuations:
        for i, token in enumerate(ids):
            children.setdefault(context + tuple(ids[:i]), {})[token] = None
    return [(prefix, tuple(tokens)) for prefix, tokens in children.items()]


#: one request: a trie node (prefix, the children scored there) and, optionally, one child
#: forced as the generated token so its own children are scored at the next position
#: (forced id, its children); (prefix, children, None, ()) scores the node alone
Segment = tuple[tuple[int, ...], tuple[int, ...], int | None, tuple[int, ...]]


def plan_segments(children: dict[tuple[int, ...], Sequence[int]], roots: set[tuple[int, ...]],
                  max_ids: int | None = None) -> tuple[list[Segment], list[Segment]]:
    """The requests that score every trie node once, in two waves: (roots, deeper).

    children: every node's prefix -> the tokens scored after it (all prompts' tries merged,
    parents before children). A request scores its node and, by forcing one child as the
    generated token, that child's node in the same sequence, for the cost of one decode step
    instead of a request of its own (which would recompute the prompt's last, partial KV
    block: vLLM caches whole blocks only). A child with no deeper nodes of its own is forced
    first, so the chains left for the second wave start where they branch. max_ids bounds
    the ids one request scores (vLLM's limit on logprob_token_ids): a node with more children
    is scored in several requests, the first in its wave, the others in the second (where
    the prompt's KV blocks are cached).
    """
    covered: set[tuple[int, ...]] = set()
    extra: list[Segment] = []  # the rest of a node's children past max_ids, same prefix

    def inner(node: tuple[int, ...]) -> list[tuple[int, ...]]:
        return [node + (t,) for t in children[node] if node + (t,) in children]

    def segment(node: tuple[int, ...]) -> Segment:
        covered.add(node)
        ids = tuple(children[node])
        step = max_ids or len(ids) or 1
        here = ids[:step]
        extra.extend((node, ids[i:i + step], None, ()) for i in range(step, len(ids), step))
        options = [c for c in inner(node) if c not in covered and (
            max_ids is None or len({*here, *children[c]}) <= max_ids)]
        if not options:
            return node, here, None, ()
        child = min(options, key=lambda c: bool(inner(c)))  # a leaf first, else in order
        covered.add(child)
        return node, here, child[-1], tuple(children[child])

    first = [segment(p) for p in children if p in roots and p not in covered]
    second = [segment(p) for p in children if p not in covered]
    return first, second + extra


def score_labels(encode: Callable[[str], Sequence[int]], prompts: Sequence[str],
                 labels: Sequence[str],
                 run: Callable[[list[Segment]], list[tuple[dict[int, float], dict[int, float]]]],
                 sep: str = " ", max_ids: int | None = None) -> np.ndarray:
    """Summed log-likelihood of each label after each prompt: [prompts, labels].

    run: for segments (plan_segments), the log-probabilities of the children scored at the
    node and, where a child is forced, at that child ({} otherwise); one engine call. The
    roots go in one call, the deeper nodes in a second, which finds the roots' KV blocks in
    the prefix cache.
    """
    tries = [label_continuations(encode, p, labels, sep) for p in prompts]
    children: dict[tuple[int, ...], dict[int, None]] = {}  # merged over prompts, in order
    for context, conts in tries:
        for prefix, tokens in label_nodes(context, conts):
            children.setdefault(prefix, {}).update(dict.fromkeys(tokens))
    roots = {tuple(context) for context, _ in tries}
    logprob: dict[tuple[int, ...], dict[int, float]] = {}
    for wave in plan_segments(children, roots, max_ids):
        if wave:
            for (prefix, _, forced, _), (here, after) in zip(wave, run(wave)):
                logprob.setdefault(prefix, {}).update(here)
                if forced is not None:
                    logprob.setdefault(prefix + (forced,), {}).update(after)
    return np.array([[sum(logprob[tuple(context) + tuple(ids[:i])][t] for i, t in enumerate(ids))
                      for ids in conts] for context, conts in tries],
                    dtype=np.float64).reshape(len(prompts), len(labels))


def continuation_logliks(sequences: Sequence[Sequence[tuple[int | None, float | None]]]
                         ) -> list[float]:
    """Each sequence's summed log-probability past the prefix all of them share.

    sequences: per label, the (token id, log-probability) of every position of
    prompt + " " + label as the model tokenised and scored it (a server's prompt logprobs).
    The shared prefix (the prompt, and any token every label starts with) has the same
    probability under every label and cancels in the softmax over labels.
    """
    n = _common_prefix([[token for token, _ in seq] for seq in sequences])
    out = []
    for seq in sequences:
        tail = [lp for _, lp in seq[n:]]
        if not tail:
            raise MalformedOutput("two labels were tokenised alike; they cannot be told apart")
        if any(lp is None or not math.isfinite(lp) for lp in tail):
            raise MalformedOutput(f"missing or infinite log-probability among {tail}")
        out.append(float(sum(tail)))
    return out


def truncate_left(ids: list[int], max_tokens: int | None, bos: int | None) -> list[int]:
    """The last max_tokens ids (the question sits at the end), keeping a leading BOS."""
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    head = ids[:1] if bos is not None and ids and ids[0] == bos else []
    return head + ids[len(ids) - max_tokens + len(head):]


def caption_request(caption: Caption) -> dict:
    """Sampling options for a caption: greedy, caption.max_tokens new tokens."""
    return {"temperature": 0.0, "max_tokens": caption.max_tokens}
