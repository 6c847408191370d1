"""Feature rows -> model matrix: the one definition shared by training and serving.

Training gets feature rows from Feast's point-in-time join and calls `FeatureSet.matrix`;
the service encodes online rows once per entity (`encode_items`, `encode_users`, cached)
and joins them per request with `assemble`. `matrix` is those same three steps, so a
column means the same thing in both. A `FeatureSet` is fixed by the spec (attribute label
lists become fixed categorical categories, the semantic ID's levels and codes fixed
categoricals too), the catalogue's genre vocabulary, the number of caption-token buckets and
the ablation variant, and it is saved with the model (`to_dict`/`from_dict`).

Feature groups, each from its own source:

    stats         item and user interaction statistics (item_stats, user_stats)
    genres        the catalogue's own human genres, multi-hot (item_metadata:genres)
    attributes    LLM attributes by kind (single: label and confidence; ordinal: those and
                  the expected value; multi: one 0/1 column and one score column per
                  label), and the user's past share of the item's label, or for a
                  multi-label attribute the mean share over the item's labels
                  (item_annotations, user_stats)
    captions      hashed bag of the caption's tokens (item_annotations:caption_tokens)
    semantic_ids  the semantic ID's code per level, one categorical each
                  (item_annotations:semantic_id)

A variant is a set of groups (`VARIANTS`); every variant has the statistics.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Sequence

import numpy as np
import pandas as pd

from udfs import schema as S
from udfs.schema import share_column
from udfs.spec import KINDS, Spec
from udfs.tokens import bucket_counts

ITEM_ANNOTATIONS, ITEM_STATS, USER_STATS = "item_annotations", "item_stats", "user_stats"
ITEM_METADATA, GENRES = "item_metadata", "genres"  # the catalogue's own metadata view
GENRE_SEP = "|"
ITEM_BASELINE = ("item_n_ratings", "item_mean_rating")
USER_BASELINE = ("user_n_ratings", "user_mean_rating")
# Ablation variants: the feature groups each adds to the interaction statistics. The LLM
# groups are each measured against "genres" (what a catalogue already has), "all" is served.
VARIANTS = {"baseline": (), "genres": ("genres",),
            "attributes": ("genres", "attributes"), "captions": ("genres", "captions"),
            "semantic_ids": ("genres", "semantic_ids"),
            "all": ("genres", "attributes", "captions", "semantic_ids")}
REFERENCE = "genres"


def cross_column(attribute: str) -> str:
    """Model column: the user's past share of items carrying this item's label."""
    return f"user_share_{attribute}"


def hot_column(attribute: str, label: str) -> str:
    """Model column: 1 when a multi-label attribute's chosen labels include `label`."""
    return f"{attribute}_has_" + re.sub(r"\W", "_", label)


def score_column(attribute: str, label: str) -> str:
    """Model column: a multi-label attribute's probability of `label`."""
    return f"{attribute}_score_" + re.sub(r"\W", "_", label)


def genre_column(genre: str) -> str:
    return "genre_" + re.sub(r"\W", "_", genre.lower())


def sid_column(level: int) -> str:
    """Model column: the semantic ID's code at `level` (1-based), a categorical."""
    return f"sid_l{level}"


def genre_vocabulary(values) -> tuple[str, ...]:
    """The sorted genres of "A|B"-joined genre strings (missing values skipped)."""
    found = {g.strip() for v in values if isinstance(v, str) for g in v.split(GENRE_SEP)}
    return tuple(sorted(g for g in found if g))


