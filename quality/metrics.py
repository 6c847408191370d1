"""Agreement between predicted and true labels, and calibration of the confidence.

Labels are strings over a fixed label list (the spec's), so a label that never occurs still
gets its row in the report. Conventions follow scikit-learn with zero_division=0: a
precision, recall or F1 whose denominator is zero is 0. Single-label predictions: report,
score_against_truth; multi-label sets with per-label probabilities: multilabel_report and
its baselines, multilabel_baselines.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import pandas as pd


def confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str],
                     labels: Sequence[str]) -> np.ndarray:
    """counts[i, j] = rows whose true label is labels[i] and predicted label is labels[j]."""
    index = {lab: i for i, lab in enumerate(labels)}
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    unknown = sorted({str(y) for y in (*y_true, *y_pred) if y not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not in the label list {list(labels)}")
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(counts, ([index[y] for y in y_true], [index[y] for y in y_pred]), 1)
    return counts


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=float), where=den > 0)


def per_label(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support (true count) per label of a confusion matrix."""
    tp = np.diag(cm).astype(float)
    precision = _ratio(tp, cm.sum(axis=0).astype(float))
    recall = _ratio(tp, cm.sum(axis=1).astype(float))
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": cm.sum(axis=1)}


def accuracy(cm: np.ndarray) -> float:
    return float(np.trace(cm) / cm.sum()) if cm.sum() else 0.0


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over the labels that occur (as truth or prediction)."""
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(per_label(cm)["f1"][present].mean()) if present.any() else 0.0


def cohen_kappa(cm: np.ndarray) -> float:
    """Agreement beyond chance: (p_o - p_e) / (1 - p_e)."""
    n = cm.sum()
    if n == 0:
        return 0.0
    p_o = np.trace(cm) / n
    p_e = float(cm.sum(axis=0) @ cm.sum(axis=1)) / n ** 2
    return float((p_o - p_e) / (1 - p_e)) if p_e < 1 else 1.0


def reliability(confidence: Sequence[float], correct: Sequence[bool],
                n_bins: int = 10) -> dict[str, list]:
    """Per equal-width confidence bin over [0, 1]: count, mean confidence, accuracy."""
    conf = np.asarray(confidence, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.shape != hit.shape:
        raise ValueError("confidence and correct must have the same length")
    if np.any((conf < 0) | (conf > 1)) or np.isnan(conf).any():
        raise ValueError("confidences must lie in [0, 1]")
    # Bins are (lo, hi]; a confidence of exactly 0 goes to the first bin.
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    mean_conf = _ratio(np.bincount(bins, conf, n_bins), count.astype(float))
    acc = _ratio(np.bincount(bins, hit, n_bins), count.astype(float))
    return {"lower": (np.arange(n_bins) / n_bins).tolist(),
            "upper": (np.arange(1, n_bins + 1) / n_bins).tolist(),
            "count": count.tolist(), "confidence": mean_conf.tolist(), "accuracy": acc.tolist()}


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool],
                               n_bins: int = 10) -> float:
    """Sum over bins of (bin share) x |accuracy - mean confidence|."""
    table = reliability(confidence, correct, n_bins)
    count = np.asarray(table["count"], dtype=float)
    if count.sum() == 0:
        return 0.0
    gap = np.abs(np.asarray(table["accuracy"]) - np.asarray(table["confidence"]))
    return float((count / count.sum()) @ gap)


def report(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, kappa, per-label scores and the confusion matrix, JSON-ready."""
    cm = confusion_matrix(y_true, y_pred, labels)
    scores = per_label(cm)
    return {
        "n": int(cm.sum()),
        "accuracy": accuracy(cm),
        "macro_f1": macro_f1(cm),
        "kappa": cohen_kappa(cm),
        "per_label": {lab: {"precision": float(scores["precision"][i]),
                            "recall": float(scores["recall"][i]),
                            "f1": float(scores["f1"][i]),
                            "support": int(scores["support"][i])}
                      for i, lab in enumerate(labels)},
        "confusion_matrix": {"labels": list(labels), "counts": cm.tolist()},
    }


