"""The SQL functions: Arrow pandas UDFs (iterator form) over one engine per worker.

    annotate(attr, text, ...) -> struct<label, confidence, value, version, model, error>
                                 (value: an ordinal attribute's expected value, else null)
    annotate_multi(attr, text, ...) -> struct<labels array<string>, scores array<double>,
                                              version, model, error>   (multi-label attributes)
    caption(text, ...)        -> struct<caption, tokens array<bigint>, version, error>
    semantic_id(text, ...)    -> struct<codes array<int>, tokens array<bigint>, version, error>
    annotate_all(text, ...)   -> struct<<attr>_label, <attr>_confidence, <attr>_version, ...,
                                        caption, caption_tokens, caption_version,
                                        semantic_id, semantic_id_tokens, semantic_id_version,
                                        model, error>

`version` is the attribute's (or caption's) own content version from the spec; a semantic
ID's is its fitted quantiser's (udfs.semantic_ids). The fields of annotate_all() are the
feature table's annotation columns (udfs.schema), so its output is already in table form.

semantic_id() embeds the texts with the engine (`Engine.embed`) and assigns each the nearest
code path of the quantiser given to `udfs.register`; without one, or with an engine that
cannot embed, or one embedding into another space than the quantiser's, every row gets an
error saying so.

Each Arrow batch goes to the engine whole (after de-duplication); the engine is fetched once
per task from the worker cache. The size of an Arrow batch is
spark.sql.execution.arrow.maxRecordsPerBatch.

Spark evaluates each iterator pandas UDF call of a query in its own Python worker process, so
a query with three annotate()/caption() calls runs three workers per task, each with its own
engine. annotate_all() does every attribute and the caption in one call: one engine per task,
which is what a GPU engine needs (the annotate job's default query uses it).
"""
from __future__ import annotations

import json
import time
from typing import Iterator, Tuple

import pandas as pd
from pyspark.sql.functions import pandas_udf

from udfs import annotator, schema, tokens, worker
from udfs.engines.base import can_embed
from udfs.schema import AnnotationSchema
from udfs.spec import Spec

ANNOTATE_TYPE = ("label string, confidence double, value double, version string, "
                 "model string, error string")
MULTI_TYPE = ("labels array<string>, scores array<double>, version string, model string, "
              "error string")
CAPTION_TYPE = "caption string, tokens array<bigint>, version string, error string"
SEMANTIC_ID_TYPE = "codes array<int>, tokens array<bigint>, version string, error string"
NO_CAPTION = "the spec declares no caption"
NO_SEMANTIC_ID = "the spec declares no semantic_id"
NO_QUANTIZER = ("no fitted semantic-ID quantiser: pass quantizer= to udfs.register (one that "
                "udfs.semantic_fit.quantizer_for fitted, or the directory it saved it in)")


class RowErrors(RuntimeError):
    """Raised instead of returning row errors when fail_on_error is set."""


def _check(errors: pd.Series, what: str, fail_on_error: bool) -> None:
    if fail_on_error and errors.notna().any():
        bad = errors.dropna()
        raise RowErrors(f"{what}: {len(bad)} of {len(errors)} rows failed "
                        f"(fail_on_error is set); first error: {bad.iloc[0]}")


def _by_attribute(engine, spec: Spec, attrs: pd.Series, texts: pd.Series, columns: dict,
                  multi: bool) -> pd.DataFrame:
    """One batch of annotate() (multi=False) or annotate_multi(): attrs usually hold one
    literal name, but any mix works; an attribute of the other function's kind is a row
    error naming the right function."""
    attrs = attrs.reset_index(drop=True)
    texts = texts.reset_index(drop=True)
    n = len(texts)
    out = pd.DataFrame({**{c: pd.Series([None] * n, dtype=t) for c, t in columns.items()},
                        "version": pd.Series([None] * n, dtype=object),
                        "model": engine.model_name,
                        "error": pd.Series([None] * n, dtype=object)})
    for name, idx in attrs.groupby(attrs.fillna("")).groups.items():
        attribute = spec.attributes.get(name)
        if attribute is None:
            out.loc[idx, "error"] = (f"unknown attribute {name!r}; the spec declares "
                                     f"{sorted(spec.attributes)}")
            continue
        if attribute.multi != multi:
            out.loc[idx, "error"] = (
                f"{name!r} is a multi-label attribute: call annotate_multi('{name}', ...)"
                if attribute.multi else
                f"{name!r} is an {attribute.kind} attribute: call annotate('{name}', ...)")
            continue
        res = (annotator.tag_texts if multi else annotator.annotate_texts)(
            engine, attribute, texts.loc[idx])
        for col in [*columns, "error"]:
            values = res[col].tolist()
            for i, v in zip(idx, values):  # lists too: .loc would spread them
                out.at[i, col] = v
        out.loc[idx, "version"] = attribute.version
    return out


