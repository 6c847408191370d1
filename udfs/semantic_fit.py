"""Fitting the semantic-ID quantiser with Spark: sample, embed on the executors, fit on the driver.

    from udfs.semantic_fit import quantizer_for
    q, info = quantizer_for(items_df, ["title", "description"], spec, {"type": "embedding"},
                            table_root="feature_repo/data/item_annotations")
    udfs.register(spark, spec, engine={"type": "embedding"}, quantizer=q)

Spark draws the sample (the `sample` items first by xxhash64(id, seed): the same catalogue
always gives the same sample, whatever its partitioning) and embeds it on the executors with
the job's engine, as the SQL functions do (one engine per Python worker, on the task's GPU).
The driver then fits residual k-means (udfs.semantic_ids.fit) on the collected vectors.

Why k-means on the driver rather than pyspark.ml's KMeans: the sample is bounded (10,000
MiniLM vectors are 15 MB), the fit takes seconds, and it is deterministic: the same vectors in
the same order give the same centroids, which is what makes a refit reproducible and the
quantiser's version meaningful. Spark's k-means|| initialisation depends on the partitioning
and its distributed sums on the order of the reduction. The expensive part, embedding, stays
on the executors.

`quantizer_for` is what the annotate job calls: the saved quantiser for the spec's settings
and the engine's embedding model when there is one (so re-runs assign the same codes), else a
new fit, saved under the table (`<table>/_quantizers/<version>/`). `refit=True` fits again on
the current catalogue: the same sample gives the same version (checked against the saved
centroids), another sample a new version, which the annotate job then assigns to every item.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Tuple

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf

from udfs import annotator, connect, semantic_ids, worker
from udfs.engines.base import can_embed
from udfs.semantic_ids import Quantizer, QuantizerError
from udfs.spec import SemanticId, Spec

EMBED_TYPE = "vector array<float>, model string, error string"


def make_embed_udf(engine_config: dict | None):
    """embed(text, ...) -> struct<vector array<float>, model, error>: the engine's embedding
    of the cleaned, joined texts (null with an error for an empty text or an engine that
    cannot embed)."""
    def run(batches: Iterator[Tuple[pd.Series, ...]]) -> Iterator[pd.DataFrame]:
        engine = worker.get_engine(engine_config, worker.EMBED)
        for batch in batches:
            cols = (batch,) if isinstance(batch, pd.Series) else tuple(batch)
            texts = annotator.clean_columns(cols).reset_index(drop=True)
            n = len(texts)
            if not can_embed(engine):
                try:
                    engine.embed(["probe"])
                except Exception as exc:  # noqa: BLE001 - EmbeddingUnsupported: say it per row
                    message = f"{type(exc).__name__}: {exc}"
                yield pd.DataFrame({"vector": [None] * n, "model": engine.embedding_model,
                                    "error": [message] * n})
                continue
            vectors, errors = annotator._unique_call(
                texts, lambda b: [np.asarray(v, dtype=np.float32).tolist()
                                  for v in engine.embed(b)])
            yield pd.DataFrame({"vector": vectors, "model": engine.embedding_model,
                                "error": errors})
    run.__name__ = "embed"
    return pandas_udf(run, EMBED_TYPE)


def probe(spark, engine_config: dict | None) -> tuple[str, int]:
    """(embedding model, vector size) of the engine, asked of a Python worker (where the
    engine lives, and stays for the passes that follow). Raises QuantizerError when the
    engine cannot embed.

    One partition, read to the end (collect, not first): PySpark returns a Python worker to
    its pool only when the task consumed its whole output, so a `first()` would discard
    the worker and, with it, the engine just loaded (measured: ~20 s per probe under load,
    against ~2 s when the worker is reused)."""
    connect.ship(spark)  # a Connect server's workers need this package
    row = (spark.createDataFrame([("a film about the sea",)], "text string").coalesce(1)
           .select(make_embed_udf(engine_config)("text").alias("e")).collect()[0].e)
    if row.error:
        raise QuantizerError(f"semantic IDs: {row.error}")
    return row.model, len(row.vector)


def draw_sample(frame: DataFrame, id_column: str, text_columns: list[str], n: int,
                seed: int) -> DataFrame:
    """The `n` items first by xxhash64(id, seed), then id: a seeded uniform sample that does
    not depend on the input's order or partitioning."""
    order = F.xxhash64(F.col("__id").cast("string"), F.lit(seed))
    return (frame.select(F.col(f"`{id_column}`").alias("__id"),
                         *[F.col(f"`{c}`") for c in text_columns])
            .withColumn("__order", order)
            .orderBy("__order", "__id").limit(n))


