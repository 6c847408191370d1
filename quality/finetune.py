"""The pure core of fine-tuning an LLM on human labels (spark_jobs.finetune does the I/O).

What is trained is exactly what the generative engines score (udfs.engines.prompts): a label's
score is the summed log-probability of its tokens, taken in context, after the rendered prompt.
One training example is therefore the engine's context ids (the prompt, left-truncated as the
transformers engine truncates it) followed by the human label's continuation ids, with the
loss on those label tokens only. Nothing here imports torch or reads files:

- `check_inputs`: every reason the inputs cannot be trained on, one line each (labels outside
  the spec's label set, unknown item ids, duplicate item ids, too few items per label).
- `split`: a held-out split, stratified by label and deterministic in the seed (it depends on
  the set of (item id, label) pairs, not on their order); `subset` takes the first N of a
  seeded permutation of the training split (or of the held-out one, to score a sample), so
  smaller subsets nest in larger ones (a learning curve's points differ only by the items
  added).
- `check_label_sets`, `strata`, `label_set`: the same for a multi-label attribute, whose human
  labels are a set per item ("|"-separated) and whose split is stratified by each item's
  rarest label; its training examples are the yes/no answers to its per-label questions
  (udfs.spec.Attribute.questions), as Engine.tag asks them. `balance_weights` weights those
  answers so that each label's yes and no carry equal totals; `fit_thresholds` picks each
  label's decision threshold on a development split (udfs.engines.calibration applies it).
- `check_split`: a held-out split that shares an item id, or an item text, with the training
  split is refused.
- `example`: one (ids, number of label tokens) pair; `batches`: a seeded order per epoch.
- `data_hash`: a hash of what was trained and held out (ids, texts, labels, split).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from udfs.engines.prompts import answer_separator, label_continuations, truncate_left
from udfs.spec import Attribute

MIN_PER_LABEL = 2  # one to train on, one to hold out


class FinetuneError(ValueError):
    """Inputs that cannot be fine-tuned on; each line of the message is one problem."""


def _ids_text(ids: Sequence, limit: int = 5) -> str:
    ids = list(ids)
    shown = ", ".join(map(repr, ids[:limit]))
    return f"{shown}, ... ({len(ids)} in all)" if len(ids) > limit else shown


def _common_problems(item_ids: Sequence, used: set, attribute: Attribute, known_items: set,
                     one_row: str) -> list[str]:
    """Labels outside the spec's set, unknown item ids, items labelled twice."""
    problems = []
    outside = sorted(used - set(attribute.labels))
    if outside:
        problems.append(f"labels outside the spec's label set for {attribute.name!r}: "
                        f"{_ids_text(outside)}; the spec's labels are "
                        f"{', '.join(attribute.labels)}")
    unknown = sorted({i for i in item_ids if i not in known_items}, key=str)
    if unknown:
        problems.append(f"unknown item ids (not in the items table): {_ids_text(unknown)}")
    dupes = sorted((i for i, n in Counter(item_ids).items() if n > 1), key=str)
    if dupes:
        problems.append(f"item ids labelled more than once: {_ids_text(dupes)}; {one_row}")
    return problems


def check_inputs(item_ids: Sequence, labels: Sequence[str], attribute: Attribute,
                 known_items: set, min_per_label: int = MIN_PER_LABEL) -> list[str]:
    """Every problem with the labelled items, one line each (empty: they can be trained on).

    item_ids/labels: the human labels, one row each; known_items: the item table's ids."""
    problems = _common_problems(item_ids, {str(lab) for lab in labels}, attribute,
                                known_items, "give one label per item")
    counts = Counter(str(lab) for lab in labels if lab in attribute.labels)
    few = {lab: n for lab, n in sorted(counts.items()) if n < min_per_label}
    if few:
        problems.append(f"too few items per label (at least {min_per_label} each, to train "
                        f"on and to hold out): " +
                        ", ".join(f"{lab} {n}" for lab, n in few.items()))
    if not problems and len(counts) < 2:
        problems.append(f"the labels use only {sorted(counts)}; fine-tuning needs two "
                        "labels or more")
    return problems


def label_set(value) -> tuple[str, ...]:
    """A multi-label human label as given: "A|B" (as spark_jobs.evaluate reads truth) or a
    list; stripped, empty parts dropped."""
    parts = value.split("|") if isinstance(value, str) else list(value)
    return tuple(p for p in (str(x).strip() for x in parts) if p)