def annotate_frame(engine, spec: Spec, attrs: pd.Series, texts: pd.Series) -> pd.DataFrame:
    """One batch of annotate(): single-label and ordinal attributes."""
    return _by_attribute(engine, spec, attrs, texts,
                         {"label": object, "confidence": "float64", "value": "float64"}, False)


def annotate_multi_frame(engine, spec: Spec, attrs: pd.Series, texts: pd.Series
                         ) -> pd.DataFrame:
    """One batch of annotate_multi(): multi-label attributes."""
    return _by_attribute(engine, spec, attrs, texts, {"labels": object, "scores": object}, True)


def caption_frame(engine, spec: Spec, texts: pd.Series) -> pd.DataFrame:
    n = len(texts)
    if spec.caption is None:
        return pd.DataFrame({"caption": [None] * n, "tokens": [None] * n,
                             "version": [None] * n, "error": [NO_CAPTION] * n})
    res = annotator.caption_texts(engine, spec.caption, texts)
    res.insert(1, "tokens", res["caption"].map(tokens.caption_tokens))
    res.insert(2, "version", spec.caption.version)
    return res


def semantic_id_frame(engine, spec: Spec, quantizer, texts: pd.Series) -> pd.DataFrame:
    """One batch of semantic_id(): codes, prefix tokens, the quantiser's version, error."""
    texts = texts.reset_index(drop=True)
    n = len(texts)
    version = quantizer.version if quantizer is not None else None
    problem = None
    if spec.semantic_id is None:
        problem = NO_SEMANTIC_ID
    elif quantizer is None:
        problem = NO_QUANTIZER
    elif quantizer.config != spec.semantic_id:
        problem = (f"the quantiser {quantizer.version} was fitted with other settings "
                   f"({quantizer.config}) than the spec's ({spec.semantic_id}); refit it")
    elif not can_embed(engine):
        problem = f"engine {engine.model_name!r} cannot embed; semantic IDs need embed()"
    elif engine.embedding_model != quantizer.embedder:
        problem = (f"the quantiser {quantizer.version} was fitted on embeddings of "
                   f"{quantizer.embedder!r}; this engine embeds with "
                   f"{engine.embedding_model!r}: refit it for this engine")
    if problem is not None:
        return pd.DataFrame({"codes": [None] * n, "tokens": [None] * n,
                             "version": [version] * n, "error": [problem] * n})

    def call(batch: list[str]) -> list[list[int]]:
        vectors = engine.embed(batch)
        if len(vectors) != len(batch):
            raise RuntimeError(f"engine returned {len(vectors)} embeddings for {len(batch)} texts")
        return [row.tolist() for row in quantizer.assign(vectors)]

    codes, errors = annotator._unique_call(texts, call)
    return pd.DataFrame({"codes": codes,
                         "tokens": [None if c is None else quantizer.tokens(c) for c in codes],
                         "version": [version] * n, "error": errors})


def all_type(spec: Spec) -> str:
    """annotate_all()'s return type: the table's annotation columns for this spec."""
    table = AnnotationSchema(spec)
    return table.spark_ddl(table.udf_columns())


def annotate_all_frame(engine, spec: Spec, texts: pd.Series, quantizer=None,
                       embedder=None) -> pd.DataFrame:
    """Every attribute, the caption and the semantic ID (embedded by `embedder`, default
    the engine) for one batch; errors joined as "part: message"."""
    texts = texts.reset_index(drop=True)
    columns, errors = {}, []
    for name, attribute in spec.attributes.items():
        if attribute.multi:
            res = annotator.tag_texts(engine, attribute, texts)
            columns[schema.labels(name)] = res["labels"]
            columns[schema.scores(name)] = res["scores"]
        else:
            res = annotator.annotate_texts(engine, attribute, texts)
            columns[schema.label(name)] = res["label"]
            columns[schema.confidence(name)] = res["confidence"]
            if attribute.ordinal:
                columns[schema.value(name)] = res["value"]
        columns[schema.version(name)] = attribute.version
        errors.append(res["error"].map(lambda e, n=name: e and f"{n}: {e}"))
    if spec.caption is not None:
        res = caption_frame(engine, spec, texts)
        columns[schema.CAPTION] = res["caption"]
        columns[schema.CAPTION_TOKENS] = res["tokens"]
        columns[schema.CAPTION_VERSION] = spec.caption.version
        errors.append(res["error"].map(lambda e: e and f"caption: {e}"))
    if spec.semantic_id is not None:
        res = semantic_id_frame(embedder or engine, spec, quantizer, texts)
        columns[schema.SEMANTIC_ID] = res["codes"]
        columns[schema.SEMANTIC_ID_TOKENS] = res["tokens"]
        columns[schema.SEMANTIC_ID_VERSION] = res["version"]
        errors.append(res["error"].map(lambda e: e and f"semantic_id: {e}"))
    out = pd.DataFrame(columns, index=texts.index)
    out[schema.MODEL] = engine.model_name
    out[schema.ERROR] = ["; ".join(e for e in row if e) or None for row in zip(*errors)] \
        if errors else None
    return out


