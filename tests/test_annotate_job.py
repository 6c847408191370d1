"""The annotate job: spark-submit end to end, then per-part incremental and idempotent re-runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from spark_jobs import annotate
from udfs.schema import AnnotationSchema
from udfs.spec import parse_spec
from udfs.table import FeatureTable, read_latest

ROOT = Path(__file__).resolve().parent.parent
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"
# What `source .venv/bin/activate` gives a user: spark-submit finds this interpreter.
SUBMIT_ENV = {**os.environ, "PYSPARK_PYTHON": sys.executable,
              "PYSPARK_DRIVER_PYTHON": sys.executable,
              "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def latest(out) -> pd.DataFrame:
    """The table as Feast serves it, indexed by its id column."""
    rows, key = read_latest(str(out))
    return rows.set_index(key).sort_index()


def history(out) -> pd.DataFrame:
    return pd.read_parquet(out)  # every committed run (pyarrow skips _staging, _schema.json)


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
         "--timestamp-column", "event_timestamp", "--report", str(report), "--batch-size", "32"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=SUBMIT_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(report.read_text()), proc


def test_spark_submit_writes_the_feature_table(first_run, items_small, spec):
    out, report, proc = first_run
    table = latest(out)
    assert list(table.reset_index().columns) == AnnotationSchema(spec).names
    assert len(table) == len(items_small) and set(table.index) == set(items_small["item_id"])
    assert report["rows_in"] == report["rows_written"] == len(items_small)
    assert report["rows_annotated"] == len(items_small) and report["rows_reused"] == 0
    assert report["parts"]["vibe"] == {"annotated": len(items_small),
                                       "reasons": {"new": len(items_small)}}
    assert report["rows_with_errors"] == 1
    bad = table.loc[items_small.loc[3, "item_id"]]
    assert pd.isna(bad["vibe_label"]) and "empty text" in bad["error"]
    good = table[table["error"].isna()]
    for name, attr in spec.attributes.items():
        assert good[f"{name}_label"].isin(attr.labels).all()
        assert good[f"{name}_confidence"].between(0, 1).all()
        assert (table[f"{name}_version"] == attr.version).all()
    assert good["caption_tokens"].map(len).eq(spec.caption.top_k).all()
    assert (table["caption_version"] == spec.caption.version).all()
    # semantic IDs: a quantiser fitted on the input and saved under the table; a code path
    # per item, its prefix tokens, the quantiser's version; the report gives code usage
    sid = report["semantic_id"]
    assert sid["fitted"] and sid["embedder"] == "embedding:all-MiniLM-L6-v2"
    assert (Path(out) / "_quantizers" / sid["version"] / "quantizer.json").exists()
    assert (table["semantic_id_version"] == sid["version"]).all()
    levels, codes = spec.semantic_id.levels, spec.semantic_id.codes
    assert good["semantic_id"].map(lambda c: len(c) == levels and all(0 <= x < codes for x in c)
                                   ).all()
    assert good["semantic_id_tokens"].map(len).eq(levels).all()
    assert bad["semantic_id"] is None and "semantic_id: empty text" in bad["error"]
    assert sid["usage"]["items"] == len(good) and len(sid["usage"]["levels"]) == levels
    assert report["parts"]["semantic_id"] == {"annotated": len(items_small),
                                              "reasons": {"new": len(items_small)}}
    assert "[annotate] semantic IDs" in proc.stdout
    assert (table["spec_version"] == spec.version).all()
    # new items are valid from when they became available (the timestamp column)
    expected = items_small.set_index("item_id")["event_timestamp"].sort_index()
    assert (table["event_timestamp"] == expected).all()
    assert "[annotate] report" in proc.stdout
    # readable output: progress and the report, not Spark's INFO log
    assert " INFO " not in proc.stderr, proc.stderr[-2000:]
    assert not list(Path(out).glob("_staging/*"))


def test_rerun_reuses_and_reannotates_only_changes(first_run, job_dir, spark, spec):
    out, _, _ = first_run
    before = latest(out)
    items = spark.read.parquet(str(job_dir / "items.parquet"))

    report = annotate.run(spark, spec, items, str(out), timestamp_column="event_timestamp")
    assert report["rows_reused"] == len(before) - 1
    assert report["parts"]["vibe"]["reasons"] == {"retry": 1}  # only the error row is retried
    assert report["parts"]["semantic_id"]["reasons"] == {"retry": 1}
    assert not report["semantic_id"]["fitted"]  # the saved quantiser is reused
    # ... and fails again the same way (its text is empty): no new row for it
    assert report["rows_written"] == 0 and report["rows_not_written"] == 1
    same = latest(out)
    assert len(same) == len(before)
    ok = before["error"].isna()
    pd.testing.assert_series_equal(same.loc[ok[ok].index, "created_timestamp"],
                                   before.loc[ok[ok].index, "created_timestamp"])
    # a refit on the unchanged catalogue draws the same sample: the same quantiser, the
    # same codes, nothing to write
    report = annotate.run(spark, spec, items, str(out), timestamp_column="event_timestamp",
                          refit_semantic_ids=True)
    assert report["semantic_id"]["fitted"] and report["semantic_id"]["reproduced"]
    assert report["semantic_id"]["version"] == before["semantic_id_version"].iloc[0]
    assert report["rows_written"] == 0 and len(history(out)) == len(before)

    changed = items.toPandas()
    changed.loc[[0, 1, 2], "title"] = ["Alien (1979)", "Amélie (2001)", "Heat (1995)"]
    changed.to_parquet(job_dir / "items2.parquet", index=False, coerce_timestamps="us",
                       allow_truncated_timestamps=True)
    report = annotate.run(spark, spec, spark.read.parquet(str(job_dir / "items2.parquet")),
                          str(out), timestamp_column="event_timestamp")
    assert report["rows_annotated"] == 3 and report["rows_reused"] == len(before) - 4
    assert report["parts"]["caption"]["reasons"] == {"content": 3, "retry": 1}
    after = latest(out)
    assert len(after) == len(before)
    moved = after["content_hash"] != before["content_hash"]
    ids = set(changed.loc[[0, 1, 2], "item_id"])
    assert set(after.index[moved]) == ids
    # history: the old rows stay; the new ones are valid from the run's time
    run_time = pd.Timestamp(report["run_time"])
    assert (after.loc[list(ids), "event_timestamp"] == run_time.floor("us")).all()
    old = history(out)
    assert (old["item_id"].isin(ids)).sum() == 2 * len(ids)
    # an unchanged re-run writes nothing at all
    report = annotate.run(spark, spec, spark.read.parquet(str(job_dir / "items2.parquet")),
                          str(out), timestamp_column="event_timestamp")
    assert report["rows_written"] == 0 and report["committed"] == []


def edited(attribute: str, **semantic_id):
    """The demo spec with one label definition of `attribute` reworded (and the semantic
    ID's settings changed by `semantic_id`)."""
    data = yaml.safe_load((ROOT / "specs/movielens.yaml").read_text())
    labels = data["attributes"][attribute]["labels"]
    first = next(iter(labels))
    labels[first] = labels[first] + " (reworded)"
    data["semantic_id"] = {**data["semantic_id"], **semantic_id}
    return parse_spec(data)


def test_changing_one_attribute_reannotates_that_attribute_alone(spark, spec, tmp_path,
                                                                 items_small):
    items = spark.createDataFrame(items_small[["item_id", "title", "description"]])
    out = str(tmp_path / "out")
    annotate.run(spark, spec, items, out)
    before = latest(out)

    new_spec = edited("audience")
    assert new_spec.attributes["audience"].version != spec.attributes["audience"].version
    assert new_spec.attributes["vibe"].version == spec.attributes["vibe"].version
    report = annotate.run(spark, new_spec, items, out)

    n = len(items_small)
    assert report["parts"] == {"vibe": {"annotated": 0, "reasons": {}},
                               "audience": {"annotated": n, "reasons": {"definition": n}},
                               "caption": {"annotated": 0, "reasons": {}},
                               "semantic_id": {"annotated": 0, "reasons": {}}}
    after = latest(out)
    assert (after["audience_version"] == new_spec.attributes["audience"].version).all()
    for col in ("vibe_label", "vibe_confidence", "vibe_version", "caption", "caption_version",
                "semantic_id_version"):
        pd.testing.assert_series_equal(after[col], before[col])
    assert (after["semantic_id"].map(list) == before["semantic_id"].map(list)).all()
    assert (after["created_timestamp"] > before["created_timestamp"]).all()
    assert (after["spec_version"] == new_spec.version).all()

    # another quantiser (other settings, another sample) re-assigns the semantic IDs alone
    reseeded = edited("audience", codes=16, sample=30, seed=1)
    assert reseeded.attributes == new_spec.attributes
    report = annotate.run(spark, reseeded, items, out)
    assert report["semantic_id"]["fitted"] and report["semantic_id"]["sample_size"] == 30
    assert report["parts"]["semantic_id"] == {"annotated": n, "reasons": {"definition": n}}
    assert all(report["parts"][p]["annotated"] == 0 for p in ("vibe", "audience", "caption"))
    final = latest(out)
    assert (final["semantic_id_version"] == report["semantic_id"]["version"]).all()
    assert (final["semantic_id_version"] != after["semantic_id_version"]).all()
    assert not (final["semantic_id_tokens"].map(list) == after["semantic_id_tokens"].map(list)
                ).any()  # tokens name the quantiser: none survives a refit
    for col in ("vibe_label", "audience_label", "caption"):
        pd.testing.assert_series_equal(final[col], after[col])


def catalogue(n: int = 30) -> pd.DataFrame:
    """Not MovieLens: string SKUs, one text column of its own, no timestamp column."""
    kinds = ["cookbook", "thriller novel", "picture book for toddlers", "history of Rome",
             "poetry collection", "travel guide to Japan"]
    return pd.DataFrame({"sku": [f"BK-{900000 + i}" for i in range(n)],
                         "blurb": [f"A {kinds[i % len(kinds)]}, volume {i}" for i in range(n)],
                         "shelf": ["fiction" if i % 2 else "non-fiction" for i in range(n)]})


CATALOGUE_DATA = {
    "name": "books",
    "attributes": {
        "fiction": {"labels": {"yes": "a made-up story", "no": "facts, reference or how-to"}},
        "reader": {"labels": {"toddler": "a small child", "teen": "a young reader",
                              "adult": "a grown-up", "scholar": "a researcher",
                              "traveller": "someone planning a trip"}},
    },
    "caption": {"descriptors": ["food", "crime", "children", "history", "poems", "travel"],
                "top_k": 2},
}
CATALOGUE_SPEC = parse_spec(CATALOGUE_DATA)


def test_string_ids_one_text_column_and_no_timestamp(spark, tmp_path):
    items = spark.createDataFrame(catalogue())
    out = str(tmp_path / "books")
    report = annotate.run(spark, CATALOGUE_SPEC, items, out, id_column="sku",
                          text_columns=["blurb"])
    table = latest(out)
    assert table.index.name == "sku" and len(table) == 30 and table["error"].isna().all()
    assert table["fiction_label"].isin(["yes", "no"]).all()
    assert table["reader_label"].isin(CATALOGUE_SPEC.attributes["reader"].labels).all()
    # no --timestamp-column: new items are valid from the run's time, and the report says so
    assert (table["event_timestamp"] == pd.Timestamp(report["run_time"]).floor("us")).all()
    assert "run time" in report["event_timestamp"]
    assert FeatureTable(out).recorded(FeatureTable(out).directory(
        AnnotationSchema(CATALOGUE_SPEC, "sku", "string")))["id_type"] == "string"
    # one-argument SQL calls
    import udfs
    udfs.register(spark, CATALOGUE_SPEC)
    items.createOrReplaceTempView("books")
    rows = spark.sql("SELECT sku, annotate_all(blurb) AS a, caption(blurb) AS c, "
                     "annotate('reader', blurb) AS r FROM books").collect()
    assert len(rows) == 30
    assert all(r.a.error is None and r.c.error is None and r.r.error is None for r in rows)
    assert all(r.a.reader_label == r.r.label for r in rows)


def test_a_where_clause_annotates_what_it_selects(spark, tmp_path):
    items = spark.createDataFrame(catalogue())
    sql = "SELECT sku, annotate_all(blurb) AS a FROM items WHERE shelf = 'fiction'"
    out = str(tmp_path / "books")
    report = annotate.run(spark, CATALOGUE_SPEC, items, out, sql=sql, id_column="sku",
                          text_columns=["blurb"])
    assert report["rows_annotated"] == 15 and report["rows_not_written"] == 15
    assert set(latest(out).index) == set(catalogue().query("shelf == 'fiction'")["sku"])
    # the rest arrives when a later run selects it; nothing is annotated twice
    report = annotate.run(spark, CATALOGUE_SPEC, items, out, id_column="sku",
                          text_columns=["blurb"])
    assert report["rows_annotated"] == 15 and report["rows_reused"] == 15
    assert len(latest(out)) == 30 and len(history(out)) == 30


def test_per_part_query_and_a_bad_query(spark, tmp_path):
    items = spark.createDataFrame(catalogue(8))
    out = str(tmp_path / "books")
    sql = ("SELECT sku, annotate('fiction', blurb) AS fiction, annotate('reader', blurb) AS reader,"
           " caption(blurb) AS caption FROM items")
    report = annotate.run(spark, CATALOGUE_SPEC, items, out, sql=sql, id_column="sku",
                          text_columns=["blurb"])
    assert report["rows_annotated"] == 8 and latest(out)["caption"].notna().all()

    # a semantic ID per part too, from a one-argument call, string ids
    with_sid = parse_spec({**CATALOGUE_DATA, "semantic_id": {"levels": 2, "codes": 4,
                                                             "sample": 8}})
    sid_out = str(tmp_path / "books_sid")
    report = annotate.run(spark, with_sid, items, sid_out, id_column="sku",
                          text_columns=["blurb"],
                          sql=sql.replace(" FROM", ", semantic_id(blurb) AS semantic_id FROM"))
    assert report["parts"]["semantic_id"] == {"annotated": 8, "reasons": {"new": 8}}
    table = read_latest(sid_out, with_sid)[0]
    assert table["error"].isna().all()
    assert table["semantic_id"].map(lambda c: len(c) == 2 and max(c) < 4).all()
    assert (table["semantic_id_version"] == report["semantic_id"]["version"]).all()
    assert report["semantic_id"]["usage"]["items"] == 8

    missing = "SELECT sku, annotate('fiction', blurb) AS fiction FROM items"
    with pytest.raises(annotate.JobError, match=r"no annotation for \['reader', 'caption'\]"):
        annotate.run(spark, CATALOGUE_SPEC, items, str(tmp_path / "o2"), sql=missing,
                     id_column="sku", text_columns=["blurb"])
    doubled = ("SELECT sku, annotate_all(blurb) AS a FROM items "
               "LATERAL VIEW explode(array(1, 2)) copies AS k")
    changed = spark.createDataFrame(catalogue(8).assign(blurb=lambda d: d["blurb"] + " (2nd ed.)"))
    with pytest.raises(annotate.JobError, match="distinct ids"):
        annotate.run(spark, CATALOGUE_SPEC, changed, out, sql=doubled, id_column="sku",
                     text_columns=["blurb"])
    # refused before anything was visible: the table is as it was, no staging left behind
    assert len(history(out)) == 8 and not list(Path(out).glob("_staging/*"))


def test_adding_an_attribute_keeps_the_history(spark, tmp_path):
    items = spark.createDataFrame(catalogue(10))
    out = str(tmp_path / "books")
    small = CATALOGUE_SPEC.restricted(["fiction", "caption"])
    annotate.run(spark, small, items, out, id_column="sku", text_columns=["blurb"])
    old = latest(out)
    report = annotate.run(spark, CATALOGUE_SPEC, items, out, id_column="sku",
                          text_columns=["blurb"])
    assert report["parts"]["reader"]["annotated"] == 10
    assert report["parts"]["fiction"]["annotated"] == 0 and report["migrated_from"]
    table = FeatureTable(out)
    assert [fp for fp, _ in table.directories()] == [
        AnnotationSchema(CATALOGUE_SPEC).fingerprint, AnnotationSchema(small).fingerprint]
    new = read_latest(out, CATALOGUE_SPEC)[0].set_index("sku").sort_index()
    assert new["reader_label"].notna().all()
    pd.testing.assert_series_equal(new["fiction_label"], old["fiction_label"])
    # the migrated history keeps the old rows (without the new attribute) for training
    both = pd.read_parquet(table.directory(AnnotationSchema(CATALOGUE_SPEC)))
    assert len(both) == 20 and both["reader_label"].isna().sum() == 10


def test_bad_inputs_get_clear_errors(job_dir, spark, spec, capsys):
    assert annotate.main(["--spec", "missing.yaml", "--input", "x", "--output", "y"]) == 2
    assert "spec file not found" in capsys.readouterr().err
    assert annotate.main(["--spec", str(ROOT / "specs/movielens.yaml"), "--input",
                          str(job_dir / "items.parquet"), "--output", str(job_dir / "o"),
                          "--engine", "gpt9"]) == 2
    assert "unknown engine type 'gpt9'" in capsys.readouterr().err
    dupes = spark.createDataFrame(pd.DataFrame({
        "item_id": [1, 1], "title": ["a", "b"], "description": [None, None]}))
    with pytest.raises(annotate.JobError, match="unique"):
        annotate.run(spark, spec, dupes, str(job_dir / "dupes"))
    assert not (job_dir / "dupes").exists()
    floats = spark.createDataFrame(pd.DataFrame({"item_id": [1.5], "title": ["a"],
                                                 "description": ["b"]}))
    with pytest.raises(annotate.JobError, match="strings or integers"):
        annotate.run(spark, spec, floats, str(job_dir / "floats"))
    stamps = spark.createDataFrame(pd.DataFrame({"item_id": [1, 2], "title": ["a", "b"],
                                                 "description": [None, None],
                                                 "added": ["2024-01-02", "last tuesday"]}))
    with pytest.raises(annotate.JobError, match="last tuesday"):
        annotate.run(spark, spec, stamps, str(job_dir / "stamps"), timestamp_column="added")
    # the table keeps its key: a run with string ids on an integer-keyed table is refused
    from tests.test_gate import annotation_frame, write_annotations
    frame = annotation_frame(n=5).assign(  # the gate's table, with the spec's semantic ID
        semantic_id=[[1, 2, 3]] * 5, semantic_id_tokens=[[1, 2, 3]] * 5, semantic_id_version="q")
    out = str(write_annotations(frame, job_dir / "int_keyed"))
    strings = spark.read.parquet(str(job_dir / "items.parquet")).selectExpr(
        "cast(item_id as string) as item_id", "title", "description")
    with pytest.raises(annotate.JobError, match="keys items by 'item_id' \\(int64\\)"):
        annotate.run(spark, spec, strings, out)


def test_head_tail_routing(job_dir, spark, spec, items_small):
    """The most popular items go to the main engine, the rest to the tail engine."""
    items = spark.read.parquet(str(job_dir / "items.parquet"))
    tail_engine = {"type": "embedding", "temperature": 0.2}
    out = str(job_dir / "routed")
    report = annotate.run(spark, spec, items, out, routing=annotate.Routing(
        tail_engine, "popularity", head_budget=10))
    table = latest(out).reset_index().merge(items_small[["item_id", "popularity"]], on="item_id")
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
    table = latest(out).reset_index().merge(items_small[["item_id", "popularity"]], on="item_id")
    assert (table["labelled_by"] == "head").tolist() == (table["popularity"] >= 50).tolist()


def test_switching_engines_reannotates_unless_kept(spark, tmp_path, tiny_llm_dir):
    """Rows another model labelled are redone (reason "engine"); --keep-other-models keeps them."""
    spec = parse_spec({**CATALOGUE_DATA, "semantic_id": {"levels": 2, "codes": 4, "sample": 12}})
    items = spark.createDataFrame(catalogue(12))
    out, opts = str(tmp_path / "books"), {"id_column": "sku", "text_columns": ["blurb"]}
    llm = {"type": "transformers", "model": str(tiny_llm_dir)}
    embedder = {"type": "embedding"}
    annotate.run(spark, spec, items, out, **opts)
    before = latest(out)
    assert before["model"].eq("embedding:all-MiniLM-L6-v2-onnx").all()

    kept = annotate.run(spark, spec, items, out, engine=llm, embed_engine=embedder,
                        keep_other_models=True, **opts)
    assert kept["rows_annotated"] == 0

    report = annotate.run(spark, spec, items, out, engine=llm, embed_engine=embedder, **opts)
    engine_parts = ["fiction", "reader", "caption"]
    assert {p: report["parts"][p]["reasons"] for p in engine_parts} == \
        {p: {"engine": 12} for p in engine_parts}
    assert report["parts"]["semantic_id"]["reasons"] == {}  # the embedder did not change
    after = latest(out)
    assert after["model"].eq(f"transformers:{tiny_llm_dir.name}").all()
    assert after["error"].isna().all()
    assert after["fiction_label"].isin(["yes", "no"]).all()
    pd.testing.assert_series_equal(after["semantic_id"].map(list), before["semantic_id"].map(list))
    assert len(history(out)) == 24

    again = annotate.run(spark, spec, items, out, engine=llm, embed_engine=embedder, **opts)
    assert again["rows_annotated"] == 0  # the same engine: nothing to redo
    back = annotate.run(spark, spec, items, out, **opts)
    assert back["parts"]["reader"]["reasons"] == {"engine": 12}
    pd.testing.assert_frame_equal(latest(out)[["fiction_label", "reader_label", "caption"]],
                                  before[["fiction_label", "reader_label", "caption"]])