def score_against_truth(predicted: Sequence[str], confidence: Sequence[float],
                        truth: Sequence[frozenset], labels: Sequence[str],
                        n_bins: int = 10) -> dict:
    """Score single-label predictions against multi-label human truth.

    Two honest views: `strict` takes the items whose human labels map to exactly one spec
    label, where a prediction is simply right or wrong (accuracy, macro-F1, kappa, per-label
    scores, confusion matrix, calibration); `hit` takes every item with at least one human
    label and counts a prediction right when it is any of them (hit rate, calibration).
    Items with no human label in the spec are counted and left out.
    """
    pred = np.asarray(predicted, dtype=object)
    conf = np.asarray(confidence, dtype=float)
    sizes = np.array([len(t) for t in truth])
    single = sizes == 1
    strict_truth = [next(iter(t)) for t, s in zip(truth, single) if s]
    strict = report(strict_truth, pred[single].tolist(), labels)
    strict_correct = pred[single] == np.asarray(strict_truth, dtype=object)
    strict["ece"] = expected_calibration_error(conf[single], strict_correct, n_bins)
    strict["reliability"] = reliability(conf[single], strict_correct, n_bins)
    strict["mean_confidence"] = float(conf[single].mean()) if single.any() else 0.0
    # what always answering the most common true label would score: the bar to beat
    strict["majority_baseline"] = (max(Counter(strict_truth).values()) / len(strict_truth)
                                   if strict_truth else 0.0)
    known = sizes >= 1
    hit = np.array([p in t for p, t in zip(pred, truth)], dtype=bool)[known]
    return {
        "items": int(len(pred)),
        "items_without_truth": int((~known).sum()),
        "strict": strict,
        "hit": {"n": int(known.sum()), "hit_rate": float(hit.mean()) if known.any() else 0.0,
                "ece": expected_calibration_error(conf[known], hit, n_bins),
                "reliability": reliability(conf[known], hit, n_bins)},
    }


# ---- multi-label attributes: each item has a set of labels, each label a probability ----
#
# Sets are boolean indicator matrices [items, labels] over the spec's label list; scores are
# the per-label probabilities aligned with it. Averages follow the single-label conventions
# above: zero denominators give 0, macro averages run over the labels that occur (as truth or
# prediction). A label's AUC needs both classes among the items; it is None where it has one.


def indicator(sets: Sequence, labels: Sequence[str]) -> np.ndarray:
    """bool [items, labels]: whether each item's set holds each label."""
    index = {lab: i for i, lab in enumerate(labels)}
    out = np.zeros((len(sets), len(labels)), dtype=bool)
    for row, chosen in enumerate(sets):
        unknown = sorted({str(c) for c in chosen if c not in index})
        if unknown:
            raise ValueError(f"labels {unknown} are not in the label list {list(labels)}")
        out[row, [index[c] for c in chosen]] = True
    return out


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative, ties counting one half (Mann-Whitney with average ranks). None when the
    items hold one class only."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def set_scores(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Micro and macro F1, per-item Jaccard and exact match of predicted sets against true
    ones (bool [items, labels] each), plus per-label precision, recall, F1 and counts."""
    t, p = np.asarray(truth, dtype=bool), np.asarray(predicted, dtype=bool)
    if t.shape != p.shape:
        raise ValueError(f"truth {t.shape} and predictions {p.shape} differ in shape")
    tp = (t & p).sum(axis=0).astype(float)
    support, chosen = t.sum(axis=0).astype(float), p.sum(axis=0).astype(float)
    precision, recall = _ratio(tp, chosen), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = (support + chosen) > 0
    micro_p = float(tp.sum() / chosen.sum()) if chosen.sum() else 0.0
    micro_r = float(tp.sum() / support.sum()) if support.sum() else 0.0
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
    union = (t | p).sum(axis=1)
    # two empty sets agree completely
    jaccard = np.where(union > 0, (t & p).sum(axis=1) / np.maximum(union, 1), 1.0)
    n = len(t)
    return {
        "n": int(n),
        "micro_precision": micro_p, "micro_recall": micro_r, "micro_f1": float(micro_f1),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "jaccard": float(jaccard.mean()) if n else 0.0,
        "exact_match": float((t == p).all(axis=1).mean()) if n else 0.0,
        "mean_labels": float(p.sum(axis=1).mean()) if n else 0.0,
        "mean_true_labels": float(t.sum(axis=1).mean()) if n else 0.0,
        "_per_label": {"precision": precision, "recall": recall, "f1": f1,
                       "support": support.astype(int), "predicted": chosen.astype(int)},
    }


def multilabel_report(truth: np.ndarray, predicted: np.ndarray, scores: np.ndarray | None,
                      labels: Sequence[str], n_bins: int = 10) -> dict:
    """Set metrics of the predicted sets and, given the per-label probabilities, each
    label's AUC, their macro mean and the calibration of the probabilities over every
    item x label pair (ECE, reliability bins: the share of pairs whose label is true against
    the mean probability, per bin; Brier score). JSON-ready."""
    out = set_scores(truth, predicted)
    per = out.pop("_per_label")
    t = np.asarray(truth, dtype=bool)
    aucs: list[float | None] = [None] * len(labels)
    if scores is not None:
        s = np.asarray(scores, dtype=float)
        if s.shape != t.shape:
            raise ValueError(f"scores {s.shape} and truth {t.shape} differ in shape")
        aucs = [auc(s[:, j], t[:, j]) for j in range(len(labels))]
        defined = [a for a in aucs if a is not None]
        out["macro_auc"] = float(np.mean(defined)) if defined else None
        out["auc_labels"] = len(defined)
        out["ece"] = expected_calibration_error(s.ravel(), t.ravel(), n_bins)
        out["reliability"] = reliability(s.ravel(), t.ravel(), n_bins)
        out["brier"] = float(np.mean((s - t) ** 2)) if s.size else 0.0
        out["mean_score"] = float(s.mean()) if s.size else 0.0
    out["per_label"] = {lab: {"precision": float(per["precision"][j]),
                              "recall": float(per["recall"][j]), "f1": float(per["f1"][j]),
                              "support": int(per["support"][j]),
                              "predicted": int(per["predicted"][j]), "auc": aucs[j]}
                        for j, lab in enumerate(labels)}
    return out


def label_frequencies(truth: np.ndarray) -> np.ndarray:
    """Each label's share of the items whose set holds it."""
    t = np.asarray(truth, dtype=bool)
    return t.mean(axis=0) if len(t) else np.zeros(t.shape[1])


