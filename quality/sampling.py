"""Stratified samples for human review, and the accuracy estimate from the reviewed sample.

Strata are predicted label x confidence band (x popularity band when rating counts are
known). Every stratum gets a minimum number of rows before the rest is allocated in
proportion to stratum size, so rare labels and low-confidence items are reviewed even though
they are a small share of the catalogue. Each sampled row carries the weight
N_h / n_h (stratum population over stratum sample size): the reviewed verdicts, reweighted,
estimate the accuracy of the whole population rather than of the over-sampled corners.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

CONFIDENCE_BANDS = ("low", "mid", "high")
POPULARITY_BANDS = ("tail", "torso", "head")
Z_95 = 1.959963984540054


def bands(values: pd.Series, names: Sequence[str], edges: Sequence[float]) -> pd.Series:
    """names[i] for values in [edges[i-1], edges[i]); len(edges) == len(names) - 1."""
    idx = np.searchsorted(np.asarray(edges, dtype=float), values.to_numpy(float), side="right")
    return pd.Series(np.asarray(names, dtype=object)[idx], index=values.index)


def confidence_band(confidence: pd.Series) -> pd.Series:
    """Tertiles of the population's own confidences: engines differ in scale (a softmax
    over 14 labels rarely reaches 0.9), so fixed cut points would leave bands empty."""
    return bands(confidence, CONFIDENCE_BANDS, confidence.quantile([1 / 3, 2 / 3]).tolist())


def popularity_band(n_ratings: pd.Series, edges: Sequence[float] = (10, 50)) -> pd.Series:
    """tail (< 10 ratings), torso (10-49), head (>= 50) by default."""
    return bands(n_ratings.fillna(0), POPULARITY_BANDS, edges)


def allocate(sizes: pd.Series, n: int, minimum: int = 2) -> pd.Series:
    """Sample size per stratum: min(size, minimum) each, the rest proportional to size
    (largest remainder), never more than the stratum holds."""
    if (sizes <= 0).any():
        raise ValueError("every stratum must have at least one row")
    floor = sizes.clip(upper=minimum)
    if n < floor.sum():
        raise ValueError(f"a sample of {n} cannot cover {len(sizes)} strata with "
                         f"{minimum} rows each; ask for at least {int(floor.sum())}")
    n = min(n, int(sizes.sum()))
    alloc = floor.copy()
    while alloc.sum() < n:
        room = sizes - alloc
        share = (n - alloc.sum()) * room / room.sum()
        extra = np.floor(share).astype(int).clip(upper=room)
        if extra.sum() == 0:  # hand out the leftovers by largest remainder
            order = (share - np.floor(share)).sort_values(ascending=False).index
            extra[order[: n - alloc.sum()]] = 1
            extra = extra.clip(upper=room)
        alloc += extra
    return alloc.astype(int)


def stratified_sample(frame: pd.DataFrame, strata: pd.Series, n: int, minimum: int = 2,
                      seed: int = 0) -> pd.DataFrame:
    """Rows drawn without replacement per stratum, with columns stratum,
    stratum_population, stratum_sample and weight."""
    sizes = strata.value_counts().sort_index()
    alloc = allocate(sizes, n, minimum)
    rng = np.random.default_rng(seed)
    picked = []
    for stratum, k in alloc.items():
        members = np.flatnonzero((strata == stratum).to_numpy())
        picked.append(rng.choice(members, size=k, replace=False))
    rows = np.sort(np.concatenate(picked))
    out = frame.iloc[rows].copy()
    out["stratum"] = strata.iloc[rows].to_numpy()
    out["stratum_population"] = out["stratum"].map(sizes).astype(int)
    out["stratum_sample"] = out["stratum"].map(alloc).astype(int)
    out["weight"] = out["stratum_population"] / out["stratum_sample"]
    return out.reset_index(drop=True)


def _stratified(reviewed: pd.DataFrame, verdict: str) -> dict:
    """Stratified mean of the verdict with a normal 95% interval.

    Variance per stratum: (1 - n_h/N_h) p(1-p)/(n_h-1) with p = (x_h+1)/(n_h+2), so a small
    stratum that happens to be all right (or all wrong) still adds uncertainty instead of none.
    """
    g = reviewed.groupby("stratum")
    n_h = g[verdict].size().astype(float)
    x_h = g[verdict].sum().astype(float)
    N_h = g["stratum_population"].first().astype(float)
    W_h = N_h / N_h.sum()
    estimate = float((W_h * x_h / n_h).sum())
    p = (x_h + 1) / (n_h + 2)
    var = float((W_h ** 2 * (1 - n_h / N_h).clip(lower=0) * p * (1 - p)
                 / (n_h - 1).clip(lower=1)).sum())
    half = Z_95 * var ** 0.5
    return {"accuracy": estimate, "ci_low": max(0.0, estimate - half),
            "ci_high": min(1.0, estimate + half), "reviewed": int(n_h.sum()),
            "population": int(N_h.sum())}


def estimate(reviewed: pd.DataFrame, weights: str = "weight", verdict: str = "correct",
             label: str = "predicted_label") -> dict:
    """Population accuracy with a 95% CI, overall and per predicted label.

    `reviewed` holds the reviewed rows of a stratified_sample (the review may have skipped
    some): stratum, stratum_population, the weight column, the label and a boolean verdict.
    Strata nest within predicted labels, so a label's estimate is the stratified estimate
    over its own strata. When stratum_population is absent it is recovered as the sum of the
    weights of the stratum's rows (exact when every sampled row was reviewed).
    """
    missing = [c for c in ("stratum", verdict, label) if c not in reviewed.columns]
    if missing:
        raise ValueError(f"reviewed rows lack columns {missing}")
    rows = reviewed[reviewed[verdict].notna()].copy()
    if rows.empty:
        raise ValueError("no reviewed rows carry a verdict")
    rows[verdict] = rows[verdict].astype(bool)
    if "stratum_population" not in rows.columns:
        rows["stratum_population"] = rows.groupby("stratum")[weights].transform("sum")
    return {"overall": _stratified(rows, verdict),
            "per_label": {str(lab): _stratified(part, verdict)
                          for lab, part in rows.groupby(label)}}
