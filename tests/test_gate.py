"""The gate on real Great Expectations: what passes, what is refused, and what it leaves behind.

Also home of the synthetic tables (matching feature_repo/definitions.py) that the CLI, Feast
and Redis gate tests write.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from expectations.gate import Gate, validate_frame
from expectations.suites import user_suites
from expectations.thresholds import Thresholds
from udfs.schema import AnnotationSchema, share_columns
from udfs.spec import Spec, load_spec
from udfs.table import FeatureTable
from udfs.tokens import caption_tokens

ROOT = Path(__file__).resolve().parents[1]
SPEC = load_spec(ROOT / "specs" / "movielens.yaml")
EVENT = pd.Timestamp("2024-01-01", tz="UTC")
CAPTIONS = ["dark crime noir heist", "feel-good family comedy", "epic space adventure",
            "quirky coming-of-age romance"]


def annotation_schema(spec: Spec = SPEC) -> pa.Schema:
    return AnnotationSchema(spec).arrow_schema()


def annotation_frame(n: int = 200, seed: int = 0, spec: Spec = SPEC,
                     created: pd.Timestamp | None = None, event: pd.Timestamp = EVENT,
                     ) -> pd.DataFrame:
    """A clean item_annotations table. Every label occurs equally often whatever the seed;
    the seed only decides which item gets which label."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "item_id": np.arange(1, n + 1, dtype="int64"),
        "event_timestamp": event,
        "created_timestamp": created or pd.Timestamp.now(tz="UTC").floor("us"),
    })
    for name, attr in spec.attributes.items():
        df[f"{name}_label"] = rng.permutation(np.resize(np.array(attr.labels), n))
        df[f"{name}_confidence"] = rng.uniform(0.3, 1.0, n)
        df[f"{name}_version"] = attr.version
    df["caption"] = [CAPTIONS[i % len(CAPTIONS)] for i in rng.permutation(n)]
    df["caption_tokens"] = df["caption"].map(caption_tokens)
    df["caption_version"] = spec.caption.version
    if spec.semantic_id is not None:  # a code path per item and its prefix tokens
        from udfs.semantic_ids import prefix_tokens
        k, levels = spec.semantic_id.codes, spec.semantic_id.levels
        df["semantic_id"] = [[int(c) for c in rng.integers(0, k, levels)] for _ in range(n)]
        df["semantic_id_tokens"] = [prefix_tokens(c, "q-test") for c in df["semantic_id"]]
        df["semantic_id_version"] = "q-test"
    df["model"] = "sentence-transformers/all-MiniLM-L6-v2"
    df["labelled_by"] = "head"
    df["spec_version"] = spec.version
    df["content_hash"] = [f"h{i}" for i in df["item_id"]]
    df["error"] = None
    return df


def with_errors(df: pd.DataFrame, n_errors: int) -> pd.DataFrame:
    """The first n rows failed to annotate: an error message and no labels."""
    df = df.copy()
    rows = df.index[:n_errors]
    df.loc[rows, "error"] = "engine timeout"
    for name in SPEC.attributes:
        df.loc[rows, [f"{name}_label", f"{name}_confidence"]] = None
    return df


def item_stats_frame(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({"item_id": np.arange(1, n + 1, dtype="int64"), "event_timestamp": EVENT,
                         "item_n_ratings": rng.integers(1, 300, n).astype("int64"),
                         "item_mean_rating": rng.uniform(0.5, 5.0, n)})


def user_stats_frame(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"user_id": np.arange(1, n + 1, dtype="int64"), "event_timestamp": EVENT,
                       "user_n_ratings": rng.integers(1, 500, n).astype("int64"),
                       "user_mean_rating": rng.uniform(0.5, 5.0, n)})
    for name, attr in SPEC.attributes.items():
        shares = rng.dirichlet(np.ones(len(attr.labels)), n)
        for i, column in enumerate(c for c in share_columns(SPEC)
                                   if c.startswith(f"user_{name}_share_")):
            df[column] = shares[:, i]
    return df


