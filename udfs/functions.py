"""The SQL functions: Arrow pandas UDFs (iterator form) over one engine per worker.

    annotate(attr, text, ...) -> struct<label, confidence, model, spec_version, error>
    caption(text, ...)        -> struct<caption, tokens array<bigint>, error>
    annotate_all(text, ...)   -> struct<<attr>_label, <attr>_confidence, ..., caption,
                                        caption_tokens, model, error>

Each Arrow batch goes to the engine whole (after de-duplication); the engine is fetched once
per task from the worker cache. The size of an Arrow batch is
spark.sql.execution.arrow.maxRecordsPerBatch.

Spark evaluates each iterator pandas UDF call of a query in its own Python worker process, so
a query with three annotate()/caption() calls runs three workers per task, each with its own
engine. annotate_all() does every attribute and the caption in one call: one engine per task,
which is what a GPU engine needs (the annotate job's default query uses it).
"""
from __future__ import annotations

import time
from typing import Iterator, Tuple

import pandas as pd
from pyspark.sql.functions import pandas_udf

from udfs import annotator, tokens, worker
from udfs.spec import Spec

ANNOTATE_TYPE = ("label string, confidence double, model string, "
                 "spec_version string, error string")
CAPTION_TYPE = "caption string, tokens array<bigint>, error string"


class RowErrors(RuntimeError):
    """Raised instead of returning row errors when fail_on_error is set."""


def _check(errors: pd.Series, what: str, fail_on_error: bool) -> None:
    if fail_on_error and errors.notna().any():
        bad = errors.dropna()
        raise RowErrors(f"{what}: {len(bad)} of {len(errors)} rows failed "
                        f"(fail_on_error is set); first error: {bad.iloc[0]}")


def annotate_frame(engine, spec: Spec, attrs: pd.Series, texts: pd.Series) -> pd.DataFrame:
    """One batch of annotate(): attrs usually hold one literal name, but any mix works."""
    attrs = attrs.reset_index(drop=True)
    texts = texts.reset_index(drop=True)
    out = pd.DataFrame({"label": pd.Series([None] * len(texts), dtype=object),
                        "confidence": pd.Series([None] * len(texts), dtype="float64"),
                        "model": engine.model_name,
                        "spec_version": pd.Series([None] * len(texts), dtype=object),
                        "error": pd.Series([None] * len(texts), dtype=object)})
    for name, idx in attrs.groupby(attrs.fillna("")).groups.items():
        if name not in spec.attributes:
            out.loc[idx, "error"] = (f"unknown attribute {name!r}; the spec declares "
                                     f"{sorted(spec.attributes)}")
            continue
        attribute = spec.attributes[name]
        res = annotator.annotate_texts(engine, attribute, texts.loc[idx])
        res.index = idx
        for col in ("label", "confidence", "error"):
            out.loc[idx, col] = res[col].to_numpy(dtype=out[col].dtype)
        out.loc[idx, "spec_version"] = attribute.version
    return out


def caption_frame(engine, spec: Spec, texts: pd.Series) -> pd.DataFrame:
    if spec.caption is None:
        n = len(texts)
        return pd.DataFrame({"caption": [None] * n, "tokens": [None] * n,
                             "error": ["the spec declares no caption"] * n})
    res = annotator.caption_texts(engine, spec.caption, texts)
    res.insert(1, "tokens", res["caption"].map(tokens.caption_tokens))
    return res


def all_type(spec: Spec) -> str:
    fields = [f"{name}_label string, {name}_confidence double" for name in spec.attributes]
    if spec.caption is not None:
        fields.append("caption string, caption_tokens array<bigint>")
    return ", ".join(fields + ["model string", "error string"])


def annotate_all_frame(engine, spec: Spec, texts: pd.Series) -> pd.DataFrame:
    """Every attribute and the caption for one batch; errors joined as "attr: message"."""
    texts = texts.reset_index(drop=True)
    columns, errors = {}, []
    for name, attribute in spec.attributes.items():
        res = annotator.annotate_texts(engine, attribute, texts)
        columns[f"{name}_label"] = res["label"]
        columns[f"{name}_confidence"] = res["confidence"]
        errors.append(res["error"].map(lambda e, n=name: e and f"{n}: {e}"))
    if spec.caption is not None:
        res = caption_frame(engine, spec, texts)
        columns["caption"] = res["caption"]
        columns["caption_tokens"] = res["tokens"]
        errors.append(res["error"].map(lambda e: e and f"caption: {e}"))
    out = pd.DataFrame(columns)
    out["model"] = engine.model_name
    out["error"] = ["; ".join(e for e in row if e) or None for row in zip(*errors)]
    return out


def _batch_udf(name: str, return_type: str, frame, engine_config: dict | None,
               fail_on_error: bool, engine_seconds):
    """An iterator pandas UDF: this worker's engine once per task, then `frame(engine, cols)`
    per Arrow batch. `engine_seconds`, an optional accumulator, adds up time spent in frame."""
    def run(batches: Iterator[Tuple[pd.Series, ...]]) -> Iterator[pd.DataFrame]:
        engine = worker.get_engine(engine_config)
        for cols in batches:
            started = time.perf_counter()
            out = frame(engine, cols)
            if engine_seconds is not None:
                engine_seconds.add(time.perf_counter() - started)
            _check(out["error"], name, fail_on_error)
            yield out
    run.__name__ = name
    return pandas_udf(run, return_type)


def make_annotate_all_udf(spec: Spec, engine_config: dict | None, fail_on_error: bool = False,
                          engine_seconds=None):
    return _batch_udf(
        "annotate_all", all_type(spec),
        lambda engine, cols: annotate_all_frame(engine, spec, annotator.clean_columns(cols)),
        engine_config, fail_on_error, engine_seconds)


def make_annotate_udf(spec: Spec, engine_config: dict | None, fail_on_error: bool = False,
                      engine_seconds=None):
    return _batch_udf(
        "annotate", ANNOTATE_TYPE,
        lambda engine, cols: annotate_frame(engine, spec, cols[0],
                                            annotator.clean_columns(cols[1:])),
        engine_config, fail_on_error, engine_seconds)


def make_caption_udf(spec: Spec, engine_config: dict | None, fail_on_error: bool = False,
                     engine_seconds=None):
    return _batch_udf(
        "caption", CAPTION_TYPE,
        lambda engine, cols: caption_frame(engine, spec, annotator.clean_columns(cols)),
        engine_config, fail_on_error, engine_seconds)
