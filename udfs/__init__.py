"""SQL-native LLM annotation for Spark.

    from udfs import register, load_spec
    register(spark, load_spec("specs/movielens.yaml"), engine={"type": "embedding"})
    spark.sql("SELECT item_id, annotate('vibe', title, description) AS vibe, "
              "caption(title, description) AS caption FROM items")
    spark.sql("SELECT item_id, annotate_all(title, description) AS a FROM items")  # one worker
    spark.sql("SELECT annotate_multi('genres', title) AS genres FROM items")  # multi-label

    # semantic IDs need a quantiser fitted on the engine's embeddings of a sample of items
    from udfs.semantic_fit import quantizer_for
    q = quantizer_for(spark.table("items"), ["title", "description"], spec,
                      {"type": "embedding"}, table_root="features/item_annotations")
    register(spark, spec, engine={"type": "embedding"}, quantizer=q)
    spark.sql("SELECT item_id, semantic_id(title, description) AS sid FROM items")
"""
from __future__ import annotations

from udfs.spec import Spec, SpecError, load_spec


def register(spark, spec: Spec | str, engine: dict | None = None, fail_on_error: bool = False,
             prefix: str = "", quantizer=None, embed_engine: dict | None = None,
             metrics: bool = False, ship: bool = True):
    """Register annotate(), annotate_multi(), caption(), semantic_id() and annotate_all() as
    SQL functions on this session, classic or Spark Connect.

    `engine` is a plain config dict (see udfs.engines); the engine itself is built lazily,
    once per Python worker. `quantizer` (a udfs.semantic_ids.Quantizer or the directory one
    was saved in) is what semantic_id() and annotate_all() assign codes with when the spec
    has a semantic_id section; without one, annotate_all() leaves the semantic ID out (with
    one warning) and semantic_id() returns row errors saying what is missing. `embed_engine`
    (default: `engine`) is the engine whose embeddings they quantise: an encoder such as
    {"type": "embedding"} beside a generative engine that cannot embed. `metrics` adds a
    `__metrics` field (JSON engine seconds and token counts, on each batch's first row) to
    every function's struct: the annotate job's report. On a Connect session, `ship` uploads
    this package to the server's Python workers (udfs.connect.ship) and checks they import
    it; pass ship=False where the cluster has annofeat installed.
    Returns the UDF objects of annotate(), caption(), semantic_id() and annotate_all() for
    DataFrame-API use (annotate_multi() is registered, not returned: the four stay unpackable).
    """
    from udfs import connect
    from udfs.functions import (make_annotate_all_udf, make_annotate_multi_udf,
                                make_annotate_udf, make_caption_udf, make_semantic_id_udf)

    if isinstance(spec, str):
        spec = load_spec(spec)
    if isinstance(quantizer, str):
        from udfs.semantic_ids import load
        quantizer = load(quantizer)
    if ship:
        connect.ship(spark)
    else:
        connect.check_workers(spark)
    all_spec = spec
    if spec.semantic_id is not None and quantizer is None:
        import warnings
        warnings.warn("udfs.register: the spec has a semantic_id section but no quantizer= "
                      "was given; annotate_all() leaves the semantic ID out (fit one with "
                      "udfs.semantic_fit.quantizer_for)", stacklevel=2)
        all_spec = spec.restricted([*spec.attributes, "caption"])
    annotate = make_annotate_udf(spec, engine, fail_on_error, metrics)
    caption = make_caption_udf(spec, engine, fail_on_error, metrics)
    semantic_id = make_semantic_id_udf(spec, engine, fail_on_error, quantizer, embed_engine,
                                       metrics)
    annotate_all = make_annotate_all_udf(all_spec, engine, fail_on_error, quantizer,
                                         embed_engine, metrics)
    spark.udf.register(prefix + "annotate", annotate)
    spark.udf.register(prefix + "annotate_multi",
                       make_annotate_multi_udf(spec, engine, fail_on_error, metrics))
    spark.udf.register(prefix + "caption", caption)
    spark.udf.register(prefix + "semantic_id", semantic_id)
    spark.udf.register(prefix + "annotate_all", annotate_all)
    return annotate, caption, semantic_id, annotate_all


__all__ = ["register", "load_spec", "Spec", "SpecError"]
