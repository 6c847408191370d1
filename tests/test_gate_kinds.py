"""The gate for multi-label and ordinal attributes (specs/movielens_kinds.yaml), on real Great
Expectations: the suite derived from the spec, the list columns' checks through derived
columns, per-label share drift, and the same verdicts from the Spark checks.

Also home of the synthetic kinds table the Feast tests of the kinds spec write.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from expectations.gate import Gate
from expectations.reference import label_distribution
from expectations.suites import spec_suite, with_derived_columns
from expectations.thresholds import Thresholds
from tests.redis_server import redis_server  # noqa: F401  (the session fixture)
from tests.test_gate import CAPTIONS, EVENT, ROOT, failure
from udfs import schema as S
from udfs.schema import AnnotationSchema
from udfs.spec import load_spec
from udfs.tokens import caption_tokens

KINDS = load_spec(ROOT / "specs" / "movielens_kinds.yaml")
GENRES = list(KINDS.attributes["genres"].labels)
# label sets of one to three genres; every row cycles through them, so shares do not depend
# on the seed (Action 3/8, Comedy 3/8, Drama 4/8, Romance 3/8, Thriller 2/8)
SETS = [["Action"], ["Comedy", "Romance"], ["Drama"], ["Action", "Drama", "Thriller"],
        ["Comedy"], ["Drama", "Romance"], ["Action", "Thriller"], ["Comedy", "Drama", "Romance"]]


def kinds_frame(n: int = 200, seed: int = 0, created: pd.Timestamp | None = None,
                event: pd.Timestamp = EVENT) -> pd.DataFrame:
    """A clean item_annotations table for the kinds spec (one attribute of each kind)."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "item_id": np.arange(1, n + 1, dtype="int64"),
        "event_timestamp": event,
        "created_timestamp": created or pd.Timestamp.now(tz="UTC").floor("us"),
    })
    vibe = KINDS.attributes["vibe"]
    df["vibe_label"] = rng.permutation(np.resize(np.array(vibe.labels), n))
    df["vibe_confidence"] = rng.uniform(0.3, 1.0, n)
    df["vibe_version"] = vibe.version
    chosen = [SETS[i % len(SETS)] for i in rng.permutation(n)]
    df["genres_labels"] = chosen
    df["genres_scores"] = [[round(float(rng.uniform(0.5, 1.0)) if g in c
                                  else float(rng.uniform(0.0, 0.49)), 4) for g in GENRES]
                           for c in chosen]
    df["genres_version"] = KINDS.attributes["genres"].version
    intensity = KINDS.attributes["intensity"]
    df["intensity_label"] = rng.permutation(np.resize(np.array(intensity.labels), n))
    df["intensity_confidence"] = rng.uniform(0.3, 1.0, n)
    df["intensity_value"] = [min(5.0, max(1.0, float(x) + rng.uniform(-0.4, 0.4)))
                             for x in df["intensity_label"]]
    df["intensity_version"] = intensity.version
    df["caption"] = [CAPTIONS[i % len(CAPTIONS)] for i in rng.permutation(n)]
    df["caption_tokens"] = df["caption"].map(caption_tokens)
    df["caption_version"] = KINDS.caption.version
    df["model"] = "sentence-transformers/all-MiniLM-L6-v2"
    df["labelled_by"] = "head"
    df["spec_version"] = KINDS.version
    df["content_hash"] = [f"h{i}" for i in df["item_id"]]
    df["error"] = None
    return df


