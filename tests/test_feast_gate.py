"""`feast materialize` through the gated engine, with the real Feast CLI and SQLite store.

A temp copy of feature_repo (with the shipped feature_store.yaml unchanged) and specs/ gets
small synthetic tables. A good version is materialized first, so the online store is not
empty; then bad versions must be refused: non-zero exit, the SQLite file byte-for-byte
unchanged, a report naming the failing expectation and its observed value, quarantine files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feast import FeatureStore

from spark_jobs.validate import main as validate_main
from tests.test_gate import (ROOT, SPEC, annotation_frame, item_stats_frame,
                             user_stats_frame, with_errors, write_annotations, write_parquet)
from udfs.schema import AnnotationSchema

FEAST = Path(sys.executable).with_name("feast")
WINDOW = ["2023-06-01T00:00:00", "2024-06-01T00:00:00"]  # the synthetic rows are from 2024-01-01


def feast(repo: Path, *args: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: the engine plugin is imported from this checkout, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([str(FEAST), "-c", str(repo), *args], env=env, capture_output=True,
                          text=True, timeout=600)


def make_repo(base: Path) -> Path:
    """feature_repo/ and specs/ side by side, as in the project, minus any data."""
    repo = base / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo,
                    ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copytree(ROOT / "specs", base / "specs")
    return repo


def write_tables(repo: Path, annotations: pd.DataFrame, item_stats: pd.DataFrame | None = None,
                 user_stats: pd.DataFrame | None = None) -> None:
    data = repo / "data"
    write_annotations(annotations, data / "item_annotations")
    write_parquet(item_stats if item_stats is not None else item_stats_frame(), data / "item_stats")
    write_parquet(user_stats if user_stats is not None else user_stats_frame(), data / "user_stats")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def online(repo: Path, item_ids: list[int], features: list[str]) -> dict:
    store = FeatureStore(repo_path=str(repo))
    return store.get_online_features(features=features,
                                     entity_rows=[{"item_id": i} for i in item_ids]).to_dict()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """Applied, with a drift reference, and a good version materialized."""
    repo = make_repo(tmp_path_factory.mktemp("feast_gate"))
    good = annotation_frame(seed=0)
    write_tables(repo, good)
    applied = feast(repo, "apply")
    assert applied.returncode == 0, applied.stderr
    assert validate_main([
        "--spec", str(repo.parent / "specs" / "movielens.yaml"),
        "--table", str(repo / "data" / "item_annotations"), "--write-reference",
        "--report-dir", str(repo / "data" / "gate" / "reports"),
        "--reference-dir", str(repo / "data" / "gate" / "reference")]) == 0
    # as `make demo` runs it: the CLI's --log-level holds for the gate and every library,
    # although feast/cli/serve.py sets the root logger to INFO when the CLI imports it
    done = feast(repo, "--log-level", "WARNING", "materialize", *WINDOW)
    assert done.returncode == 0, done.stderr
    # nothing a user cannot act on: ibis' DuckDB deprecation, GE's per-check INFO line, the
    # gate's per-view timings (INFO, shown with --log-level INFO)
    assert "fetch_arrow_table" not in done.stderr and "Traceback" not in done.stderr
    assert "Created temporary directory" not in done.stderr
    output = (done.stdout + done.stderr).splitlines()
    assert not [line for line in output if "INFO" in line or "DeprecationWarning" in line
                or "Warning:" in line], done.stderr
    # ... but Feast's progress and the gate's verdicts, one line per view
    assert "Materializing" in done.stdout and "feature views from" in done.stdout
    for view in ("item_annotations", "item_stats", "user_stats"):
        assert any(line.startswith(f"gate: {view}: PASSED (") for line in output), done.stdout
    return repo, good


def test_passing_tables_are_materialized_and_served(repo):
    repo, good = repo
    ids = [1, 2, 77, 200]
    served = online(repo, ids, ["item_annotations:vibe_label", "item_annotations:audience_label",
                                "item_annotations:caption_tokens", "item_stats:item_n_ratings"])
    expected = good.set_index("item_id").loc[ids]
    assert served["vibe_label"] == expected["vibe_label"].tolist()
    assert served["audience_label"] == expected["audience_label"].tolist()
    assert [list(t) for t in served["caption_tokens"]] == expected["caption_tokens"].tolist()
    assert served["item_n_ratings"] == item_stats_frame().set_index("item_id").loc[
        ids, "item_n_ratings"].tolist()
    report = json.loads((repo / "data" / "gate" / "reports" / "item_annotations.json").read_text())
    assert report["success"] is True and report["rows"] == 200
    kl = [c for c in report["checks"]
          if c["expectation"] == "expect_column_kl_divergence_to_be_less_than"]
    assert len(kl) == 2  # the drift check ran against the reference


def drifted_frame() -> pd.DataFrame:
    df = annotation_frame(seed=3, event=pd.Timestamp("2024-09-01", tz="UTC"))
    df["vibe_label"] = np.where(np.arange(len(df)) % 5 == 0, "thoughtful", "thrilling")
    return df


def out_of_set_frame() -> pd.DataFrame:
    df = annotation_frame(seed=1)
    df.loc[[10, 20], "vibe_label"] = "spooky"
    return df


BAD_BATCHES = {
    # case: (view that fails, expectation, column, command, tables)
    "label outside the set": (
        "item_annotations", "expect_column_values_to_be_in_set", "vibe_label",
        ["materialize", *WINDOW], lambda: (out_of_set_frame(), None)),
    "too many error rows": (
        "item_annotations", "expect_column_values_to_be_null", "error",
        ["materialize", *WINDOW], lambda: (with_errors(annotation_frame(seed=2), 30), None)),
    "drifted labels, incremental": (
        "item_annotations", "expect_column_kl_divergence_to_be_less_than", "vibe_label",
        ["materialize-incremental", "2025-01-01T00:00:00"], lambda: (drifted_frame(), None)),
    # the annotations are fine but another view is not: nothing at all may be written
    "one bad view blocks all": (
        "item_stats", "expect_column_values_to_be_between", "item_n_ratings",
        ["materialize", *WINDOW],
        lambda: (annotation_frame(seed=4), item_stats_frame().assign(item_n_ratings=-1))),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_failing_batch_is_refused_and_the_online_store_untouched(repo, case):
    repo, good = repo
    view, expectation, column, command, tables = BAD_BATCHES[case]
    annotations, item_stats = tables()
    write_tables(repo, annotations, item_stats)
    db = repo / "data" / "online_store.db"
    before = sha256(db)

    proc = feast(repo, *command)

    assert proc.returncode != 0
    assert sha256(db) == before
    assert "refused" in proc.stderr and view in proc.stderr and expectation in proc.stderr
    assert "Traceback" not in proc.stderr  # a readable error, not a stack dump
    report_path = repo / "data" / "gate" / "reports" / f"{view}.json"
    assert str(report_path) in proc.stderr
    report = json.loads(report_path.read_text())
    [failed] = [f for f in report["failures"]
                if f["expectation"] == expectation and f["column"] == column]
    assert failed["observed"] is not None and failed["observed"] > 0
    runs = sorted((repo / "data" / "gate" / "quarantine" / view).iterdir())
    assert (runs[-1] / "batch.parquet").exists()
    # the served features are still the good version's
    served = online(repo, [1, 2, 3], ["item_annotations:vibe_label"])
    assert served["vibe_label"] == good.set_index("item_id").loc[[1, 2, 3], "vibe_label"].tolist()


def test_missing_table_is_one_clear_error(tmp_path):
    """A repo whose view points at a table no job has written: exit 1, one message."""
    repo = make_repo(tmp_path)
    write_tables(repo, annotation_frame(seed=0))
    assert feast(repo, "apply").returncode == 0
    shutil.rmtree(repo / "data" / "item_stats")
    proc = feast(repo, "materialize", *WINDOW)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert (f"feature view 'item_stats': cannot read its source "
            f"'{repo / 'data' / 'item_stats'}/*.parquet'") in proc.stderr
    store = FeatureStore(repo_path=str(repo))
    served = store.get_online_features(features=["item_annotations:vibe_label"],
                                       entity_rows=[{"item_id": 1}]).to_dict()
    assert served["vibe_label"] == [None]  # nothing was written


def test_missing_column_and_empty_table_are_refused_with_one_line_each(repo):
    """Before Feast reads them: a table lacking a declared column (DuckDB would fail with an
    ibis traceback) and an empty one; both views are named in one refusal, exit 1."""
    repo, good = repo
    write_tables(repo, good, user_stats=user_stats_frame().head(0))
    directory = repo / "data" / "item_annotations" / AnnotationSchema(SPEC).fingerprint
    [run] = directory.glob("run-*.parquet")
    pd.read_parquet(run).drop(columns=["audience_confidence"]).to_parquet(run, index=False)
    db = repo / "data" / "online_store.db"
    before = sha256(db)

    proc = feast(repo, "materialize", *WINDOW)

    assert proc.returncode == 1 and sha256(db) == before
    assert "Traceback" not in proc.stderr and "Binder Error" not in proc.stderr
    assert ("  FAIL expect_table_columns_to_include: the table lacks ['audience_confidence'], "
            "which the spec declares; was it written with this spec?\n") in proc.stderr
    assert ("  FAIL expect_table_row_count_to_be_between: the table has no rows: nothing to "
            "validate or materialize\n") in proc.stderr
    for view in ("item_annotations", "user_stats"):
        report = json.loads((repo / "data" / "gate" / "reports" / f"{view}.json").read_text())
        assert report["success"] is False and len(report["failures"]) == 1


def test_empty_window_passes_and_a_spec_change_needs_apply(repo):
    """In-process, same engine: nothing new since the last run is no failure; a gate whose
    spec differs from the one the view was applied with refuses before reading anything."""
    from datetime import datetime, timezone

    from expectations.feast_engine import SpecMismatch

    repo, good = repo
    write_tables(repo, good)
    store = FeatureStore(repo_path=str(repo))
    window = [datetime(2024, 6, 2, tzinfo=timezone.utc), datetime(2024, 6, 3, tzinfo=timezone.utc)]
    store.materialize(*window)  # the tables' rows are all from 2024-01-01
    report = json.loads((repo / "data" / "gate" / "reports" / "item_annotations.json").read_text())
    assert report["success"] and report["rows"] == 0
    assert any("no rows in the window" in n for n in report["notes"])

    spec = repo.parent / "specs" / "movielens.yaml"
    original = spec.read_text()
    spec.write_text(original.replace("grim, violent", "grim, violent, gory", 1))
    try:
        from udfs.spec import load_spec
        applied = store.get_feature_view("item_annotations").tags["spec_version"]
        assert load_spec(spec).version != applied
        with pytest.raises(SpecMismatch, match="run `feast apply` after changing the spec"):
            store.materialize(*window)
    finally:
        spec.write_text(original)


def test_the_feast_cli_log_level_holds_for_every_logger():
    """What the fixture's CLI run relies on, in process: inside the feast CLI the root logger
    gets the CLI's --log-level (feast/cli/serve.py left it at INFO) and basicConfig's handler
    Feast's format; outside the CLI the caller's logging is not touched."""
    import logging

    import click
    from feast.cli.cli import cli

    from expectations.feast_engine import FEAST_LOG_FORMAT, follow_feast_log_level

    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    handler = logging.StreamHandler()  # as logging.basicConfig(level=INFO) adds it
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        assert follow_feast_log_level() is None and root.level == logging.INFO
        for given, level in (("warning", logging.WARNING), ("INFO", logging.INFO)):
            with click.Context(cli, info_name="feast") as ctx:
                ctx.params["log_level"] = given
                assert follow_feast_log_level() == level
            assert root.level == level
            assert handler.formatter._fmt == FEAST_LOG_FORMAT
        with click.Context(click.Command("other"), info_name="other"):
            root.setLevel(logging.DEBUG)
            assert follow_feast_log_level() is None and root.level == logging.DEBUG
    finally:
        root.removeHandler(handler)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
