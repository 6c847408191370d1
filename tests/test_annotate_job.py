"""The annotate job: spark-submit end to end, then incremental and idempotent re-runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from spark_jobs import annotate

ROOT = Path(__file__).resolve().parent.parent
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"
# What `source .venv/bin/activate` gives a user: spark-submit finds this interpreter.
SUBMIT_ENV = {**os.environ, "PYSPARK_PYTHON": sys.executable,
              "PYSPARK_DRIVER_PYTHON": sys.executable,
              "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory, items_small):
    d = tmp_path_factory.mktemp("annotate_job")
    items = items_small.copy()
    items.loc[3, "title"] = None           # bad rows must come out with an error, not vanish
    items.loc[3, "description"] = None
    items.to_parquet(d / "items.parquet", index=False, coerce_timestamps="us",
                     allow_truncated_timestamps=True)
    return d


@pytest.fixture(scope="module")
def first_run(job_dir):
    out, report = job_dir / "features", job_dir / "report.json"
    proc = subprocess.run(
        [str(SPARK_SUBMIT), "--master", "local[2]",
         "--conf", f"spark.pyspark.python={sys.executable}",
         str(ROOT / "spark_jobs" / "annotate.py"), "--spec", str(ROOT / "specs/movielens.yaml"),
         "--input", str(job_dir / "items.parquet"), "--output", str(out),
         "--report", str(report), "--batch-size", "32"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=SUBMIT_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(report.read_text()), proc


def test_spark_submit_writes_the_feature_table(first_run, items_small, spec):
    out, report, proc = first_run
    table = pd.read_parquet(out)
    assert len(table) == len(items_small) and table["item_id"].is_unique
    assert set(table["item_id"]) == set(items_small["item_id"])
    assert report["rows_in"] == report["rows_written"] == len(items_small)
    assert report["rows_annotated"] == len(items_small) and report["rows_reused"] == 0
    assert report["rows_with_errors"] == 1
    bad = table.set_index("item_id").loc[items_small.loc[3, "item_id"]]
    assert pd.isna(bad["vibe_label"]) and "empty text" in bad["error"]
    good = table[table["error"].isna()]
    for name, attr in spec.attributes.items():
        assert good[f"{name}_label"].isin(attr.labels).all()
        assert good[f"{name}_confidence"].between(0, 1).all()
    assert good["caption_tokens"].map(len).eq(spec.caption.top_k).all()
    assert (table["spec_version"] == spec.version).all()
    assert str(table["event_timestamp"].dtype).startswith("datetime64")
    assert "[annotate] report" in proc.stdout


def test_rerun_reuses_and_reannotates_only_changes(first_run, job_dir, spark, spec):
    out, _, _ = first_run
    before = pd.read_parquet(out).set_index("item_id").sort_index()
    items = spark.read.parquet(str(job_dir / "items.parquet"))

    report = annotate.run(spark, spec, items, str(out))
    assert report["rows_annotated"] == 1  # only the error row is retried
    assert report["rows_reused"] == len(before) - 1
    same = pd.read_parquet(out).set_index("item_id").sort_index()
    assert len(same) == len(before) and same.index.is_unique
    ok = before["error"].isna()
    pd.testing.assert_series_equal(same.loc[ok[ok].index, "created_timestamp"],
                                   before.loc[ok[ok].index, "created_timestamp"])

    changed = items.toPandas()
    changed.loc[[0, 1, 2], "title"] = ["Alien (1979)", "Amélie (2001)", "Heat (1995)"]
    changed.to_parquet(job_dir / "items2.parquet", index=False, coerce_timestamps="us",
                       allow_truncated_timestamps=True)
    report = annotate.run(spark, spec, spark.read.parquet(str(job_dir / "items2.parquet")),
                          str(out))
    assert report["rows_annotated"] == 4 and report["rows_reused"] == len(before) - 4
    after = pd.read_parquet(out).set_index("item_id").sort_index()
    assert len(after) == len(before) and after.index.is_unique
    moved = after["content_hash"] != before["content_hash"]
    assert set(after.index[moved]) == set(changed.loc[[0, 1, 2], "item_id"])


def test_bad_inputs_get_clear_errors(job_dir, spark, spec, capsys):
    assert annotate.main(["--spec", "missing.yaml", "--input", "x", "--output", "y"]) == 2
    assert "spec file not found" in capsys.readouterr().err
    assert annotate.main(["--spec", str(ROOT / "specs/movielens.yaml"), "--input",
                          str(job_dir / "items.parquet"), "--output", str(job_dir / "o"),
                          "--engine", "gpt9"]) == 2
    assert "unknown engine type 'gpt9'" in capsys.readouterr().err
    dupes = spark.createDataFrame(pd.DataFrame({
        "item_id": [1, 1], "title": ["a", "b"], "description": [None, None],
        "event_timestamp": pd.to_datetime(["2020-01-01", "2020-01-02"], utc=True)}))
    with pytest.raises(annotate.JobError, match="unique"):
        annotate.run(spark, spec, dupes, str(job_dir / "dupes"))
    assert not (job_dir / "dupes").exists()


def test_head_tail_routing(job_dir, spark, spec, items_small):
    """The most popular items go to the main engine, the rest to the tail engine."""
    items = spark.read.parquet(str(job_dir / "items.parquet"))
    tail_engine = {"type": "embedding", "temperature": 0.2}
    out = str(job_dir / "routed")
    report = annotate.run(spark, spec, items, out, routing=annotate.Routing(
        tail_engine, "popularity", head_budget=10))
    table = pd.read_parquet(out).merge(items_small[["item_id", "popularity"]], on="item_id")
    assert len(table) == len(items_small) and table["item_id"].is_unique
    head = table[table["labelled_by"] == "head"]
    assert len(head) == 10 and report["rows_by_tail_engine"] == len(items_small) - 10
    assert head["popularity"].min() >= table.loc[table["labelled_by"] == "tail",
                                                 "popularity"].max()
    # a different temperature gives different confidences for the same label scores
    both = table[table["error"].isna()]
    assert both.groupby("labelled_by")["vibe_confidence"].mean().nunique() == 2

    report = annotate.run(spark, spec, items, out, full=True, routing=annotate.Routing(
        tail_engine, "popularity", min_popularity=50))
    table = pd.read_parquet(out).merge(items_small[["item_id", "popularity"]], on="item_id")
    assert (table["labelled_by"] == "head").tolist() == (table["popularity"] >= 50).tolist()
