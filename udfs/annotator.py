"""The pure core between Spark and an engine: clean, de-duplicate, call, map back.

Whatever the input, every row comes out with either a result or an error: null or empty
texts get an error without reaching the engine, duplicate texts are scored once, and an
engine exception is narrowed down by bisection to the rows that cause it, so one bad row
never costs the batch.

Two limits keep bisection honest. A fatal engine error (udfs.engines.base.is_fatal: CUDA out
of memory, a lost GPU, a dead engine process) is not about rows: it is raised at once as
FatalEngineError, the task fails and Spark retries it, instead of re-running the batch about
2n times on a broken engine and writing every row as an error. And bisection has a budget of
engine calls, enough to isolate ISOLATED_ROWS failing rows (1 + 2 * ISOLATED_ROWS *
ceil(log2 n) calls); when most of a batch fails, the rows still unresolved once it is spent
get the error of the sub-batch they failed in, instead of 2n - 1 calls.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from udfs.engines.base import Engine, FatalEngineError, is_fatal
from udfs.spec import Attribute, Caption

MAX_CHARS = 4000
# C0/C1 control characters other than tab and newline confuse tokenizers and prompts.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
EMPTY_TEXT = "empty text: nothing to annotate"
# Bisection may spend enough engine calls to isolate this many failing rows per batch.
ISOLATED_ROWS = 4


def clean_text(*parts) -> str | None:
    """Join the non-empty text parts of one row; None when nothing is left."""
    pieces = []
    for part in parts:
        if part is None or (isinstance(part, float) and math.isnan(part)):
            continue
        if isinstance(part, bytes):
            part = part.decode("utf-8", errors="replace")
        s = str(part).encode("utf-8", errors="replace").decode("utf-8")
        s = _CONTROL.sub(" ", s).strip()
        if s:
            pieces.append(s)
    if not pieces:
        return None
    return " ".join(pieces)[:MAX_CHARS]


def clean_columns(columns: Sequence[pd.Series]) -> pd.Series:
    """Row-wise clean_text over several text columns."""
    if len(columns) == 1:
        return columns[0].map(clean_text)
    frame = pd.concat([c.reset_index(drop=True) for c in columns], axis=1)
    return pd.Series([clean_text(*row) for row in frame.itertuples(index=False, name=None)])


def bisection_budget(n: int, isolated_rows: int = ISOLATED_ROWS) -> int:
    """Engine calls allowed for a batch of n: one failing row costs 1 + 2 * ceil(log2 n)."""
    return 1 + 2 * isolated_rows * max(1, math.ceil(math.log2(max(n, 1))))


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _isolating(fn: Callable[[list[str]], list], texts: list[str],
               budget: int | None = None) -> list[tuple[object, str | None]]:
    """Call fn on texts; on failure split in halves until the failing rows are alone.

    Fatal engine errors propagate (as FatalEngineError); past `budget` calls, the rows of a
    failed sub-batch keep its error instead of being split further.
    """
    spent, limit = 0, bisection_budget(len(texts)) if budget is None else budget

    def run(batch: list[str], failed_in: str | None) -> list[tuple[object, str | None]]:
        nonlocal spent
        if failed_in is not None and spent >= limit:
            return [(None, f"{failed_in} [not isolated: this row's batch failed and bisection "
                           f"stopped after {spent} engine calls]")] * len(batch)
        spent += 1
        try:
            out = fn(batch)
            if len(out) != len(batch):
                raise RuntimeError(f"engine returned {len(out)} results for {len(batch)} texts")
            return [(o, None) for o in out]
        except Exception as exc:  # noqa: BLE001 - a non-fatal engine failure is a row error
            if is_fatal(exc):
                if isinstance(exc, FatalEngineError):
                    raise
                raise FatalEngineError("fatal engine error, failing the task so that Spark "
                                       f"retries it: {_error(exc)}") from exc
            if len(batch) == 1:
                return [(None, _error(exc))]
            mid = len(batch) // 2
            return run(batch[:mid], _error(exc)) + run(batch[mid:], _error(exc))

    return run(texts, None)


def _unique_call(texts: pd.Series, fn: Callable[[list[str]], list]) -> tuple[list, list]:
    """Results and errors per row, calling fn once per distinct non-empty text."""
    valid = texts.notna()
    unique = list(dict.fromkeys(texts[valid]))
    by_text = dict(zip(unique, _isolating(fn, unique))) if unique else {}
    results, errors = [], []
    for text in texts:
        if text is None or (isinstance(text, float) and math.isnan(text)):
            results.append(None)
            errors.append(EMPTY_TEXT)
        else:
            value, err = by_text[text]
            results.append(value)
            errors.append(err)
    return results, errors


def _probabilities(scores, n: int, attribute: Attribute, what: str) -> np.ndarray:
    """An engine's [texts, labels] probabilities, checked for shape and range."""
    probs = np.asarray(scores, dtype=np.float64)
    if probs.shape != (n, len(attribute.labels)):
        raise RuntimeError(f"engine returned {what} of shape {probs.shape} for {n} texts and "
                           f"{len(attribute.labels)} labels")
    if not np.all((probs >= 0.0) & (probs <= 1.0)):  # NaN fails too
        raise ValueError(f"engine returned {what} outside [0, 1]")
    return probs