@dataclass(frozen=True)
class FeatureSet:
    attributes: tuple[tuple[str, tuple[str, ...]], ...]  # (name, labels) in spec order
    share_attributes: tuple[str, ...] = ()  # attributes whose per-label user shares personalise
    n_buckets: int = 32
    variant: str = "all"
    genres: tuple[str, ...] = ()  # the catalogue's genre vocabulary; () = no genre features
    semantic_levels: int = 0      # the spec's semantic ID: levels and codes; 0 = none
    semantic_codes: int = 0
    # (name, kind) of the attributes that are not single-label ("multi" or "ordinal");
    # an attribute not listed is single-label (and models saved before kinds had only those)
    kinds: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {list(VARIANTS)}")
        names = dict(self.attributes)
        for name, kind in self.kinds:
            if name not in names:
                raise ValueError(f"kind given for {name!r}, not an attribute {list(names)}")
            if kind not in KINDS:
                raise ValueError(f"attribute {name!r}: kind must be one of {list(KINDS)}, "
                                 f"not {kind!r}")
        # single-label kinds are left out, so equal feature sets compare equal
        given = dict(self.kinds)
        object.__setattr__(self, "kinds", tuple(
            (n, given[n]) for n in names if given.get(n, "single") != "single"))
        for name, labels in self.attributes:
            if self.kind(name) == "multi":
                cols = [hot_column(name, lab) for lab in labels]
                if len(set(cols)) != len(cols):
                    raise ValueError(f"attribute {name!r}: labels {list(labels)} collide as "
                                     "column names")
        unknown = [a for a in self.share_attributes if a not in dict(self.attributes)]
        if unknown:
            raise ValueError(f"share attributes {unknown} are not spec attributes "
                             f"{[n for n, _ in self.attributes]}")
        if self.n_buckets < 1:
            raise ValueError("n_buckets must be >= 1")
        names = [genre_column(g) for g in self.genres]
        if len(set(names)) != len(names):
            raise ValueError(f"genres {list(self.genres)} collide as column names")
        if self.semantic_levels < 0 or (self.semantic_levels and self.semantic_codes < 2):
            raise ValueError("semantic_levels must be >= 0, and semantic_codes >= 2 with levels")
        full = replace(self, variant="all") if self.variant != "all" else self
        cols = full.columns
        if len(set(cols)) != len(cols):
            twice = sorted({c for c in cols if cols.count(c) > 1})
            raise ValueError(f"the feature set's columns {twice} appear twice (rename an "
                             "attribute or a label)")

    @classmethod
    def from_spec(cls, spec: Spec, share_attributes: Sequence[str] | None = None,
                  n_buckets: int = 32, variant: str = "all",
                  genres: Sequence[str] = ()) -> FeatureSet:
        """Every spec attribute is a feature; the user shares default to all of them; the
        semantic ID's levels and codes come from the spec."""
        shares = tuple(spec.attributes) if share_attributes is None else tuple(share_attributes)
        sid = spec.semantic_id
        return cls(tuple((n, a.labels) for n, a in spec.attributes.items()), shares,
                   n_buckets, variant, tuple(genres), sid.levels if sid else 0,
                   sid.codes if sid else 0,
                   tuple((n, a.kind) for n, a in spec.attributes.items()))

    def kind(self, attribute: str) -> str:
        """"single", "multi" or "ordinal"."""
        return dict(self.kinds).get(attribute, "single")

    def with_variant(self, variant: str) -> FeatureSet:
        return replace(self, variant=variant)

    def with_genres(self, genres: Sequence[str]) -> FeatureSet:
        return replace(self, genres=tuple(genres))

    def to_dict(self) -> dict:
        return {"attributes": {n: list(labels) for n, labels in self.attributes},
                "share_attributes": list(self.share_attributes), "n_buckets": self.n_buckets,
                "variant": self.variant, "genres": list(self.genres),
                "semantic_levels": self.semantic_levels, "semantic_codes": self.semantic_codes,
                "kinds": {n: self.kind(n) for n, _ in self.attributes}}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSet:
        shares = d.get("share_attributes")
        if shares is None:  # format of models saved before several share attributes
            shares = [d["share_attribute"]] if d.get("share_attribute") else []
        return cls(tuple((n, tuple(labels)) for n, labels in d["attributes"].items()),
                   tuple(shares), int(d["n_buckets"]), d["variant"],
                   tuple(d.get("genres", ())), int(d.get("semantic_levels", 0)),
                   int(d.get("semantic_codes", 0)),
                   tuple(d.get("kinds", {}).items()))  # absent: saved before kinds

    @property
    def groups(self) -> tuple[str, ...]:
        """The variant's groups that this feature set can build (genres need a vocabulary,
        semantic IDs a spec that has them)."""
        return tuple(g for g in VARIANTS[self.variant]
                     if (g != "genres" or self.genres)
                     and (g != "semantic_ids" or self.semantic_levels))

    @property
    def _genred(self) -> bool:
        return "genres" in self.groups

    @property
    def _annotated(self) -> bool:
        return "attributes" in self.groups

    @property
    def _captioned(self) -> bool:
        return "captions" in self.groups

    @property
    def _coded(self) -> bool:
        return "semantic_ids" in self.groups

    def _share_columns(self) -> list[str]:
        labels = dict(self.attributes)
        return [share_column(a, lab) for a in self.share_attributes for lab in labels[a]]

    def _annotation_inputs(self, name: str) -> list[str]:
        """The feature table's columns an attribute's features come from (udfs.schema)."""
        kind = self.kind(name)
        if kind == "multi":
            return [S.labels(name), S.scores(name)]
        return [S.label(name), S.confidence(name), *([S.value(name)] if kind == "ordinal" else [])]

    def _attribute_columns(self, name: str) -> list[str]:
        """An attribute's model columns: label (a categorical) and confidence, an ordinal
        attribute's expected value too; for a multi-label one, a 0/1 column per label then
        a score column per label, in spec order."""
        if self.kind(name) != "multi":
            return self._annotation_inputs(name)
        labels = dict(self.attributes)[name]
        return [*(hot_column(name, lab) for lab in labels),
                *(score_column(name, lab) for lab in labels)]

    def item_refs(self) -> list[str]:
        """Feast feature references keyed by item."""
        refs = [f"{ITEM_STATS}:{c}" for c in ITEM_BASELINE]
        if self._genred:
            refs.append(f"{ITEM_METADATA}:{GENRES}")
        if self._annotated:
            refs += [f"{ITEM_ANNOTATIONS}:{c}" for n, _ in self.attributes
                     for c in self._annotation_inputs(n)]
        if self._captioned:
            refs.append(f"{ITEM_ANNOTATIONS}:caption_tokens")
        if self._coded:
            refs.append(f"{ITEM_ANNOTATIONS}:semantic_id")
        return refs

    def user_refs(self) -> list[str]:
        """Feast feature references keyed by user."""
        refs = [f"{USER_STATS}:{c}" for c in USER_BASELINE]
        if self._annotated:
            refs += [f"{USER_STATS}:{c}" for c in self._share_columns()]
        return refs

    @cached_property
    def columns(self) -> list[str]:
        """The model's input columns, in order."""
        cols = [*ITEM_BASELINE, *USER_BASELINE]
        if self._genred:
            cols += [genre_column(g) for g in self.genres]
        if self._annotated:
            cols += [c for n, _ in self.attributes for c in self._attribute_columns(n)]
            cols += [cross_column(a) for a in self.share_attributes]
        if self._captioned:
            cols += [f"caption_bucket_{i:02d}" for i in range(self.n_buckets)]
        if self._coded:
            cols += [sid_column(level) for level in range(1, self.semantic_levels + 1)]
        return cols

    # The matrix is built in two halves that serving caches separately: an item block (one
    # row per item, user-independent) and a user block. `assemble` joins them, computing the
    # one cross feature; `matrix` (training) and the service both go through it.

    @cached_property
    def item_columns(self) -> list[str]:
        """Columns of the item block: every model input but the user stats and the cross
        feature (which `assemble` computes), labels as codes."""
        not_items = {*USER_BASELINE, *(cross_column(a) for a in self.share_attributes)}
        return [c for c in self.columns if c not in not_items]

    @cached_property
    def user_columns(self) -> list[str]:
        """Columns of the user block: the user stats, then the per-label shares."""
        return [*USER_BASELINE, *(self._share_columns() if self._annotated else [])]

    def encode_items(self, rows: pd.DataFrame) -> np.ndarray:
        """Item feature rows (as Feast names them) -> the item block, float64.

        A label becomes its index in the spec's label list (NaN when null or outside the
        list, so an unexpected label can never shift the codes); an ordinal attribute's value
        is a number; a multi-label attribute's chosen labels become 1/0 per spec label
        (labels outside the spec ignored; NaN throughout when the row has none, i.e. null:
        an empty list is all zeros) and its scores one number per spec label (NaN throughout
        when null or not one per label). Lists arrive as Python lists (Feast online) or
        numpy arrays (Parquet, pandas): both are read alike. No caption is NaN in every
        bucket, an empty caption is zero counts; an item without metadata is NaN in every
        genre column; a semantic ID's codes are its categories (NaN when missing, out of
        range or of the wrong length).
        """
        _require(rows, [r.split(":", 1)[1] for r in self.item_refs()])
        out = {c: _numeric(rows[c]) for c in ITEM_BASELINE}
        if self._genred:
            hot = _multi_hot(rows[GENRES], self.genres)
            out.update({genre_column(g): hot[:, i] for i, g in enumerate(self.genres)})
        if self._annotated:
            for name, labels in self.attributes:
                kind = self.kind(name)
                if kind == "multi":
                    hot = _label_sets(rows[S.labels(name)], labels)
                    score = _score_lists(rows[S.scores(name)], len(labels))
                    for i, lab in enumerate(labels):
                        out[hot_column(name, lab)] = hot[:, i]
                        out[score_column(name, lab)] = score[:, i]
                    continue
                out[S.label(name)] = _codes(rows[S.label(name)], labels)
                out[S.confidence(name)] = _numeric(rows[S.confidence(name)])
                if kind == "ordinal":
                    out[S.value(name)] = _numeric(rows[S.value(name)])
        if self._captioned:
            tokens = [t if isinstance(t, (list, tuple, np.ndarray)) else None
                      for t in rows["caption_tokens"]]
            counts = bucket_counts(tokens, self.n_buckets).astype(np.float64)
            counts[[t is None for t in tokens]] = np.nan  # no caption is not an empty caption
            out.update({f"caption_bucket_{i:02d}": counts[:, i] for i in range(self.n_buckets)})
        if self._coded:
            codes = _code_paths(rows["semantic_id"], self.semantic_levels, self.semantic_codes)
            out.update({sid_column(level + 1): codes[:, level]
                        for level in range(self.semantic_levels)})
        return _stack([out[c] for c in self.item_columns], len(rows))

    def encode_users(self, rows: pd.DataFrame) -> np.ndarray:
        """User feature rows -> the user block, float64."""
        _require(rows, [r.split(":", 1)[1] for r in self.user_refs()])
        return _stack([_numeric(rows[c]) for c in self.user_columns], len(rows))

    def assemble(self, items: np.ndarray, users: np.ndarray) -> np.ndarray:
        """The model matrix (float64, `columns` order) from an item block and a user block
        with one row per item row, or a single row that every item row shares."""
        n, (to_item, to_user, crosses) = len(items), self._layout
        users = np.broadcast_to(users, (n, len(self.user_columns)))
        out = np.empty((n, len(self.columns)))
        out[:, to_item] = items
        out[:, to_user] = users[:, :len(USER_BASELINE)]
        rows = np.arange(n)
        for item_col, n_hot, first_share, to_cross in crosses:
            if n_hot:
                # a set of labels: the mean of the user's shares over the item's labels
                # (NaN without an annotation or with no label chosen)
                hot = items[:, item_col:item_col + n_hot]
                shares = users[:, first_share:first_share + n_hot]
                chosen = hot == 1
                count = chosen.sum(axis=1)
                total = np.where(chosen, shares, 0.0).sum(axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[:, to_cross] = np.where(count > 0, total / count, np.nan)
                continue
            # the user's past share of items carrying this item's label
            codes = items[:, item_col]
            known = ~np.isnan(codes)
            picked = users[rows, first_share + np.where(known, codes, 0).astype(np.intp)]
            out[:, to_cross] = np.where(known, picked, np.nan)
        return out

    @cached_property
    def _layout(self) -> tuple[list[int], list[int], list[tuple[int, int, int, int]]]:
        """Where the blocks go in the matrix: item and user-stat positions, and per cross
        feature (the item block's label-code column, or for a multi-label attribute its
        first 0/1 column; the number of 0/1 columns, 0 for a label code; the user block's
        first share column of that attribute; the matrix position)."""
        cols, labels = self.columns, dict(self.attributes)
        crosses, first = [], len(USER_BASELINE)
        if self._annotated:
            for a in self.share_attributes:
                if self.kind(a) == "multi":
                    item_col = self.item_columns.index(hot_column(a, labels[a][0]))
                    n_hot = len(labels[a])
                else:
                    item_col, n_hot = self.item_columns.index(S.label(a)), 0
                crosses.append((item_col, n_hot, first, cols.index(cross_column(a))))
                first += len(labels[a])
        return ([cols.index(c) for c in self.item_columns],
                [cols.index(c) for c in USER_BASELINE], crosses)

    def matrix(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The model matrix for feature rows holding both item and user columns, labels as
        categoricals over the spec's label list (what XGBoost trains on)."""
        x = self.assemble(self.encode_items(rows), self.encode_users(rows))
        out = pd.DataFrame(x, columns=self.columns, index=rows.index)
        if self._annotated:
            for name, labels in self.attributes:
                if self.kind(name) != "multi":
                    out[S.label(name)] = _categorical(out[S.label(name)], list(labels))
        if self._coded:
            for level in range(1, self.semantic_levels + 1):
                out[sid_column(level)] = _categorical(out[sid_column(level)],
                                                      list(range(self.semantic_codes)))
        return out


def _require(rows: pd.DataFrame, needed: list[str]) -> None:
    absent = [c for c in needed if c not in rows.columns]
    if absent:
        raise KeyError(f"feature rows lack columns {absent}")


def _stack(cols: list[np.ndarray], n: int) -> np.ndarray:
    return np.column_stack(cols) if cols else np.empty((n, 0))


def _categorical(codes: pd.Series, categories: list) -> pd.Categorical:
    codes = codes.to_numpy()
    return pd.Categorical.from_codes(np.where(np.isnan(codes), -1, codes).astype(np.int64),
                                     categories=categories)


def _multi_hot(col: pd.Series, genres: tuple[str, ...]) -> np.ndarray:
    """1/0 per genre of "A|B" strings; NaN throughout for an item without metadata."""
    index = {g: i for i, g in enumerate(genres)}
    out = np.zeros((len(col), len(genres)))
    for row, value in enumerate(col):
        if not isinstance(value, str):
            out[row] = np.nan
            continue
        for g in value.split(GENRE_SEP):
            i = index.get(g.strip())
            if i is not None:
                out[row, i] = 1.0
    return out


_LISTS = (list, tuple, np.ndarray)


def _label_sets(col: pd.Series, labels: tuple[str, ...]) -> np.ndarray:
    """(rows, labels) 1/0: whether each row's chosen labels include each spec label. A row
    whose value is not a list (null, or anything malformed) is NaN throughout; labels
    outside the spec are ignored (they never shift a column)."""
    index = {lab: i for i, lab in enumerate(labels)}
    out = np.zeros((len(col), len(labels)))
    for row, value in enumerate(col):
        if not isinstance(value, _LISTS) or getattr(value, "ndim", 1) != 1:
            out[row] = np.nan
            continue
        for lab in value:
            i = index.get(lab) if isinstance(lab, str) else None
            if i is not None:
                out[row, i] = 1.0
    return out


def _score_lists(col: pd.Series, n: int) -> np.ndarray:
    """(rows, n) floats of per-label score lists; NaN throughout for a null or malformed
    list (not one number per label), NaN for a null element."""
    out = np.full((len(col), n), np.nan)
    for row, value in enumerate(col):
        if isinstance(value, _LISTS) and getattr(value, "ndim", 1) == 1 and len(value) == n:
            try:
                out[row] = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):  # a null (or non-numeric) element among numbers
                out[row] = [v if isinstance(v, (int, float, np.number))
                            and not isinstance(v, bool) else np.nan for v in value]
    return out


def _code_paths(col: pd.Series, levels: int, codes: int) -> np.ndarray:
    """(rows, levels) float codes of semantic-ID arrays; NaN for a missing or malformed one."""
    out = np.full((len(col), levels), np.nan)
    for row, value in enumerate(col):
        if isinstance(value, (list, tuple, np.ndarray)) and len(value) == levels:
            path = np.asarray(value, dtype=np.float64)
            if ((path >= 0) & (path < codes)).all():
                out[row] = path
    return out


def _codes(col: pd.Series, labels: tuple[str, ...]) -> np.ndarray:
    codes = pd.Categorical(col.to_numpy(object), categories=list(labels)).codes
    return np.where(codes >= 0, codes, np.nan)


def _numeric(col: pd.Series) -> np.ndarray:
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