def check_label_sets(item_ids: Sequence, label_sets: Sequence[tuple[str, ...]],
                     attribute: Attribute, known_items: set,
                     min_per_label: int = MIN_PER_LABEL) -> list[str]:
    """check_inputs for a multi-label attribute: every label needs min_per_label items that
    have it and as many that do not (each answer, yes and no, trained on and held out)."""
    problems = _common_problems(item_ids, {lab for s in label_sets for lab in s}, attribute,
                                known_items, 'give one row per item, its labels "|"-separated')
    n = len(label_sets)
    has = Counter(lab for s in label_sets for lab in set(s))
    few = {lab: has[lab] for lab in attribute.labels if has[lab] < min_per_label}
    if few:
        problems.append(f"too few items per label (at least {min_per_label} each, to train "
                        f"on and to hold out): " +
                        ", ".join(f"{lab} {k}" for lab, k in few.items()))
    common = {lab: n - has[lab] for lab in attribute.labels
              if lab not in few and n - has[lab] < min_per_label}
    if common:
        problems.append(f"too few items without a label (at least {min_per_label} each): " +
                        ", ".join(f"{lab} {k}" for lab, k in common.items()))
    return problems


def strata(label_sets: Sequence[tuple[str, ...]], labels: Sequence[str]) -> list[str]:
    """Each item's rarest label (ties in spec order; "" for an empty set): the key a
    multi-label split is stratified by, so every label, rare ones too, is held out."""
    counts = Counter(lab for s in label_sets for lab in set(s))
    order = {lab: i for i, lab in enumerate(labels)}
    return [min(s, key=lambda lab: (counts[lab], order.get(lab, len(order)))) if s else ""
            for s in label_sets]


@dataclass(frozen=True)
class Split:
    train: tuple  # item ids, sorted
    heldout: tuple


def split(item_ids: Sequence, labels: Sequence[str], holdout: float, seed: int,
          groups: Sequence | None = None, stream: int | None = None) -> Split:
    """Hold out `holdout` of each label's items (at least one, never all), chosen by a
    permutation seeded with `seed` over the label's items in sorted order.

    groups: items of one group (e.g. the same text) go to the same side; a group counts
    under the label of its first item id. stream: another draw from the same seed (the
    development split carved out of the training split)."""
    if not 0 < holdout < 1:
        raise FinetuneError(f"--holdout must be a fraction in (0, 1), not {holdout}")
    groups = list(item_ids) if groups is None else list(groups)
    members: dict = {}
    for item, lab, g in sorted(zip(item_ids, labels, groups), key=lambda r: _sort_key(r[0])):
        members.setdefault(g, []).append((item, str(lab)))
    by_label: dict[str, list] = {}
    for g, rows in members.items():
        by_label.setdefault(rows[0][1], []).append(rows[0][0])  # the group's first item
    first_to_group = {rows[0][0]: g for g, rows in members.items()}
    rng = np.random.default_rng(seed if stream is None else [seed, stream])
    train, held = [], []
    for lab in sorted(by_label):
        units = sorted(by_label[lab], key=_sort_key)
        order = rng.permutation(len(units))
        k = min(max(1, round(len(units) * holdout)), len(units) - 1) if len(units) > 1 else 0
        for rank, i in enumerate(order):
            ids = [item for item, _ in members[first_to_group[units[i]]]]
            (held if rank < k else train).extend(ids)
    return Split(tuple(sorted(train, key=_sort_key)), tuple(sorted(held, key=_sort_key)))


def _sort_key(item) -> tuple:
    return (str(type(item).__name__), item) if not isinstance(item, (int, np.integer)) \
        else ("int", int(item))


def subset(ids: Sequence, n: int | None, seed: int, stream: int = 1) -> tuple:
    """The first n of a seeded permutation of `ids` (all when n is None or larger): nested,
    so the 100 training items of a learning curve are among its 300."""
    items = sorted(ids, key=_sort_key)
    if n is None or n >= len(items):
        return tuple(items)
    if n < 1:
        raise FinetuneError(f"a subset needs at least 1 item, not {n}")
    order = np.random.default_rng([seed, stream]).permutation(len(items))
    return tuple(sorted((items[i] for i in order[:n]), key=_sort_key))


def check_split(train: Sequence, heldout: Sequence, text_of: dict) -> list[str]:
    """A held-out split must share neither an item nor an item text with training."""
    problems = []
    both = sorted(set(train) & set(heldout), key=_sort_key)
    if both:
        problems.append(f"held-out split overlaps training: item ids {_ids_text(both)} are "
                        "in both")
    train_texts = {text_of[i] for i in train}
    same = sorted((i for i in set(heldout) - set(both) if text_of[i] in train_texts),
                  key=_sort_key)
    if same:
        problems.append(f"held-out split overlaps training: held-out items {_ids_text(same)} "
                        "have the same text as a training item")
    if not heldout:
        problems.append("the held-out split is empty")
    return problems


