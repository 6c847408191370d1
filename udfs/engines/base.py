"""The one engine interface every backend implements.

An engine gets a batch of clean, de-duplicated texts and returns one result per text, in
order. Engines may raise on a whole batch; `udfs.annotator` isolates the failing rows, so a
backend never has to handle bad input or partial failure itself.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from udfs.spec import Attribute, Caption


@dataclass
class Labels:
    """Per text: the chosen label (always one of the attribute's labels) and its probability."""
    labels: list[str]
    confidences: list[float]


class Engine(ABC):
    #: identifies the model in the provenance columns (e.g. "embedding:all-MiniLM-L6-v2")
    model_name: str = "engine"

    @abstractmethod
    def classify(self, texts: Sequence[str], attribute: Attribute) -> Labels:
        """Pick one label per text."""

    @abstractmethod
    def caption(self, texts: Sequence[str], caption: Caption) -> list[str]:
        """Write a short caption per text."""

    def close(self) -> None:
        """Release the model (GPU memory, connections)."""