def majority_sets(frequencies: Sequence[float], n_items: int, min_labels: int = 0,
                  max_labels: int | None = None) -> np.ndarray:
    """The majority baseline: the same set for every item, each label in it iff it is in more
    than half of the training items; the most frequent labels (spec order among equals) added
    up to min_labels, kept down to max_labels."""
    freq = np.asarray(frequencies, dtype=float)
    order = sorted(range(len(freq)), key=lambda j: -freq[j])
    chosen = [j for j in order if freq[j] > 0.5]
    chosen = order[:max(len(chosen), min_labels)]
    if max_labels is not None:
        chosen = chosen[:max_labels]
    row = np.zeros(len(freq), dtype=bool)
    row[chosen] = True
    return np.tile(row, (n_items, 1))


def frequency_scores(frequencies: Sequence[float], n_items: int) -> np.ndarray:
    """The label-frequency baseline's probabilities: each label its training frequency."""
    return np.tile(np.asarray(frequencies, dtype=float), (n_items, 1))


def multilabel_baselines(train_truth: np.ndarray, truth: np.ndarray, attribute,
                         n_bins: int = 10) -> dict:
    """Both baselines fitted on `train_truth` and scored on `truth` (bool [items, labels]):
    `majority` (majority_sets, set metrics only: it has no scores) and `label_frequency`
    (every item scored with the training frequencies, then chosen with the attribute's own
    rule, Attribute.choose: its AUCs are 0.5, its calibration is the marginals')."""
    labels = attribute.labels
    freq = label_frequencies(train_truth)
    n = len(truth)
    majority = majority_sets(freq, n, attribute.min_labels, attribute.max_labels)
    majority_report = multilabel_report(truth, majority, None, labels, n_bins)
    majority_report["labels"] = [lab for lab, m in zip(labels, majority[0] if n else []) if m]
    scores = frequency_scores(freq, n)
    chosen = attribute.choose(list(freq))
    freq_report = multilabel_report(truth, indicator([chosen] * n, labels), scores, labels,
                                    n_bins)
    freq_report["labels"] = list(chosen)
    return {"train_items": int(len(train_truth)),
            "frequencies": {lab: float(f) for lab, f in zip(labels, freq)},
            "majority": majority_report, "label_frequency": freq_report}
