"""Head items by the main engine, tail items by a student distilled from its labels."""
import pandas as pd

from spark_jobs import annotate
from spark_jobs import distill as distill_job
from spark_jobs.movielens import load_items
from tests.conftest import SPEC_PATH
from udfs.table import read_latest


def test_tail_items_are_labelled_by_the_student(spark, spec, tmp_path):
    items = load_items().head(160).reset_index(drop=True)
    items.to_parquet(tmp_path / "items.parquet", index=False, coerce_timestamps="us",
                     allow_truncated_timestamps=True)
    sdf = spark.read.parquet(str(tmp_path / "items.parquet"))
    teacher_table = str(tmp_path / "teacher")
    annotate.run(spark, spec, sdf, teacher_table)
    for attribute in spec.attributes:
        assert distill_job.main([
            "--spec", str(SPEC_PATH), "--attribute", attribute,
            "--annotations", teacher_table, "--items", str(tmp_path / "items.parquet"),
            "--out", str(tmp_path / "student")]) == 0

    out = str(tmp_path / "routed")
    report = annotate.run(spark, spec, sdf, out, routing=annotate.Routing(
        {"type": "student", "path": str(tmp_path / "student")}, "popularity", head_budget=40))
    table = read_latest(out, spec)[0].merge(items[["item_id", "popularity"]], on="item_id")
    assert len(table) == 160 and table["item_id"].is_unique
    assert report["rows_by_tail_engine"] == 120
    tail = table[table["labelled_by"] == "tail"]
    head = table[table["labelled_by"] == "head"]
    assert head["popularity"].min() >= tail["popularity"].max()
    assert tail["model"].str.startswith("student:").all()
    assert head["model"].eq("embedding:all-MiniLM-L6-v2-onnx").all()
    ok = tail[tail["error"].isna()]
    assert len(ok) == len(tail)  # every item has a title, so no row may fail
    for name, attr in spec.attributes.items():
        assert ok[f"{name}_label"].isin(attr.labels).all()
        assert ok[f"{name}_confidence"].between(0, 1).all()
    assert ok["caption"].notna().all()  # the student captions through its encoder

    # Re-runs compare each row's model with this run's engine for the row's tier: the same
    # routing redoes nothing; without routing the tail rows go to the main engine.
    rerun = annotate.run(spark, spec, sdf, out, routing=annotate.Routing(
        {"type": "student", "path": str(tmp_path / "student")}, "popularity", head_budget=40))
    assert rerun["rows_annotated"] == 0
    kept = annotate.run(spark, spec, sdf, out, keep_other_models=True)
    assert kept["rows_annotated"] == 0
    unrouted = annotate.run(spark, spec, sdf, out)
    assert unrouted["parts"]["vibe"]["reasons"] == {"engine": 120}
    assert unrouted["parts"]["semantic_id"]["reasons"] == {}
    table = read_latest(out, spec)[0]
    assert table["model"].eq("embedding:all-MiniLM-L6-v2-onnx").all()
    assert table["labelled_by"].eq("head").all()
