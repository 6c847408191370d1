"""Feature rows -> model matrix: the one definition shared by training and serving.

Training gets feature rows from Feast's point-in-time join and calls `FeatureSet.matrix`;
the service encodes online rows once per entity (`encode_items`, `encode_users`, cached)
and joins them per request with `assemble`. `matrix` is those same three steps, so a
column means the same thing in both. A
`FeatureSet` is fixed by the spec (attribute label lists become fixed categorical
categories), the number of caption-token buckets and the ablation variant, and it is saved
with the model (`to_dict`/`from_dict`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

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

    @cached_property
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

    # The matrix is built in two halves that serving caches separately: an item block (one
    # row per item, user-independent) and a user block. `assemble` joins them, computing the
    # one cross feature; `matrix` (training) and the service both go through it.

    @cached_property
    def item_columns(self) -> list[str]:
        """Columns of the item block: every model input but the user stats and the cross
        feature (which `assemble` computes), labels as codes."""
        not_items = {*USER_BASELINE, f"user_share_{self.share_attribute}"}
        return [c for c in self.columns if c not in not_items]

    @cached_property
    def user_columns(self) -> list[str]:
        """Columns of the user block: the user stats, then the per-label shares."""
        return [*USER_BASELINE, *(self._share_columns() if self._annotated else [])]

    def encode_items(self, rows: pd.DataFrame) -> np.ndarray:
        """Item feature rows (as Feast names them) -> the item block, float64.

        A label becomes its index in the spec's label list (NaN when null or outside the
        list, so an unexpected label can never shift the codes); no caption is NaN in every
        bucket, an empty caption is zero counts.
        """
        _require(rows, [r.split(":", 1)[1] for r in self.item_refs()])
        out = {c: _numeric(rows[c]) for c in ITEM_BASELINE}
        if self._annotated:
            for name, labels in self.attributes:
                out[f"{name}_label"] = _codes(rows[f"{name}_label"], labels)
                out[f"{name}_confidence"] = _numeric(rows[f"{name}_confidence"])
        if self._captioned:
            tokens = [t if isinstance(t, (list, tuple, np.ndarray)) else None
                      for t in rows["caption_tokens"]]
            counts = bucket_counts(tokens, self.n_buckets).astype(np.float64)
            counts[[t is None for t in tokens]] = np.nan  # no caption is not an empty caption
            out.update({f"caption_bucket_{i:02d}": counts[:, i] for i in range(self.n_buckets)})
        return _stack([out[c] for c in self.item_columns], len(rows))

    def encode_users(self, rows: pd.DataFrame) -> np.ndarray:
        """User feature rows -> the user block, float64."""
        _require(rows, [r.split(":", 1)[1] for r in self.user_refs()])
        return _stack([_numeric(rows[c]) for c in self.user_columns], len(rows))

    def assemble(self, items: np.ndarray, users: np.ndarray) -> np.ndarray:
        """The model matrix (float64, `columns` order) from an item block and a user block
        with one row per item row, or a single row that every item row shares."""
        n, (to_item, to_user, code_col, to_cross) = len(items), self._layout
        users = np.broadcast_to(users, (n, len(self.user_columns)))
        out = np.empty((n, len(self.columns)))
        out[:, to_item] = items
        out[:, to_user] = users[:, :len(USER_BASELINE)]
        if to_cross is not None:
            # the user's past share of items carrying this item's label
            codes = items[:, code_col]
            known = ~np.isnan(codes)
            shares = users[:, len(USER_BASELINE):]
            picked = shares[np.arange(n), np.where(known, codes, 0).astype(np.intp)]
            out[:, to_cross] = np.where(known, picked, np.nan)
        return out

    @cached_property
    def _layout(self) -> tuple[list[int], list[int], int | None, int | None]:
        """Where the blocks go in the matrix: item and user-stat positions, and for the
        cross feature the item block's label-code column and the matrix position."""
        cols = self.columns
        cross = self._annotated and self.share_attribute
        return ([cols.index(c) for c in self.item_columns],
                [cols.index(c) for c in USER_BASELINE],
                self.item_columns.index(f"{self.share_attribute}_label") if cross else None,
                cols.index(f"user_share_{self.share_attribute}") if cross else None)

    def matrix(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The model matrix for feature rows holding both item and user columns, labels as
        categoricals over the spec's label list (what XGBoost trains on)."""
        x = self.assemble(self.encode_items(rows), self.encode_users(rows))
        out = pd.DataFrame(x, columns=self.columns, index=rows.index)
        if self._annotated:
            for name, labels in self.attributes:
                codes = out[f"{name}_label"].to_numpy()
                out[f"{name}_label"] = pd.Categorical.from_codes(
                    np.where(np.isnan(codes), -1, codes).astype(np.int64), categories=list(labels))
        return out


def _require(rows: pd.DataFrame, needed: list[str]) -> None:
    absent = [c for c in needed if c not in rows.columns]
    if absent:
        raise KeyError(f"feature rows lack columns {absent}")


def _stack(cols: list[np.ndarray], n: int) -> np.ndarray:
    return np.column_stack(cols) if cols else np.empty((n, 0))


def _codes(col: pd.Series, labels: tuple[str, ...]) -> np.ndarray:
    codes = pd.Categorical(col.to_numpy(object), categories=list(labels)).codes
    return np.where(codes >= 0, codes, np.nan)


def _numeric(col: pd.Series) -> np.ndarray:
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