def fit_on(frame: DataFrame, text_columns: list[str], config: SemanticId,
           engine_config: dict | None, id_column: str = "item_id") -> Quantizer:
    """Sample `frame` (settings from `config`), embed with the engine on the executors, fit."""
    spark = frame.sparkSession
    sample = draw_sample(frame, id_column, text_columns, config.sample, config.seed)
    parallelism = connect.parallelism(spark)
    embedded = (sample.repartition(parallelism)
                .select("__id", "__order",
                        F.sha2(F.concat_ws("\u241f", *[F.coalesce(F.col(f"`{c}`").cast("string"),
                                                                 F.lit(""))
                                                       for c in text_columns]), 256)
                        .alias("__text_hash"),
                        make_embed_udf(engine_config)(*[F.col(f"`{c}`") for c in text_columns])
                        .alias("e"))
                .select("__id", "__order", "__text_hash", "e.vector", "e.model", "e.error")
                .toPandas())
    embedded = embedded.sort_values(["__order", "__id"], kind="stable", ignore_index=True)
    fatal = embedded["error"].dropna()
    fatal = fatal[~fatal.str.startswith(annotator.EMPTY_TEXT)]
    if len(fatal) and embedded["vector"].isna().all():
        raise QuantizerError(f"semantic IDs: no sampled item could be embedded: {fatal.iloc[0]}")
    ok = embedded[embedded["vector"].notna()]
    if ok.empty:
        raise QuantizerError("semantic IDs: every sampled item has an empty text; nothing to "
                             "fit the quantiser on")
    models = ok["model"].unique()
    if len(models) != 1:
        raise QuantizerError(f"semantic IDs: the sample was embedded by several models {models}")
    vectors = np.stack([np.asarray(v, dtype=np.float32) for v in ok["vector"]])
    fingerprint = semantic_ids.sample_fingerprint(ok["__id"], ok["__text_hash"])
    return semantic_ids.fit(vectors, config, str(models[0]), fingerprint,
                            extra={"sample_failed": int(len(embedded) - len(ok))})


def quantizer_for(frame: DataFrame, text_columns: list[str], spec: Spec | SemanticId,
                  engine_config: dict | None, table_root: str | None = None,
                  id_column: str = "item_id", refit: bool = False,
                  say=lambda msg: None) -> tuple[Quantizer, dict]:
    """The quantiser the annotate job assigns codes with, and what happened: the saved one
    for these settings and this engine's embedding model, or a new fit (saved under
    `table_root` when given). Raises QuantizerError when the engine cannot embed."""
    config = spec.semantic_id if isinstance(spec, Spec) else spec
    if config is None:
        raise QuantizerError("the spec has no semantic_id section")
    embedder, dim = probe(frame.sparkSession, engine_config)
    existing = semantic_ids.find(table_root, config, embedder) if table_root else None
    if existing is not None and not refit:
        say(f"semantic IDs: reusing quantiser {existing.version} ({embedder}, "
            f"{config.levels} levels x {config.codes} codes)")
        return existing, {"version": existing.version, "fitted": False, "embedder": embedder,
                          "path": f"{semantic_ids.quantizers_dir(table_root)}/"
                                  f"{existing.version}"}
    say(f"semantic IDs: fitting {config.levels} levels x {config.codes} codes on up to "
        f"{config.sample} items embedded by {embedder}")
    q = fit_on(frame, text_columns, config, engine_config, id_column)
    info = {"version": q.version, "fitted": True, "embedder": embedder,
            "sample_size": q.meta["sample_size"], "iterations": q.meta["iterations"]}
    if table_root:
        same = [m for m in semantic_ids.saved(table_root) if m["version"] == q.version]
        if same:
            saved = semantic_ids.load(same[0]["path"])
            diff = semantic_ids.same_centroids(q, saved)
            if diff is not None and diff <= semantic_ids.REPRODUCE_TOLERANCE:
                say(f"semantic IDs: the refit reproduced quantiser {q.version} (largest "
                    f"centroid difference {diff:.1e}); keeping the saved one")
                return saved, {**info, "reproduced": True, "centroid_difference": diff,
                               "path": same[0]["path"]}
            # the same inputs gave other centroids (e.g. new weights under the same model
            # name): a new quantiser, named by its centroids too
            digest = hashlib.sha256((q.version + q.describe()["centroids_sha256"])
                                    .encode()).hexdigest()[:12]
            q = Quantizer(q.config, q.embedder, q.centroids, q.sizes, digest, q.meta)
            info = {**info, "version": q.version, "reproduced": False,
                    "centroid_difference": diff}
        info["path"] = semantic_ids.save(q, table_root)
    short = [i for i, (s, k) in enumerate(zip(q.sizes, [config.codes] * config.levels)) if s < k]
    if short:
        say(f"semantic IDs: the sample has fewer distinct vectors than codes at levels "
            f"{[i + 1 for i in short]} ({list(q.sizes)} of {config.codes}); a larger catalogue "
            "fills them")
    say(f"semantic IDs: quantiser {q.version} on {q.meta['sample_size']} items; code usage on "
        f"the sample: {semantic_ids.describe_usage(q.meta['usage_on_sample'])}")
    return q, info
