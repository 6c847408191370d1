"""Agreement between predicted and true labels, and calibration of the confidence.

Labels are strings over a fixed label list (the spec's), so a label that never occurs still
gets its row in the report. Conventions follow scikit-learn with zero_division=0: a
precision, recall or F1 whose denominator is zero is 0.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np


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
