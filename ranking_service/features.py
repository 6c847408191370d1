"""Feature rows -> model matrix: the one definition shared by training and serving.

Training gets feature rows from Feast's point-in-time join, the service from the online
store; both hand them to `FeatureSet.matrix`, so a column means the same thing in both. A
`FeatureSet` is fixed by the spec (attribute label lists become fixed categorical
categories), the number of caption-token buckets and the ablation variant, and it is saved
with the model (`to_dict`/`from_dict`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from udfs.spec import Spec
from udfs.tokens import bucket_counts

ITEM_ANNOTATIONS, ITEM_STATS, USER_STATS = "item_annotations", "item_stats", "user_stats"
ITEM_BASELINE = ("item_n_ratings", "item_mean_rating")
USER_BASELINE = ("user_n_ratings", "user_mean_rating")
# Ablation variants, each adding to the one before.
VARIANTS = ("baseline", "attributes", "captions")


def share_column(attribute: str, label: str) -> str:
    """user_stats column holding the user's past share of items with this label."""
    return f"user_{attribute}_share_" + re.sub(r"\W", "_", label)


@dataclass(frozen=True)
class FeatureSet:
    attributes: tuple[tuple[str, tuple[str, ...]], ...]  # (name, labels) in spec order
    share_attribute: str | None = None  # attribute whose per-label user shares personalise
    n_buckets: int = 32
    variant: str = "captions"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        if self.share_attribute and self.share_attribute not in dict(self.attributes):
            raise ValueError(f"share attribute {self.share_attribute!r} is not a spec attribute")
        if self.n_buckets < 1:
            raise ValueError("n_buckets must be >= 1")

    @classmethod
    def from_spec(cls, spec: Spec, share_attribute: str | None = "vibe", n_buckets: int = 32,
                  variant: str = "captions") -> FeatureSet:
        return cls(tuple((n, a.labels) for n, a in spec.attributes.items()),
                   share_attribute, n_buckets, variant)

    def with_variant(self, variant: str) -> FeatureSet:
        return FeatureSet(self.attributes, self.share_attribute, self.n_buckets, variant)

    def to_dict(self) -> dict:
        return {"attributes": {n: list(labels) for n, labels in self.attributes},
                "share_attribute": self.share_attribute, "n_buckets": self.n_buckets,
                "variant": self.variant}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSet:
        return cls(tuple((n, tuple(labels)) for n, labels in d["attributes"].items()),
                   d.get("share_attribute"), int(d["n_buckets"]), d["variant"])

    @property
    def _annotated(self) -> bool:
        return self.variant != "baseline"

    @property
    def _captioned(self) -> bool:
        return self.variant == "captions"

    def _share_columns(self) -> list[str]:
        attr = self.share_attribute
        return [share_column(attr, lab) for lab in dict(self.attributes)[attr]] if attr else []

    def item_refs(self) -> list[str]:
        """Feast feature references keyed by item."""
        refs = [f"{ITEM_STATS}:{c}" for c in ITEM_BASELINE]
        if self._annotated:
            refs += [f"{ITEM_ANNOTATIONS}:{n}_{s}" for n, _ in self.attributes
                     for s in ("label", "confidence")]
        if self._captioned:
            refs.append(f"{ITEM_ANNOTATIONS}:caption_tokens")
        return refs

    def user_refs(self) -> list[str]:
        """Feast feature references keyed by user."""
        refs = [f"{USER_STATS}:{c}" for c in USER_BASELINE]
        if self._annotated and self.share_attribute:
            refs += [f"{USER_STATS}:{c}" for c in self._share_columns()]
        return refs

    @property
    def columns(self) -> list[str]:
        """The model's input columns, in order."""
        cols = [*ITEM_BASELINE, *USER_BASELINE]
        if self._annotated:
            cols += [f"{n}_{s}" for n, _ in self.attributes for s in ("label", "confidence")]
            if self.share_attribute:
                cols.append(f"user_share_{self.share_attribute}")
        if self._captioned:
            cols += [f"caption_bucket_{i:02d}" for i in range(self.n_buckets)]
        return cols

    def matrix(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The model matrix for feature rows named as Feast returns them (no view prefix).

        Missing values stay NaN (XGBoost routes them); labels outside the spec's list become
        NaN too, so an unexpected label can never shift the category codes.
        """
        needed = [r.split(":", 1)[1] for r in self.item_refs() + self.user_refs()]
        absent = [c for c in needed if c not in rows.columns]
        if absent:
            raise KeyError(f"feature rows lack columns {absent}")
        out = {c: _numeric(rows[c]) for c in (*ITEM_BASELINE, *USER_BASELINE)}
        if self._annotated:
            for name, labels in self.attributes:
                out[f"{name}_label"] = pd.Categorical(rows[f"{name}_label"].to_numpy(object),
                                                      categories=list(labels))
                out[f"{name}_confidence"] = _numeric(rows[f"{name}_confidence"])
            if self.share_attribute:
                out[f"user_share_{self.share_attribute}"] = self._cross(
                    out[f"{self.share_attribute}_label"], rows)
        if self._captioned:
            tokens = [t if isinstance(t, (list, tuple, np.ndarray)) else None
                      for t in rows["caption_tokens"]]
            counts = bucket_counts(tokens, self.n_buckets).astype(np.float64)
            counts[[t is None for t in tokens]] = np.nan  # no caption is not an empty caption
            out.update({f"caption_bucket_{i:02d}": counts[:, i] for i in range(self.n_buckets)})
        return pd.DataFrame(out, index=rows.index)[self.columns]

    def _cross(self, labels: pd.Categorical, rows: pd.DataFrame) -> np.ndarray:
        """Per row, the user's past share of items carrying this item's label."""
        shares = np.column_stack([_numeric(rows[c]) for c in self._share_columns()])
        codes = np.asarray(labels.codes)
        picked = shares[np.arange(len(codes)), np.clip(codes, 0, None)]
        return np.where(codes >= 0, picked, np.nan)


def _numeric(col: pd.Series) -> np.ndarray:
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