def annotate_texts(engine: Engine, attribute: Attribute, texts: pd.Series) -> pd.DataFrame:
    """Columns label, confidence, value (an ordinal attribute's expected value; None for
    others) and error for each (already cleaned) text. A multi-label attribute: tag_texts."""
    if attribute.multi:
        raise ValueError(f"{attribute.name!r} is a multi-label attribute: tag_texts scores it")
    allowed = set(attribute.labels)

    def call(batch: list[str]) -> list[tuple[str, float, float | None]]:
        out = engine.classify(batch, attribute)
        pairs = list(zip(out.labels, out.confidences))
        for label, conf in pairs:
            if label not in allowed:
                raise ValueError(f"engine returned label {label!r} outside {sorted(allowed)}")
            if not (conf is not None and 0.0 <= conf <= 1.0):
                raise ValueError(f"engine returned confidence {conf!r} outside [0, 1]")
        if len(pairs) != len(batch):
            raise RuntimeError(f"engine returned {len(pairs)} labels for {len(batch)} texts")
        if not attribute.ordinal:
            return [(label, conf, None) for label, conf in pairs]
        if out.scores is None:
            raise NotImplementedError(
                f"engine {engine.model_name!r} gives no distribution over the labels; the "
                f"ordinal attribute {attribute.name!r} needs one for its expected value")
        probs = _probabilities(out.scores, len(batch), attribute, "label distributions")
        return [(label, conf, attribute.expected_value(row))
                for (label, conf), row in zip(pairs, probs)]

    results, errors = _unique_call(texts.reset_index(drop=True), call)
    return pd.DataFrame({
        "label": [r[0] if r else None for r in results],
        "confidence": [float(r[1]) if r else None for r in results],
        "value": pd.Series([r[2] if r else None for r in results], dtype="float64"),
        "error": errors,
    })


def tag_texts(engine: Engine, attribute: Attribute, texts: pd.Series) -> pd.DataFrame:
    """A multi-label attribute's columns for each (already cleaned) text: labels (the chosen
    set, spec order), scores (every label's probability, spec order) and error."""
    def call(batch: list[str]) -> list[tuple[list[str], list[float]]]:
        probs = _probabilities(engine.tag(batch, attribute), len(batch), attribute,
                               "label probabilities")
        return [(attribute.choose(row), row.tolist()) for row in probs]

    results, errors = _unique_call(texts.reset_index(drop=True), call)
    return pd.DataFrame({
        "labels": [r[0] if r else None for r in results],
        "scores": [r[1] if r else None for r in results],
        "error": errors,
    })


def caption_texts(engine: Engine, caption: Caption, texts: pd.Series) -> pd.DataFrame:
    """Columns caption, error for each (already cleaned) text."""
    def call(batch: list[str]) -> list[str]:
        out = engine.caption(batch, caption)
        if any(not isinstance(c, str) for c in out):
            raise ValueError("engine returned a non-string caption")
        return out

    results, errors = _unique_call(texts.reset_index(drop=True), call)
    return pd.DataFrame({"caption": results, "error": errors})