def bad_multi_frame() -> pd.DataFrame:
    """Every way a multi-label row can break the spec, one or a few rows each."""
    df = kinds_frame(seed=5)
    df.at[3, "genres_labels"] = ["Drama", "Horror"]                   # outside the set
    df.at[8, "genres_labels"] = ["Action", "Comedy", "Drama", "Romance"]  # max_labels 3
    df.at[9, "genres_labels"] = []                                    # min_labels 1
    df.at[12, "genres_scores"] = [0.9, 1.3, 0.1, 0.2, 0.0]            # a score > 1
    df.at[13, "genres_scores"] = [0.9, 0.1, 0.2]                      # not one per label
    df.at[14, "genres_scores"] = [0.9, float("nan"), 0.1, 0.2, 0.3]   # not a number
    df.at[15, "genres_labels"] = ["Comedy", None]                     # a null entry
    df.at[16, "genres_labels"] = ["Drama", "Drama"]                   # a label twice
    df.at[17, "genres_labels"] = ["Romance", "Action"]                # not in spec order
    df.loc[20, "intensity_value"] = 7.5                               # outside 1..5
    df.loc[21, "intensity_label"] = "6"
    return df


@pytest.fixture
def gate(tmp_path) -> Gate:
    return Gate(spec=KINDS, report_dir=tmp_path / "reports",
                quarantine_dir=tmp_path / "quarantine", reference_dir=tmp_path / "reference")


def test_the_suite_follows_each_kind():
    suite, _ = spec_suite(KINDS, Thresholds(), None, 200)
    got = {(e.expectation_type, e.configuration.kwargs.get("column")): e.configuration.kwargs
           for e in suite.expectations}
    assert got[("expect_column_values_to_be_in_set", "genres_each_label")]["value_set"] == GENRES
    sizes = got[("expect_column_values_to_be_between", "genres_label_count")]
    assert (sizes["min_value"], sizes["max_value"]) == (1, 3)  # min_labels, max_labels
    counts = got[("expect_column_values_to_be_between", "genres_score_count")]
    assert (counts["min_value"], counts["max_value"]) == (5, 5)
    scores = got[("expect_column_values_to_be_between", "genres_each_score")]
    assert (scores["min_value"], scores["max_value"]) == (0.0, 1.0)
    assert got[("expect_column_values_to_not_be_null", "genres_labels")]["mostly"] == 0.95
    assert ("expect_column_values_to_not_be_null", "genres_scores") in got
    # no single-label checks on a multi-label attribute's (absent) label column
    assert ("expect_column_values_to_be_in_set", "genres_label") not in got
    value = got[("expect_column_values_to_be_between", "intensity_value")]
    assert (value["min_value"], value["max_value"]) == (1.0, 5.0)
    assert got[("expect_column_values_to_be_in_set", "intensity_label")]["value_set"] == [
        "1", "2", "3", "4", "5"]
    assert ("expect_column_values_to_be_between", "intensity_confidence") in got
    assert ("expect_column_values_to_be_in_set", "vibe_label") in got


def test_derived_columns_of_a_multi_label_attribute():
    df = pd.DataFrame({
        "genres_labels": [["Drama"], ["Drama", "Horror"], [], None, ["Comedy", None],
                          ["Action", "Drama", "Drama"], ["Drama", "Comedy"],
                          ["Comedy", "Drama", "Romance"]],
        "genres_scores": [[0.1, 0.2, 0.9, 0.1, 0.0], [0.1, 1.3, -0.2, 0.1, 0.0], [],
                          None, [float("nan"), 0.7, 0.1, 0.1, 0.1]] + [[0.5] * 5] * 3,
    })
    d = with_derived_columns(df, KINDS)
    assert d["genres_label_count"].tolist() == [1, 2, 0, pd.NA, 2, 3, 2, 3]
    assert d["genres_each_label"].tolist() == [
        "Drama", "Horror", None, None, "", "Drama (repeated)", "Comedy (out of spec order)",
        "Comedy"]
    assert d["genres_score_count"].tolist() == [5, 5, 0, pd.NA, 4, 5, 5, 5]
    each = d["genres_each_score"].tolist()
    assert each[:2] == [0.1, 1.3] and np.isnan(each[2]) and np.isnan(each[3])
    assert each[4] == 0.7
    drama = d["genres_has_Drama"].tolist()
    assert drama[:3] == [1.0, 1.0, 0.0] and np.isnan(drama[3]) and drama[4:] == [0.0, 1.0, 1.0, 1.0]
    assert "genres_label_count" not in with_derived_columns(df)  # no spec, no multi columns