def _columns(batch) -> tuple[pd.Series, ...]:
    """Spark hands an iterator UDF of one argument a Series, of several a tuple of them."""
    return (batch,) if isinstance(batch, pd.Series) else tuple(batch)


def add_counts(total: dict, more: dict, less: dict | None = None) -> dict:
    """total += more - less, for {part: {count: n}} (engine token counts)."""
    for part, counts in more.items():
        into = total.setdefault(part, {})
        for key, n in counts.items():
            into[key] = into.get(key, 0) + n - ((less or {}).get(part) or {}).get(key, 0)
    return total


METRICS = "__metrics"  # the hidden field of metrics=True functions


def with_metrics(return_type: str, metrics: bool) -> str:
    return f"{return_type}, {METRICS} string" if metrics else return_type


def sum_metrics(values) -> tuple[float, dict]:
    """(engine seconds, {part: {count: n}}) over the JSON `__metrics` values of a result."""
    seconds, counts = 0.0, {}
    for value in values:
        if value:
            m = json.loads(value)
            seconds += m["seconds"]
            add_counts(counts, m["tokens"])
    return seconds, counts


def _batch_udf(name: str, return_type: str, frame, engine_config: dict | None,
               fail_on_error: bool, metrics: bool = False, slot: str = worker.MAIN):
    """An iterator pandas UDF: this worker's engine once per task, then `frame(engine, cols)`
    per Arrow batch. With `metrics`, each batch's first row also carries, as JSON in the
    `__metrics` field, the seconds spent in frame and the tokens the engine counted there
    per part: how the annotate job reports engine work without accumulators, which Spark
    Connect does not have."""
    def run(batches: Iterator[Tuple[pd.Series, ...]]) -> Iterator[pd.DataFrame]:
        engine = worker.get_engine(engine_config, slot)
        for batch in batches:
            started = time.perf_counter()
            before = engine.usage() if metrics else None
            out = frame(engine, _columns(batch))
            _check(out["error"], name, fail_on_error)
            if metrics:
                used = {"seconds": time.perf_counter() - started,
                        "tokens": add_counts({}, engine.usage(), before)}
                out[METRICS] = [json.dumps(used)] + [None] * (len(out) - 1) if len(out) else []
            yield out
    run.__name__ = name
    return pandas_udf(run, with_metrics(return_type, metrics))


def make_annotate_all_udf(spec: Spec, engine_config: dict | None, fail_on_error: bool = False,
                          quantizer=None, embed_config: dict | None = None,
                          metrics: bool = False):
    def frame(engine, cols):
        embedder = (worker.get_engine(embed_config, worker.EMBED)
                    if embed_config is not None and spec.semantic_id is not None else engine)
        return annotate_all_frame(engine, spec, annotator.clean_columns(cols), quantizer,
                                  embedder)
    return _batch_udf("annotate_all", all_type(spec), frame, engine_config, fail_on_error,
                      metrics)


def make_annotate_udf(spec: Spec, engine_config: dict | None, fail_on_error: bool = False,
                      metrics: bool = False):
    def frame(engine, cols):
        if len(cols) < 2:
            raise TypeError("annotate() takes the attribute name and at least one text column")
        return annotate_frame(engine, spec, cols[0], annotator.clean_columns(cols[1:]))
    return _batch_udf("annotate", ANNOTATE_TYPE, frame, engine_config, fail_on_error, metrics)


def make_annotate_multi_udf(spec: Spec, engine_config: dict | None, fail_on_error: bool = False,
                            metrics: bool = False):
    def frame(engine, cols):
        if len(cols) < 2:
            raise TypeError("annotate_multi() takes the attribute name and at least one text "
                            "column")
        return annotate_multi_frame(engine, spec, cols[0], annotator.clean_columns(cols[1:]))
    return _batch_udf("annotate_multi", MULTI_TYPE, frame, engine_config, fail_on_error,
                      metrics)


def make_caption_udf(spec: Spec, engine_config: dict | None, fail_on_error: bool = False,
                     metrics: bool = False):
    return _batch_udf(
        "caption", CAPTION_TYPE,
        lambda engine, cols: caption_frame(engine, spec, annotator.clean_columns(cols)),
        engine_config, fail_on_error, metrics)


def make_semantic_id_udf(spec: Spec, engine_config: dict | None, fail_on_error: bool = False,
                         quantizer=None, embed_config: dict | None = None,
                         metrics: bool = False):
    return _batch_udf(
        "semantic_id", SEMANTIC_ID_TYPE,
        lambda engine, cols: semantic_id_frame(engine, spec, quantizer,
                                               annotator.clean_columns(cols)),
        engine_config if embed_config is None else embed_config, fail_on_error, metrics,
        worker.MAIN if embed_config is None else worker.EMBED)
