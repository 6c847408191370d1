"""Reference label distributions that the drift check compares a batch against.

One JSON file per feature view. Weights are smoothed (add one half per label) so a label
that was merely rare in the reference batch does not make the KL divergence infinite.
A multi-label attribute stores `shares` instead: per label, the share of the labelled items
(non-null label lists) that carry it; they need no smoothing (no logarithm is taken).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from expectations.suites import SuiteError
from udfs import schema as S
from udfs.spec import Spec

SMOOTHING = 0.5


def label_distribution(df: pd.DataFrame, spec: Spec) -> dict:
    """Per attribute: the smoothed share of each declared label among the non-null labels;
    for a multi-label attribute, each label's share of the labelled items."""
    out = {}
    for name, attr in spec.attributes.items():
        if attr.multi:
            lists = [list(v) for v in df[S.labels(name)]
                     if v is not None and not (isinstance(v, float) and v != v)]
            out[name] = {
                "attribute_version": attr.version, "kind": "multi",
                "values": list(attr.labels), "items": len(lists),
                "shares": [sum(label in v for v in lists) / len(lists) if lists else 0.0
                           for label in attr.labels],
            }
            continue
        counts = df[S.label(name)].value_counts()
        total = sum(int(counts.get(label, 0)) for label in attr.labels)
        denom = total + SMOOTHING * len(attr.labels)
        out[name] = {
            "attribute_version": attr.version,
            "values": list(attr.labels),
            "weights": [(int(counts.get(label, 0)) + SMOOTHING) / denom for label in attr.labels],
        }
    return out


def write_reference(path: Path, df: pd.DataFrame, spec: Spec) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "spec_version": spec.version,
        "rows": len(df),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "attributes": label_distribution(df, spec),
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


def read_reference(path: Path) -> dict | None:
    """The stored reference, or None when none was written yet."""
    if not path.exists():
        return None
    try:
        ref = json.loads(path.read_text())
        ref["attributes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SuiteError(f"{path}: not a reference written by `validate --write-reference` "
                         f"({exc!r}); delete it or write a new one") from None
    return ref
