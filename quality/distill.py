"""A student classifier distilled from an engine's (the teacher's) labels.

The student is a multinomial logistic regression on sentence embeddings: cheap to train on a
CPU, cheap to run, and it gives a probability per label like every engine. It is stored as
plain numpy arrays plus a JSON card (no pickle), so loading a student runs no code.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# the model itself lives with its engine, so executors need udfs/ only
from udfs.engines.student import Student  # noqa: F401 - re-exported for training code


def holdout_split(labels: Sequence[str], fraction: float = 0.2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices, stratified by label; a label seen once stays in train."""
    if not 0 < fraction < 1:
        raise ValueError("the held-out fraction must be in (0, 1)")
    labels = np.asarray(labels, dtype=object)
    rng = np.random.default_rng(seed)
    test = []
    for lab in sorted(set(labels)):
        rows = rng.permutation(np.flatnonzero(labels == lab))
        test.extend(rows[: int(len(rows) * fraction)])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test] = True
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def fit(embeddings: np.ndarray, labels: Sequence[str], c: float = 10.0,
        seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Classes, coef (n_classes, dim) and intercept of a multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression

    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"the teacher used only {classes}; a student needs two labels or more")
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model.fit(embeddings, list(labels))
    coef, intercept = model.coef_, model.intercept_
    if len(classes) == 2:  # sklearn keeps one row for two classes: p1 = softmax([0, z])[1]
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    return [str(c) for c in model.classes_], coef, intercept