def test_a_clean_kinds_table_passes(gate):
    result = gate.check("item_annotations", kinds_frame())
    assert result.success, result.summary()
    checked = {(c.expectation, c.column) for c in result.checks}
    assert ("expect_column_values_to_be_in_set", "genres_each_label") in checked
    assert ("expect_column_values_to_be_between", "intensity_value") in checked


def test_a_failing_multi_label_table_is_refused_saying_why(gate):
    df = bad_multi_frame()
    result = gate.check("item_annotations", df)
    assert not result.success
    summary = result.summary()
    outside = failure(result, "expect_column_values_to_be_in_set", "genres_each_label")
    assert outside.unexpected_count == 4 and set(outside.unexpected_values) == {
        "Horror", "", "Drama (repeated)", "Action (out of spec order)"}
    too_many = failure(result, "expect_column_values_to_be_between", "genres_label_count")
    assert too_many.unexpected_count == 2 and set(too_many.unexpected_values) == {4, 0}
    over = failure(result, "expect_column_values_to_be_between", "genres_each_score")
    assert over.unexpected_count == 1 and over.unexpected_values == (1.3,)
    count = failure(result, "expect_column_values_to_be_between", "genres_score_count")
    assert count.unexpected_count == 2 and set(count.unexpected_values) == {3, 4}
    value = failure(result, "expect_column_values_to_be_between", "intensity_value")
    assert value.unexpected_values == (7.5,)
    label = failure(result, "expect_column_values_to_be_in_set", "intensity_label")
    assert label.unexpected_values == ("6",)
    for line in ("FAIL expect_column_values_to_be_in_set(genres_each_label): 4 rows",
                 "FAIL expect_column_values_to_be_between(genres_label_count): 2 rows",
                 "'min_value': 1.0, 'max_value': 3.0",
                 "FAIL expect_column_values_to_be_between(genres_each_score): 1 rows",
                 "(e.g. [1.3])", "'Horror'"):
        assert line in summary, summary
    # the quarantined rows are the table's own (no derived column), flagged by expectation
    batch, rows = result.quarantine
    failing = pd.read_parquet(rows)
    assert sorted(failing["item_id"]) == sorted(df.loc[[3, 8, 9, 12, 13, 14, 15, 16, 17, 20, 21],
                                                       "item_id"])
    assert "genres_each_label" not in failing.columns
    assert list(pd.read_parquet(batch).columns) == list(df.columns)


def test_multi_label_share_drift_against_the_reference(gate):
    reference = gate.write_reference("item_annotations", kinds_frame(seed=0))
    stored = json.loads(reference.read_text())["attributes"]
    assert stored["genres"]["values"] == GENRES
    assert stored["genres"]["shares"] == pytest.approx([3 / 8, 3 / 8, 4 / 8, 3 / 8, 2 / 8])
    assert "weights" in stored["intensity"] and "weights" in stored["vibe"]

    same = gate.check("item_annotations", kinds_frame(seed=9))
    assert same.success, same.summary()
    shares = [c for c in same.checks if c.expectation == "expect_column_mean_to_be_between"]
    assert {c.column for c in shares} == {f"genres_has_{g}" for g in GENRES}
    kl = {c.column for c in same.checks
          if c.expectation == "expect_column_kl_divergence_to_be_less_than"}
    assert kl == {"vibe_label", "intensity_label"}  # ordinal drifts like single

    drifted = kinds_frame(seed=9)
    drifted["genres_labels"] = [["Drama", "Thriller"] if i % 2 else list(v)
                                for i, v in enumerate(drifted["genres_labels"])]
    result = gate.check("item_annotations", drifted)
    assert not result.success
    thriller = failure(result, "expect_column_mean_to_be_between", "genres_has_Thriller")
    assert thriller.observed > 0.35
    assert thriller.expected == {"min_value": 0.15, "max_value": 0.35}
    assert "FAIL expect_column_mean_to_be_between(genres_has_Thriller): observed" \
        in result.summary()
    # scores no longer agree with these labels, but only the shares are checked for drift
    assert not [c for c in result.failures if c.column == "genres_each_label"]


