"""The `student` engine: labels from a classifier distilled from another engine.

    {"type": "student", "path": "artifacts/student"}      # directory written by spark_jobs.distill

A student directory holds one <attribute>.json/.npz pair per distilled attribute. The student
embeds texts with the embedded MiniLM encoder (the same one it was trained on) and applies
its logistic regression; the confidence is the predicted label's probability. It refuses an
attribute it was not trained on, and one whose spec definition changed since distillation
(its labels would mean something else): both raise, and the annotator turns that into row
errors. Captions fall back to the embedding engine's descriptor captions, so items routed to
the student still get a caption when the spec lists descriptors.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from udfs.engines.base import Engine, Labels
from udfs.engines.embedding import EmbeddingEngine
from udfs.spec import Attribute, Caption


@dataclass
class Student:
    """A distilled student: logistic regression on the encoder's embeddings (numpy arrays
    plus a JSON card, no pickle: loading runs no code). Trained by quality.distill."""
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


class StudentError(ValueError):
    """The student cannot label this attribute; the message says why."""


def _cards(path) -> list[Path]:
    root = Path(path)
    cards = [root] if root.suffix == ".json" else sorted(root.glob("*.json"))
    if not cards:
        raise FileNotFoundError(f"no distilled student (*.json) found at {path}")
    return cards


class StudentEngine(Engine):
    @classmethod
    def name_for(cls, options: dict) -> str:
        """student:<attributes>:<teachers>, from the cards alone (no weights loaded)."""
        cards = [json.loads(c.read_text()) for c in _cards(options["path"])]
        attributes = sorted(c["attribute"] for c in cards)
        teachers = sorted({c["teacher"] for c in cards})
        return f"student:{','.join(attributes)}:{','.join(teachers)}"

    def __init__(self, path: str, model_path: str | None = None, batch_size: int = 128,
                 device: str = "cpu", threads: int | None = None, backend: str | None = None,
                 quantize: str | None = None):
        self.students = {s.attribute: s for s in map(Student.load, _cards(path))}
        self.path = str(path)
        self.encoder = EmbeddingEngine(model_path=model_path, batch_size=batch_size,
                                       device=device, threads=threads, backend=backend,
                                       quantize=quantize)
        for s in self.students.values():
            if s.embedding not in self.encoder.same_labels(self.encoder.model_name):
                raise StudentError(f"student {s.attribute!r} was trained on {s.embedding} "
                                   f"embeddings, this engine encodes with "
                                   f"{self.encoder.model_name}")
        self.model_name = self.name_for({"path": path})

    def _student(self, attribute: Attribute):
        student = self.students.get(attribute.name)
        if student is None:
            raise StudentError(f"no student for attribute {attribute.name!r} at {self.path}; "
                               f"it was distilled for {sorted(self.students)}")
        if student.attribute_version != attribute.version:
            raise StudentError(
                f"the student for {attribute.name!r} learned attribute version "
                f"{student.attribute_version}, the spec now has {attribute.version}; "
                "distill it again from fresh annotations")
        return student

    def classify(self, texts: Sequence[str], attribute: Attribute) -> Labels:
        student = self._student(attribute)
        probs = student.predict_proba(self.encoder.embed(texts))
        best = probs.argmax(axis=1)
        known = {lab: i for i, lab in enumerate(student.labels)}  # a class never seen: 0
        scores = np.stack([probs[:, known[lab]] if lab in known else np.zeros(len(probs))
                           for lab in attribute.labels], axis=1)
        return Labels(labels=[student.labels[i] for i in best],
                      confidences=[float(probs[r, i]) for r, i in enumerate(best)],
                      scores=scores)

    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        return self.encoder.caption(texts, caption)

    def close(self) -> None:
        self.encoder.close()
