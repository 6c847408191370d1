"""Per-label decision thresholds of a fine-tuned multi-label model, applied where it is scored.

spark_jobs.finetune fits, for a multi-label attribute, each label's threshold t on a
development split of the training items (quality.finetune.fit_thresholds) and writes the
thresholds into the model directory's card.json ("calibration", `card_entry`). An engine that
loads that directory passes each label's P(yes) through `calibrate`, which moves t onto the
spec's threshold s:

    logit(p') = logit(p) - logit(t) + logit(s)

so Attribute.choose keeps its one rule (p' >= s exactly when p >= t) and the probabilities
stored and scored are the calibrated ones. Applied only to the attribute, name and version,
the thresholds were fitted for; any other is scored as the model gives it (one warning per
model directory and attribute). Only numpy and the standard library: the engines import it.
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from udfs.spec import Attribute

log = logging.getLogger(__name__)

CARD = "card.json"
RULE = "logit(p') = logit(p) - logit(threshold) + logit(the spec's threshold)"
_EPS = 1e-12  # P(yes) of exactly 0 or 1 has no logit: clipped, the order is kept below
_warned: set = set()


def card_entry(attribute: Attribute, thresholds: Sequence[float], fitted_on: dict) -> dict:
    """The card's "calibration": the thresholds by label and what they were fitted for."""
    return {"attribute": attribute.name, "attribute_version": attribute.version,
            "thresholds": {lab: float(t) for lab, t in zip(attribute.labels, thresholds)},
            "fitted_on": fitted_on, "rule": RULE}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def shift(probabilities, thresholds: Sequence[float], target: float) -> np.ndarray:
    """[items, labels] P(yes) with each label's threshold moved onto `target` (see RULE).

    A label whose threshold is the target is returned as it is. Rounding never moves an item
    across the target: p' >= target exactly when p >= the label's threshold."""
    p = np.asarray(probabilities, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    z = _logit(p) - _logit(t) + _logit(np.float64(target))
    q = np.exp(-np.logaddexp(0.0, -z))  # the logistic function, without overflow
    q = np.where(p >= t, np.maximum(q, target), np.minimum(q, np.nextafter(target, 0.0)))
    return np.where(t == target, p, q)


def thresholds_for(model_dir, attribute: Attribute) -> list[float] | None:
    """The thresholds `model_dir`'s card fitted for `attribute` in its order (None: no
    card, no calibration, or one fitted for another attribute or version: a warning, once)."""
    entry = _calibration(model_dir)
    if entry is None or not attribute.multi:
        return None
    fitted = (entry.get("attribute"), entry.get("attribute_version"))
    if fitted != (attribute.name, attribute.version):
        key = (str(model_dir), attribute.name, attribute.version)
        if key not in _warned:
            _warned.add(key)
            log.warning("%s: its per-label thresholds were fitted for %s version %s, not %s "
                        "version %s: %s is scored without them", Path(model_dir).name,
                        *fitted, attribute.name, attribute.version, attribute.name)
        return None
    given = entry.get("thresholds") or {}
    return [float(given.get(lab, attribute.threshold)) for lab in attribute.labels]


def calibrate(model_dir, attribute: Attribute, probabilities) -> np.ndarray:
    """Engine.tag's [items, labels] P(yes) as the model directory's card calibrates them for
    `attribute` (unchanged where it has no thresholds for it; model_dir None: no card)."""
    thresholds = thresholds_for(model_dir, attribute)
    if thresholds is None:
        return probabilities
    return shift(probabilities, thresholds, attribute.threshold)


def _calibration(model_dir) -> dict | None:
    """The card's "calibration" entry, read once per version of the file (a card rewritten
    by os.replace, as spark_jobs.finetune writes it, is read again)."""
    if model_dir is None:
        return None
    path = Path(model_dir) / CARD
    try:
        st = path.stat()
    except OSError:
        return None
    return _read(str(path), st.st_ino, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=64)
def _read(path: str, inode: int, mtime_ns: int, size: int) -> dict | None:
    try:
        entry = json.loads(Path(path).read_text()).get("calibration")
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) else None
