"""The SQL functions in a real local SparkSession."""
import pandas as pd
import pytest
from pyspark.errors import PythonException

import udfs


@pytest.fixture(scope="module")
def items_view(spark, items_small):
    df = items_small[["item_id", "title", "description"]].copy()
    extra = pd.DataFrame({"item_id": [-1, -2, -3, -4],
                          "title": [None, "   ", "Heat (1995)", "Ω \x00 ☃"],
                          "description": [None, "", None, None]})
    sdf = spark.createDataFrame(pd.concat([df, extra], ignore_index=True))
    sdf.createOrReplaceTempView("items")
    return sdf


def test_annotate_and_caption_from_sql(spark, spec, items_view):
    udfs.register(spark, spec, engine={"type": "embedding"})
    out = spark.sql("""
        SELECT item_id,
               annotate('vibe', title, description) AS vibe,
               annotate('audience', title) AS audience,
               caption(title, description) AS cap
        FROM items""").toPandas()
    n = items_view.count()
    assert len(out) == n and out["item_id"].is_unique
    vibe = pd.DataFrame(out["vibe"].tolist(), columns=["label", "confidence", "version",
                                                        "model", "error"])
    empty = out["item_id"].isin([-1, -2]).to_numpy()
    assert vibe.loc[empty, "label"].isna().all() and vibe.loc[empty, "error"].notna().all()
    ok = vibe[~empty]
    assert ok["error"].isna().all()
    assert ok["label"].isin(spec.attributes["vibe"].labels).all()
    assert ok["confidence"].between(0, 1).all()
    assert (ok["version"] == spec.attributes["vibe"].version).all()
    assert (ok["model"] == "embedding:all-MiniLM-L6-v2-onnx").all()
    aud = [r["label"] for r in out["audience"]]
    assert set(a for a in aud if a) <= set(spec.attributes["audience"].labels)
    caps = out["cap"].tolist()
    for row, is_empty in zip(caps, empty):
        if is_empty:
            assert row["caption"] is None and row["error"]
        else:
            assert row["error"] is None
            assert len(row["tokens"]) == len(row["caption"].split()) == spec.caption.top_k
            assert row["version"] == spec.caption.version


def test_unknown_attribute_is_a_row_error(spark, spec, items_view):
    udfs.register(spark, spec)
    rows = spark.sql("SELECT annotate('nope', title) AS a FROM items LIMIT 3").collect()
    assert all(r.a.label is None and "unknown attribute 'nope'" in r.a.error for r in rows)


def test_fail_on_error_fails_the_job(spark, spec, items_view):
    udfs.register(spark, spec, fail_on_error=True, prefix="strict_")
    ok = spark.sql("SELECT strict_annotate('vibe', title) AS a FROM items WHERE item_id > 0")
    assert ok.count() == items_view.count() - 4
    with pytest.raises(PythonException, match="fail_on_error"):
        spark.sql("SELECT strict_annotate('vibe', title) AS a FROM items").collect()


def test_annotate_all_is_one_worker_and_agrees(spark, spec, items_view):
    # the semantic ID needs a fitted quantiser: tests/test_semantic_ids.py
    spec = spec.restricted([*spec.attributes, "caption"])
    udfs.register(spark, spec)
    query = spark.sql("SELECT item_id, annotate_all(title, description) AS a, "
                      "annotate('vibe', title, description) AS vibe, "
                      "caption(title, description) AS cap FROM items")
    plan = spark.sql("SELECT annotate_all(title, description) AS a FROM items")
    # one Python UDF evaluation, hence one Python worker and one engine per task
    assert plan._jdf.queryExecution().executedPlan().toString().count("ArrowEvalPython") == 1
    rows = query.toPandas()
    for a, vibe, cap in zip(rows["a"], rows["vibe"], rows["cap"]):
        assert a["vibe_label"] == vibe["label"]
        assert a["caption"] == cap["caption"]
        assert (a["caption_tokens"] is None) == (cap["tokens"] is None)
        assert (a["error"] is None) == (vibe["error"] is None)
        if a["error"]:
            assert "vibe: empty text" in a["error"] and "caption: " in a["error"]
        assert set(a) == {"vibe_label", "vibe_confidence", "vibe_version", "audience_label",
                          "audience_confidence", "audience_version", "caption",
                          "caption_tokens", "caption_version", "model", "error"}