def write_parquet(df: pd.DataFrame, directory: Path, schema: pa.Schema | None = None) -> Path:
    """Replace a table directory the way a Spark job would leave it (part file + _SUCCESS)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    pq.write_table(table, directory / "part-00000.parquet")
    (directory / "_SUCCESS").touch()
    return directory


def write_annotations(df: pd.DataFrame, directory: Path) -> Path:
    """Replace the annotation table at `directory` (an annotate --output) by one run of `df`,
    committed the way the annotate job commits."""
    import shutil
    shutil.rmtree(directory, ignore_errors=True)
    FeatureTable(str(directory)).write_frame(df, AnnotationSchema(SPEC))
    return directory


@pytest.fixture
def gate(tmp_path) -> Gate:
    return Gate(spec=SPEC, report_dir=tmp_path / "reports", quarantine_dir=tmp_path / "quarantine",
                reference_dir=tmp_path / "reference")


def failure(result, expectation: str, column: str):
    matches = [c for c in result.failures if c.expectation == expectation and c.column == column]
    assert matches, f"no failure {expectation}({column}) in:\n{result.summary()}"
    return matches[0]


def test_clean_table_passes_and_reports(gate):
    result = gate.check("item_annotations", annotation_frame())
    assert result.success, result.summary()
    assert result.rows == 200 and result.quarantine == []
    checked = {(c.expectation, c.column) for c in result.checks}
    for name in SPEC.attributes:
        assert ("expect_column_values_to_be_in_set", f"{name}_label") in checked
        assert ("expect_column_values_to_be_between", f"{name}_confidence") in checked
    assert ("expect_column_values_to_be_unique", "item_id") in checked
    assert ("expect_column_values_to_be_between", "caption_token_count") in checked
    assert any("no reference" in note for note in result.notes)  # drift skipped, and said so
    report = json.loads(result.report.read_text())
    assert report["success"] is True and report["failures"] == []
    assert result.report.with_suffix(".html").read_text().count("FAIL") == 0


def test_label_outside_the_set_is_refused_with_rows_quarantined(gate):
    df = annotation_frame()
    df.loc[[4, 9, 50], "vibe_label"] = "spooky"
    result = gate.check("item_annotations", df)
    assert not result.success
    f = failure(result, "expect_column_values_to_be_in_set", "vibe_label")
    assert f.unexpected_count == 3 and f.observed == pytest.approx(3 / 200)
    assert f.unexpected_values == ("spooky",)
    assert f.expected["value_set"] == list(SPEC.attributes["vibe"].labels)

    report = json.loads(result.report.read_text())
    named = [x for x in report["failures"] if x["expectation"] == f.expectation]
    assert named[0]["column"] == "vibe_label" and named[0]["observed"] == pytest.approx(0.015)
    html = result.report.with_suffix(".html").read_text()
    assert "expect_column_values_to_be_in_set" in html and "spooky" in html

    batch, rows = result.quarantine
    assert len(pd.read_parquet(batch)) == 200
    failing = pd.read_parquet(rows)
    assert sorted(failing["item_id"]) == sorted(df.loc[[4, 9, 50], "item_id"])
    assert all("expect_column_values_to_be_in_set(vibe_label)" in list(x)
               for x in failing["failed_expectations"])


def test_error_share_is_tolerated_up_to_the_threshold(gate):
    assert gate.check("item_annotations", with_errors(annotation_frame(), 6)).success  # 3%

    result = gate.check("item_annotations", with_errors(annotation_frame(), 30))  # 15%
    f = failure(result, "expect_column_values_to_be_null", "error")
    assert f.observed == pytest.approx(0.15) and f.expected["mostly"] == pytest.approx(0.95)
    assert failure(result, "expect_column_values_to_not_be_null", "vibe_label").observed \
        == pytest.approx(0.15)
    failing = pd.read_parquet(result.quarantine[1])
    assert len(failing) == 30 and failing["error"].notna().all()


def test_error_threshold_is_configurable(tmp_path):
    strict = Gate(spec=SPEC, report_dir=tmp_path / "r", quarantine_dir=tmp_path / "q",
                  reference_dir=tmp_path / "ref", thresholds=Thresholds(max_error_share=0.0))
    result = strict.check("item_annotations", with_errors(annotation_frame(), 1))
    assert failure(result, "expect_column_values_to_be_null", "error").unexpected_count == 1


def test_confidence_caption_length_and_ids(gate):
    df = annotation_frame()
    df.loc[0, "audience_confidence"] = 1.5
    df.at[1, "caption_tokens"] = caption_tokens(" ".join(["word"] * 30))  # 30 > 2 x 12
    df.at[2, "caption_tokens"] = []
    df.loc[3, "item_id"] = df.loc[4, "item_id"]
    result = gate.check("item_annotations", df)
    assert failure(result, "expect_column_values_to_be_between", "audience_confidence"
                   ).unexpected_values == (1.5,)
    caption = failure(result, "expect_column_values_to_be_between", "caption_token_count")
    assert sorted(caption.unexpected_values) == [0, 30] and caption.expected["max_value"] == 24
    assert failure(result, "expect_column_values_to_be_unique", "item_id").unexpected_count == 2


def test_drift_against_a_stored_reference(gate):
    reference = gate.write_reference("item_annotations", annotation_frame(seed=0))
    assert reference.exists()

    same_shares = gate.check("item_annotations", annotation_frame(seed=7))
    assert same_shares.success, same_shares.summary()
    kl = [c for c in same_shares.checks
          if c.expectation == "expect_column_kl_divergence_to_be_less_than"]
    assert {c.column for c in kl} == {"vibe_label", "audience_label"}
    assert all(c.observed < 0.01 for c in kl)

    drifted = annotation_frame(seed=7)
    drifted["vibe_label"] = np.where(np.arange(200) % 4 == 0, "romantic", "dark")
    result = gate.check("item_annotations", drifted)
    f = failure(result, "expect_column_kl_divergence_to_be_less_than", "vibe_label")
    assert f.observed > 0.1 and f.expected["threshold"] == 0.1
    assert len(result.quarantine) == 1  # a batch-level failure: the whole batch is kept

    small = gate.check("item_annotations", drifted.head(20))
    assert small.success and any("min_rows_for_drift" in n for n in small.notes)


def test_stale_reference_is_not_used(gate, tmp_path):
    gate.write_reference("item_annotations", annotation_frame())
    ref = json.loads(gate.reference_path("item_annotations").read_text())
    ref["attributes"]["vibe"]["attribute_version"] = "older"
    gate.reference_path("item_annotations").write_text(json.dumps(ref))
    drifted = annotation_frame()
    drifted["vibe_label"] = "dark"
    result = gate.check("item_annotations", drifted)
    assert result.success and any("reference predates" in n for n in result.notes)
    assert [c.column for c in result.checks
            if c.expectation == "expect_column_kl_divergence_to_be_less_than"] == ["audience_label"]


def test_missing_column_is_refused_with_one_line(gate):
    table = annotation_frame().drop(columns=["audience_confidence"])
    result = gate.check("item_annotations", table)
    f = failure(result, "expect_table_columns_to_include", None)
    assert f.observed == {"missing": ["audience_confidence"]}
    assert "the table lacks ['audience_confidence'], which the spec declares" in result.summary()
    assert result.quarantine  # the refused batch is kept, as for any refusal


def test_empty_table_is_refused(gate):
    result = gate.check("item_annotations", annotation_frame().head(0))
    assert not result.success
    assert failure(result, "expect_table_row_count_to_be_between", None).observed == 0
    assert "no rows" in result.summary()
    assert not gate.check("item_stats", item_stats_frame().head(0)).success


def test_a_string_keyed_table_is_checked_by_its_own_key(tmp_path):
    gate = Gate(spec=SPEC, report_dir=tmp_path / "r", quarantine_dir=tmp_path / "q",
                reference_dir=tmp_path / "ref", key="sku")
    df = annotation_frame().rename(columns={"item_id": "sku"})
    df["sku"] = [f"BK-{i:06d}" for i in range(len(df))]
    assert gate.check("item_annotations", df).success
    df.loc[5, "sku"] = df.loc[6, "sku"]
    assert failure(gate.check("item_annotations", df), "expect_column_values_to_be_unique",
                   "sku").unexpected_count == 2


def test_user_suites_apply_to_stats_views(gate):
    assert gate.check("item_stats", item_stats_frame()).success
    assert gate.check("user_stats", user_stats_frame()).success
    bad = item_stats_frame()
    bad.loc[0, "item_n_ratings"] = -3
    bad.loc[1, "item_mean_rating"] = 7.0
    result = gate.check("item_stats", bad)
    assert failure(result, "expect_column_values_to_be_between", "item_n_ratings"
                   ).unexpected_values == (-3,)
    assert failure(result, "expect_column_values_to_be_between", "item_mean_rating"
                   ).unexpected_values == (7.0,)


def test_validate_frame_runs_any_suites_on_any_frame():
    suites = user_suites(None, "item_stats")
    result = validate_frame(item_stats_frame(), suites, view="stats")
    assert result.success and len(result.checks) == len(suites[0].expectations)
    empty = validate_frame(item_stats_frame().head(0), suites, view="stats")
    assert empty.success and empty.checks == [] and "no rows to check" in empty.notes