def test_share_shift_threshold_is_configurable(tmp_path):
    loose = Gate(spec=KINDS, report_dir=tmp_path / "r", quarantine_dir=tmp_path / "q",
                 reference_dir=tmp_path / "ref",
                 thresholds=Thresholds(max_label_share_shift=0.5))
    loose.write_reference("item_annotations", kinds_frame(seed=0))
    drifted = kinds_frame(seed=9)
    drifted["genres_labels"] = [["Drama", "Thriller"] if i % 2 else list(v)
                                for i, v in enumerate(drifted["genres_labels"])]
    assert loose.check("item_annotations", drifted).success
    with pytest.raises(ValueError):
        Thresholds(max_label_share_shift=1.5)


def test_a_stale_multi_label_reference_is_not_used(gate):
    path = gate.write_reference("item_annotations", kinds_frame(seed=0))
    data = json.loads(path.read_text())
    data["attributes"]["genres"]["attribute_version"] = "old"
    path.write_text(json.dumps(data))
    result = gate.check("item_annotations", kinds_frame(seed=3))
    assert result.success
    assert any("'genres' not checked" in n for n in result.notes)
    assert not [c for c in result.checks if c.expectation == "expect_column_mean_to_be_between"]


def test_label_distribution_of_each_kind():
    df = kinds_frame(n=8)
    df.at[0, "genres_labels"] = None  # an error row: not among the labelled items
    dist = label_distribution(df, KINDS)
    assert dist["genres"]["items"] == 7 and dist["genres"]["kind"] == "multi"
    assert len(dist["intensity"]["weights"]) == 5
    assert AnnotationSchema(KINDS).names.count(S.labels("genres")) == 1


# --- Feast: apply, materialize and serve the kinds' columns (real CLI, SQLite and Redis) ------

def kinds_user_stats(n: int = 60) -> pd.DataFrame:
    """user_stats for the kinds spec: its per-label share columns in [0, 1]."""
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"user_id": np.arange(1, n + 1, dtype="int64"), "event_timestamp": EVENT,
                       "user_n_ratings": rng.integers(1, 500, n).astype("int64"),
                       "user_mean_rating": rng.uniform(0.5, 5.0, n)})
    for column in S.share_columns(KINDS):
        df[column] = rng.uniform(0.0, 1.0, n)
    return df