@dataclass(frozen=True)
class TrainingExample:
    ids: tuple[int, ...]  # the engine's context, then the label's continuation
    label_tokens: int     # the last label_tokens ids carry the loss
    weight: float = 1.0   # the example's loss is multiplied by it (balance_weights)


def example(encode: Callable[[str], Sequence[int]], prompt: str, attribute: Attribute,
            label: str, max_prompt_tokens: int | None, bos: int | None) -> TrainingExample:
    """The sequence the engines score for `label` after `prompt`: the context shared by all
    labels (truncated from the left as the transformers engine truncates it), then the
    label's own tokens in context (udfs.engines.prompts.label_continuations)."""
    context, continuations = label_continuations(encode, prompt, attribute.labels,
                                                 answer_separator(attribute))
    context = truncate_left(list(context), max_prompt_tokens, bos)
    tail = continuations[attribute.labels.index(label)]
    return TrainingExample(tuple(context) + tuple(tail), len(tail))


def balance_weights(label_sets: Sequence[Sequence[str]], labels: Sequence[str]) -> np.ndarray:
    """[items, labels] loss weights of a multi-label attribute's yes/no answers: per label,
    the yes answers together weigh as much as the no answers (n / 2 each, for n items).

    Unweighted, the answers are mostly no (12.5% yes for the MovieLens genres) and a model
    learns each label's frequency: every answer no, the set topped up to min_labels with the
    most frequent label (docs/QUALITY.md).
    Balanced, a label's prior is even and what it learns is the item; the per-label
    thresholds fitted on the development split then restore the decision. The weights
    average 1 over each label, so the loss and the learning rate keep their scale; a label
    whose items all answer alike keeps weight 1 (nothing to balance)."""
    truth = np.array([[lab in set(s) for lab in labels] for s in label_sets],
                     dtype=bool).reshape(len(label_sets), len(labels))
    n, yes = len(truth), truth.sum(axis=0)
    both = (yes > 0) & (yes < n)
    w_yes = np.where(both, n / (2 * np.maximum(yes, 1)), 1.0)
    w_no = np.where(both, n / (2 * np.maximum(n - yes, 1)), 1.0)
    return np.where(truth, w_yes, w_no)


def fit_thresholds(probabilities, truth, default: float) -> list[float]:
    """Each label's decision threshold on a development split: the score at or over which
    choosing the label gives the highest F1 there (a tie: the higher threshold, i.e. the
    fewest labels chosen); `default` (the spec's threshold) for a label with no positive.

    probabilities, truth: [items, labels] P(yes) and the human answers."""
    p, y = np.asarray(probabilities, dtype=float), np.asarray(truth, dtype=bool)
    out = []
    for j in range(p.shape[1]):
        positives = int(y[:, j].sum())
        if not positives:
            out.append(float(default))
            continue
        # every cut worth trying is a score (p >= t chooses it), highest first
        candidates = np.unique(p[:, j])[::-1]
        chosen = p[None, :, j] >= candidates[:, None]
        f1 = 2 * (chosen & y[None, :, j]).sum(axis=1) / (positives + chosen.sum(axis=1))
        out.append(float(candidates[int(np.argmax(f1))]))  # argmax: the first, the highest
    return out


def batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices per step: a fresh seeded shuffle each epoch, the last batch short."""
    if batch_size < 1 or epochs < 1:
        raise FinetuneError("--batch-size and --epochs must be at least 1")
    out = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, 2, epoch]).permutation(n).tolist()
        out += [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return out


def data_hash(rows: Sequence[tuple], train: Sequence, heldout: Sequence,
              dev: Sequence = ()) -> str:
    """sha256 over the sorted (item id, text, label) rows and the split (the development
    split only where there is one: the hashes of runs without one stay as they were)."""
    payload = {"rows": sorted([[str(i), t, lab] for i, t, lab in rows]),
               "train": sorted(map(str, train)), "heldout": sorted(map(str, heldout)),
               **({"dev": sorted(map(str, dev))} if len(dev) else {})}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def ids_hash(ids: Sequence) -> str:
    return hashlib.sha256(json.dumps(sorted(map(str, ids))).encode()).hexdigest()[:16]


def estimate_seconds(tokens_per_step: Sequence[int], probe_tokens: int,
                     probe_seconds: float, update_seconds: float = 0.0) -> float:
    """All steps' time: forward and backward extrapolated from a probe step's time per
    token, plus each step's update (clipping, the optimizer), which does not grow with
    the tokens."""
    return (probe_seconds / max(probe_tokens, 1) * sum(tokens_per_step)
            + update_seconds * len(tokens_per_step))
