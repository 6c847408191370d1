"""The gate's Spark-computed checks agree with Great Expectations' pandas checks.

The same frames (good and bad) go through `validate_frame` (GE 1.x, pandas) and
`validate_spark_frame` (Spark aggregations, expectations.spark_checks); every check must
agree on the verdict, the observed value, the unexpected count and the offending values.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import great_expectations as gx

from expectations.gate import Gate, validate_frame
from expectations.reference import label_distribution
from expectations.spark_checks import validate_spark_frame, with_derived_columns
from expectations.suites import spec_suite, user_suites
from expectations.suites import with_derived_columns as pandas_derived
from expectations.thresholds import Thresholds
from tests.test_gate import (SPEC, annotation_frame, annotation_schema, item_stats_frame,
                             with_errors)
from udfs.tokens import caption_tokens

E = gx.expectations


def to_spark(spark, df: pd.DataFrame, path, schema: pa.Schema | None = None):
    """Through Parquet, as the offline store reads it."""
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False),
                   path / "part-0.parquet")
    return spark.read.parquet(str(path))


def reference(df: pd.DataFrame) -> dict:
    return {"attributes": label_distribution(df, SPEC)}


def bad_frame() -> pd.DataFrame:
    df = annotation_frame(seed=11)
    df.loc[[4, 9, 50], "vibe_label"] = "spooky"
    df.loc[0, "audience_confidence"] = 1.5
    df.loc[7, "vibe_confidence"] = np.nan
    df.at[1, "caption_tokens"] = caption_tokens(" ".join(f"w{i}" for i in range(30)))
    df.at[2, "caption_tokens"] = []
    df.loc[3, "item_id"] = df.loc[4, "item_id"]
    df.loc[60:75, "audience_label"] = None
    return df


EXTRA = gx.ExpectationSuite(name="extra", expectations=[
    E.ExpectColumnValuesToBeBetween(column="vibe_confidence", min_value=0.5, strict_min=True),
    E.ExpectColumnValuesToBeBetween(column="audience_confidence", max_value=0.9,
                                    strict_max=True, mostly=0.8),
    E.ExpectColumnValuesToBeInSet(column="no_such_column", value_set=["a"]),
    E.ExpectColumnValuesToNotBeInSet(column="vibe_label", value_set=["dark"]),
    E.ExpectColumnKLDivergenceToBeLessThan(
        column="audience_label", partition_object={"values": ["kids", "teens"],
                                                   "weights": [0.5, 0.5]},
        threshold=0.1, tail_weight_holdout=0.2),
    E.ExpectTableRowCountToBeBetween(min_value=10, max_value=150),
])

CASES = {
    "clean, with drift reference": lambda: (annotation_frame(seed=7),
                                            reference(annotation_frame(seed=0))),
    "every kind of defect": lambda: (bad_frame(), reference(annotation_frame(seed=0))),
    "error rows over the limit": lambda: (with_errors(annotation_frame(seed=2), 30), None),
    "drifted labels": lambda: (annotation_frame(seed=3).assign(
        vibe_label=np.where(np.arange(200) % 4 == 0, "romantic", "dark")),
        reference(annotation_frame(seed=0))),
    "a label column all null": lambda: (annotation_frame(seed=4).assign(vibe_label=None),
                                        reference(annotation_frame(seed=0))),
}


def key(check) -> tuple:
    expected = {k: v for k, v in check.expected.items()}
    return (check.suite, check.expectation, check.column, json.dumps(expected, sort_keys=True,
                                                                     default=str))


def assert_agree(pandas_result, spark_result) -> None:
    assert spark_result.rows == pandas_result.rows
    ge = {key(c): c for c in pandas_result.checks}
    ours = {key(c): c for c in spark_result.checks}
    assert ours.keys() == ge.keys()
    for k, g in ge.items():
        s = ours[k]
        where = f"{k[1]}({k[2]})"
        assert s.success == g.success, where
        assert s.unexpected_count == g.unexpected_count, where
        if g.observed is None or s.observed is None:
            assert s.observed == g.observed, where
        else:
            assert s.observed == pytest.approx(g.observed, rel=1e-9, abs=1e-12), where
        assert (s.error is None) == (g.error is None), where
        if g.error and "does not exist" in g.error:
            assert s.error == g.error
        # GE shows the first 10 offending rows' values, Spark up to 10 distinct ones: with
        # at most 10 distinct offending values both show exactly those
        def values(c):
            return sorted(json.dumps(v, default=str) for v in c.unexpected_values)
        if g.unexpected_count and len(set(values(g))) < 10:
            assert values(s) == values(g), where
    assert spark_result.success == pandas_result.success


@pytest.mark.parametrize("case", list(CASES))
def test_spark_checks_agree_with_great_expectations(spark, tmp_path, case):
    df, ref = CASES[case]()
    suite, _ = spec_suite(SPEC, Thresholds(), ref, len(df))
    suites = [suite, EXTRA]
    expected = validate_frame(pandas_derived(df), suites, view="item_annotations")
    sdf = with_derived_columns(to_spark(spark, df, tmp_path / "t", annotation_schema()))
    got = validate_spark_frame(sdf, suites, view="item_annotations").result
    assert_agree(expected, got)
    assert any(not c.success for c in expected.checks)  # EXTRA always fails somewhere


def test_user_suites_agree_on_the_stats_views(spark, tmp_path):
    good, bad = item_stats_frame(), item_stats_frame()
    bad.loc[0, "item_n_ratings"] = -3
    bad.loc[1, "item_mean_rating"] = 7.0
    bad.loc[2, "item_id"] = 1
    suites = user_suites(None, "item_stats")
    for name, df in (("good", good), ("bad", bad)):
        expected = validate_frame(df, suites, view="item_stats")
        got = validate_spark_frame(to_spark(spark, df, tmp_path / name), suites,
                                   view="item_stats").result
        assert_agree(expected, got)
        assert got.success == (name == "good")


def test_spark_gate_quarantines_with_spark_and_reports_like_pandas(spark, tmp_path):
    gate = Gate(spec=SPEC, report_dir=tmp_path / "reports", quarantine_dir=tmp_path / "q",
                reference_dir=tmp_path / "ref")
    df = bad_frame()
    sdf = to_spark(spark, df, tmp_path / "t", annotation_schema()).persist()
    result = gate.check_spark("item_annotations", sdf)
    sdf.unpersist()
    pandas_result = Gate(spec=SPEC, report_dir=tmp_path / "r2", quarantine_dir=tmp_path / "q2",
                         reference_dir=tmp_path / "ref").check("item_annotations", df)
    assert_agree(pandas_result, result)
    assert not result.success and result.report.exists()
    report = json.loads(result.report.read_text())
    assert {(f["expectation"], f["column"]) for f in report["failures"]} == {
        (f.expectation, f.column) for f in pandas_result.failures}
    batch, failing = result.quarantine
    assert batch.is_dir() and len(pd.read_parquet(batch)) == len(df)
    rows = pd.read_parquet(failing)
    pandas_rows = pd.read_parquet(pandas_result.quarantine[1])
    assert sorted(rows["item_id"]) == sorted(pandas_rows["item_id"])
    ours = {(r.item_id, tuple(sorted(r.failed_expectations))) for r in rows.itertuples()}
    theirs = {(r.item_id, tuple(sorted(r.failed_expectations)))
              for r in pandas_rows.itertuples()}
    assert ours == theirs
    assert list(rows.columns) == list(df.columns) + ["failed_expectations"]


def test_spark_gate_refuses_shape_like_pandas(spark, tmp_path):
    gate = Gate(spec=SPEC, report_dir=tmp_path / "reports", quarantine_dir=tmp_path / "q",
                reference_dir=tmp_path / "ref")
    missing = to_spark(spark, annotation_frame().drop(columns=["audience_confidence"]),
                       tmp_path / "m")
    result = gate.check_spark("item_annotations", missing)
    assert not result.success
    assert "the table lacks ['audience_confidence'], which the spec declares" in result.summary()
    empty = to_spark(spark, annotation_frame().head(0), tmp_path / "e", annotation_schema())
    result = gate.check_spark("item_annotations", empty)
    assert "the table has no rows" in result.summary()
    assert math.isfinite(len(result.checks))


# --- multi-label and ordinal attributes (specs/movielens_kinds.yaml) --------------------------

def _kinds_cases():
    from tests.test_gate_kinds import KINDS, bad_multi_frame, kinds_frame

    def ref(df):
        return {"attributes": label_distribution(df, KINDS)}

    def drifted():
        df = kinds_frame(seed=3)
        df["genres_labels"] = [["Drama", "Thriller"] if i % 2 else list(v)
                               for i, v in enumerate(df["genres_labels"])]
        return df

    def errors():
        df = kinds_frame(seed=4)
        df.loc[:29, "error"] = "engine timeout"
        for column in ("genres_labels", "genres_scores", "intensity_label", "intensity_value"):
            df.loc[:29, column] = None
        return df

    return {
        "kinds: clean, with drift reference": lambda: (kinds_frame(seed=7),
                                                       ref(kinds_frame(seed=0))),
        "kinds: every multi-label defect": lambda: (bad_multi_frame(), ref(kinds_frame(seed=0))),
        "kinds: drifted label shares": lambda: (drifted(), ref(kinds_frame(seed=0))),
        "kinds: error rows, null lists": lambda: (errors(), ref(kinds_frame(seed=0))),
        "kinds: every label list null": lambda: (kinds_frame(seed=2).assign(
            genres_labels=None, genres_scores=None), ref(kinds_frame(seed=0))),
    }


KIND_CASES = _kinds_cases()


@pytest.mark.parametrize("case", list(KIND_CASES))
def test_spark_checks_agree_on_multi_label_and_ordinal_attributes(spark, tmp_path, case):
    from tests.test_gate_kinds import KINDS
    from udfs.schema import AnnotationSchema

    df, ref = KIND_CASES[case]()
    suite, _ = spec_suite(KINDS, Thresholds(), ref, len(df))
    expected = validate_frame(pandas_derived(df, KINDS), [suite], view="item_annotations")
    sdf = with_derived_columns(to_spark(spark, df, tmp_path / "t",
                                        AnnotationSchema(KINDS).arrow_schema()), KINDS)
    got = validate_spark_frame(sdf, [suite], view="item_annotations").result
    assert_agree(expected, got)
    assert got.success == (case == "kinds: clean, with drift reference"), got.summary()


def test_spark_gate_quarantines_multi_label_rows_like_pandas(spark, tmp_path):
    from tests.test_gate_kinds import KINDS, bad_multi_frame
    from udfs.schema import AnnotationSchema

    df = bad_multi_frame()
    gate = Gate(spec=KINDS, report_dir=tmp_path / "reports", quarantine_dir=tmp_path / "q",
                reference_dir=tmp_path / "ref")
    sdf = to_spark(spark, df, tmp_path / "t", AnnotationSchema(KINDS).arrow_schema()).persist()
    result = gate.check_spark("item_annotations", sdf)
    sdf.unpersist()
    pandas_result = Gate(spec=KINDS, report_dir=tmp_path / "r2", quarantine_dir=tmp_path / "q2",
                         reference_dir=tmp_path / "ref").check("item_annotations", df)
    assert_agree(pandas_result, result)
    assert "genres_each_score): 1 rows (0.5%) unexpected (e.g. [1.3])" in result.summary()
    rows = pd.read_parquet(result.quarantine[1])
    pandas_rows = pd.read_parquet(pandas_result.quarantine[1])
    ours = {(r.item_id, tuple(sorted(r.failed_expectations))) for r in rows.itertuples()}
    theirs = {(r.item_id, tuple(sorted(r.failed_expectations)))
              for r in pandas_rows.itertuples()}
    assert ours == theirs
    assert list(rows.columns) == list(df.columns) + ["failed_expectations"]
