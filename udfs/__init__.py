"""SQL-native LLM annotation for Spark.

    from udfs import register, load_spec
    register(spark, load_spec("specs/movielens.yaml"), engine={"type": "embedding"})
    spark.sql("SELECT item_id, annotate('vibe', title, description) AS vibe, "
              "caption(title, description) AS caption FROM items")
    spark.sql("SELECT item_id, annotate_all(title, description) AS a FROM items")  # one worker
"""
from __future__ import annotations

from udfs.spec import Spec, SpecError, load_spec


def register(spark, spec: Spec | str, engine: dict | None = None, fail_on_error: bool = False,
             prefix: str = "", engine_seconds=None):
    """Register annotate(), caption() and annotate_all() as SQL functions on this session.

    `engine` is a plain config dict (see udfs.engines); the engine itself is built lazily,
    once per Python worker. `engine_seconds`, an optional float accumulator
    (spark.sparkContext.accumulator(0.0)), adds up the time the functions spend annotating.
    Returns the three UDF objects for DataFrame-API use.
    """
    from udfs.functions import make_annotate_all_udf, make_annotate_udf, make_caption_udf

    if isinstance(spec, str):
        spec = load_spec(spec)
    annotate = make_annotate_udf(spec, engine, fail_on_error, engine_seconds)
    caption = make_caption_udf(spec, engine, fail_on_error, engine_seconds)
    annotate_all = make_annotate_all_udf(spec, engine, fail_on_error, engine_seconds)
    spark.udf.register(prefix + "annotate", annotate)
    spark.udf.register(prefix + "caption", caption)
    spark.udf.register(prefix + "annotate_all", annotate_all)
    return annotate, caption, annotate_all


__all__ = ["register", "load_spec", "Spec", "SpecError"]
