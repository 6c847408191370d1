"""A student classifier distilled from an engine's (the teacher's) labels.

The student is a multinomial logistic regression on sentence embeddings: cheap to train on a
CPU, cheap to run, and it gives a probability per label like every engine. It is stored as
plain numpy arrays plus a JSON card (no pickle), so loading a student runs no code.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class Student:
    attribute: str
    labels: list[str]          # the classes, in the row order of coef
    attribute_version: str     # the spec attribute the teacher labelled under
    spec_version: str
    teacher: str               # the teacher engine's model_name
    embedding: str             # the embedding engine's model_name
    coef: np.ndarray = field(repr=False)       # (n_labels, dim)
    intercept: np.ndarray = field(repr=False)  # (n_labels,)
    report: dict = field(default_factory=dict)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        z = embeddings @ self.coef.T + self.intercept
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, directory: str | Path) -> Path:
        """Writes <attribute>.json and <attribute>.npz; other attributes' students stay."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / f"{self.attribute}.npz", coef=self.coef, intercept=self.intercept)
        card = {k: v for k, v in asdict(self).items() if k not in ("coef", "intercept")}
        path = directory / f"{self.attribute}.json"
        path.write_text(json.dumps(card, indent=2))
        return path

    @classmethod
    def load(cls, card_path: str | Path) -> "Student":
        card_path = Path(card_path)
        card = json.loads(card_path.read_text())
        weights = np.load(card_path.with_suffix(".npz"))
        return cls(**card, coef=weights["coef"], intercept=weights["intercept"])


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