def write_kinds_tables(repo, annotations: pd.DataFrame) -> None:
    import shutil

    from tests.test_gate import item_stats_frame, write_parquet
    from udfs.table import FeatureTable

    data = repo / "data"
    shutil.rmtree(data / "item_annotations", ignore_errors=True)
    FeatureTable(str(data / "item_annotations")).write_frame(annotations, AnnotationSchema(KINDS))
    write_parquet(item_stats_frame(), data / "item_stats")
    write_parquet(kinds_user_stats(), data / "user_stats")


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def kinds_repo(request, tmp_path_factory):
    """The shipped feature repo with the kinds spec in place of the demo's (definitions.py
    and the gate read ../specs/movielens.yaml): applied, a reference, a good version
    materialized."""
    import yaml

    from spark_jobs.validate import main as validate
    from tests.test_feast_gate import WINDOW, feast, make_repo

    repo = make_repo(tmp_path_factory.mktemp(f"kinds_{request.param}"))
    (repo.parent / "specs" / "movielens.yaml").write_text(
        (ROOT / "specs" / "movielens_kinds.yaml").read_text())
    client = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        config = yaml.safe_load((repo / "feature_store.yaml").read_text())
        config["online_store"] = {"type": "redis",
                                  "connection_string": server.connection_string}
        (repo / "feature_store.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        client = server.client()
        client.flushall()
    good = kinds_frame(seed=0)
    write_kinds_tables(repo, good)
    applied = feast(repo, "apply")
    assert applied.returncode == 0, applied.stderr
    table = str(repo / "data" / "item_annotations")
    assert validate(["--repo", str(repo), "--table", table, "--write-reference"]) == 0
    done = feast(repo, "materialize", *WINDOW)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gate: item_annotations: PASSED (" in done.stdout
    return repo, good, client


def served(repo, ids: list[int]) -> dict:
    from tests.test_feast_gate import online
    return online(repo, ids, [f"item_annotations:{c}" for c in (
        "vibe_label", "genres_labels", "genres_scores", "intensity_label", "intensity_value")])


def test_kinds_columns_are_materialized_and_served(kinds_repo):
    from feast import FeatureStore
    from feast.types import Array, Float64, String

    repo, good, _ = kinds_repo
    view = FeatureStore(repo_path=str(repo)).get_feature_view("item_annotations")
    fields = {f.name: f.dtype for f in view.features}
    assert fields["genres_labels"] == Array(String) and fields["genres_scores"] == Array(Float64)
    assert fields["intensity_value"] == Float64 and "genres_label" not in fields
    ids = [1, 2, 77, 200]
    got = served(repo, ids)
    expected = good.set_index("item_id").loc[ids]
    assert [list(v) for v in got["genres_labels"]] == [list(v) for v in expected["genres_labels"]]
    for row, want in zip(got["genres_scores"], expected["genres_scores"]):
        assert list(row) == pytest.approx(list(want))
    assert got["intensity_value"] == pytest.approx(expected["intensity_value"].tolist())
    assert got["intensity_label"] == expected["intensity_label"].tolist()
    assert got["vibe_label"] == expected["vibe_label"].tolist()
    report = json.loads((repo / "data" / "gate" / "reports" / "item_annotations.json")
                        .read_text())
    drift = {c["column"] for c in report["checks"]
             if c["expectation"] == "expect_column_mean_to_be_between"}
    assert drift == {f"genres_has_{g}" for g in GENRES}  # the share drift ran in materialize


def test_a_failing_multi_label_table_is_refused_by_materialize_and_validate(kinds_repo):
    import hashlib

    from spark_jobs.validate import main as validate
    from tests.test_feast_gate import WINDOW, feast

    repo, good, client = kinds_repo
    db = repo / "data" / "online_store.db"

    def state():
        if client is not None:
            return {k: client.dump(k) for k in client.scan_iter(count=1000)}
        return hashlib.sha256(db.read_bytes()).hexdigest()

    before = state()
    write_kinds_tables(repo, bad_multi_frame())
    proc = feast(repo, "materialize", *WINDOW)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    for line in ("FAIL expect_column_values_to_be_in_set(genres_each_label): 4 rows",
                 "'Horror'",
                 "FAIL expect_column_values_to_be_between(genres_each_score): 1 rows",
                 "(e.g. [1.3])",
                 "FAIL expect_column_values_to_be_between(genres_label_count): 2 rows"):
        assert line in proc.stderr, proc.stderr[-3000:]
    assert state() == before
    ids = [1, 2, 3]
    assert [list(v) for v in served(repo, ids)["genres_labels"]] == [
        list(v) for v in good.set_index("item_id").loc[ids, "genres_labels"]]
    table = str(repo / "data" / "item_annotations")
    assert validate(["--repo", str(repo), "--table", table]) == 1
    assert validate(["--repo", str(repo)]) == 1  # through the offline store too
    write_kinds_tables(repo, good)  # the module's other test sees the good table again
