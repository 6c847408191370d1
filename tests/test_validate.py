"""The validate CLI: exit 0 when the table passes, 1 when it fails, 2 on usage/config errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spark_jobs.validate import main
from tests.test_gate import (ROOT, annotation_frame, item_stats_frame, with_errors,
                             write_annotations, write_parquet)

SPEC = str(ROOT / "specs" / "movielens.yaml")


@pytest.fixture
def dirs(tmp_path) -> list[str]:
    return ["--report-dir", str(tmp_path / "reports"), "--quarantine-dir",
            str(tmp_path / "quarantine"), "--reference-dir", str(tmp_path / "reference")]


def test_passing_table_exits_0(tmp_path, dirs, capsys):
    table = write_annotations(annotation_frame(), tmp_path / "item_annotations")
    assert main(["--spec", SPEC, "--table", str(table), *dirs]) == 0
    out = capsys.readouterr().out
    assert "item_annotations: PASSED" in out and str(tmp_path / "reports") in out


def test_failing_table_exits_1_with_a_summary(tmp_path, dirs, capsys):
    table = write_annotations(with_errors(annotation_frame(), 40), tmp_path / "t")
    assert main(["--spec", SPEC, "--table", str(table), *dirs]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "expect_column_values_to_be_null(error): 40 rows (20.0%)" in out
    report = json.loads((tmp_path / "reports" / "item_annotations.json").read_text())
    assert report["success"] is False
    assert list((tmp_path / "quarantine" / "item_annotations").glob("*/failing_rows.parquet"))
    # the same table passes under a looser, configured threshold
    assert main(["--spec", SPEC, "--table", str(table), "--max-error-share", "0.25", *dirs]) == 0


def test_reference_then_drift(tmp_path, dirs, capsys):
    good = write_annotations(annotation_frame(seed=1), tmp_path / "good")
    assert main(["--spec", SPEC, "--table", str(good), "--write-reference", *dirs]) == 0
    assert (tmp_path / "reference" / "item_annotations.json").exists()
    assert main(["--spec", SPEC, "--table", str(good), *dirs]) == 0

    drifted = annotation_frame(seed=2)
    drifted["audience_label"] = "kids"
    table = write_annotations(drifted, tmp_path / "drifted")
    capsys.readouterr()
    assert main(["--spec", SPEC, "--table", str(table), *dirs]) == 1
    assert "expect_column_kl_divergence_to_be_less_than(audience_label)" in capsys.readouterr().out


def test_failing_table_does_not_become_the_reference(tmp_path, dirs, capsys):
    bad = annotation_frame()
    bad.loc[0, "vibe_label"] = "spooky"
    table = write_annotations(bad, tmp_path / "bad")
    assert main(["--spec", SPEC, "--table", str(table), "--write-reference", *dirs]) == 1
    assert "reference not written" in capsys.readouterr().out
    assert not (tmp_path / "reference" / "item_annotations.json").exists()


def test_user_suite_view(tmp_path, dirs):
    stats = item_stats_frame()
    stats.loc[3, "item_mean_rating"] = 9.0
    table = write_parquet(stats, tmp_path / "item_stats")
    assert main(["--spec", SPEC, "--table", str(table), "--view", "item_stats", *dirs]) == 1
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "item_stats.json").write_text(json.dumps({"name": "loose", "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "item_id"}}]}))
    assert main(["--spec", SPEC, "--table", str(table), "--view", "item_stats",
                 "--suites-dir", str(suites), *dirs]) == 0


@pytest.mark.parametrize("args, message", [
    (["--table", "{tmp}/missing"], "table not found"),
    (["--table", "{table}", "--max-error-share", "2"], "max_error_share"),
    (["--table", "{table}", "--suites-dir", "{tmp}/suites", "--view", "item_stats"],
     "not a valid Great Expectations suite"),
    (["--table", "{tmp}/not_parquet.txt"], "cannot read"),
    (["--table", "{table}", "--view", "item_stats", "--write-reference"], "--write-reference"),
])
def test_configuration_errors_exit_2(tmp_path, dirs, capsys, args, message):
    table = write_annotations(annotation_frame(), tmp_path / "t")
    (tmp_path / "not_parquet.txt").write_text("hello")
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "item_stats.json").write_text("{broken")
    args = [a.format(tmp=tmp_path, table=table) for a in args]
    assert main(["--spec", SPEC, *args, *dirs]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 6  # one clear message, no traceback


def test_bad_spec_and_usage_exit_2(tmp_path, dirs, capsys):
    table = write_annotations(annotation_frame(), tmp_path / "t")
    assert main(["--spec", str(tmp_path / "nope.yaml"), "--table", str(table), *dirs]) == 2
    assert "spec file not found" in capsys.readouterr().err
    assert main(["--spec", SPEC]) == 2  # --table missing
    assert "--table" in capsys.readouterr().err


def test_module_entry_point_exit_status(tmp_path):
    bad = annotation_frame()
    bad.loc[0, "vibe_confidence"] = -0.5
    table = write_annotations(bad, tmp_path / "t")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "spark_jobs.validate", "--spec", SPEC, "--table", str(table),
         "--report-dir", str(tmp_path / "r"), "--quarantine-dir", str(tmp_path / "q"),
         "--reference-dir", str(tmp_path / "ref")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "expect_column_values_to_be_between(vibe_confidence)" in proc.stdout


def test_multi_label_table_failures_and_share_drift_through_the_cli(tmp_path, dirs, capsys):
    from tests.test_gate_kinds import KINDS, bad_multi_frame, kinds_frame
    from udfs.schema import AnnotationSchema
    from udfs.table import FeatureTable

    kinds = str(ROOT / "specs" / "movielens_kinds.yaml")

    def write(df, name):
        FeatureTable(str(tmp_path / name)).write_frame(df, AnnotationSchema(KINDS))
        return str(tmp_path / name)

    assert main(["--spec", kinds, "--table", write(kinds_frame(seed=0), "good"),
                 "--write-reference", *dirs]) == 0
    assert "reference written" in capsys.readouterr().out
    assert main(["--spec", kinds, "--table", write(bad_multi_frame(), "bad"), *dirs]) == 1
    out = capsys.readouterr().out
    assert "FAIL expect_column_values_to_be_in_set(genres_each_label): 4 rows (2.0%) " \
           "unexpected (e.g. ['Horror', '', 'Drama (repeated)'])" in out
    assert "FAIL expect_column_values_to_be_between(genres_each_score): 1 rows (0.5%) " \
           "unexpected (e.g. [1.3])" in out
    assert "FAIL expect_column_values_to_be_between(genres_label_count): 2 rows" in out
    assert "FAIL expect_column_values_to_be_between(intensity_value)" in out

    drifted = kinds_frame(seed=4)
    drifted["genres_labels"] = [["Drama", "Thriller"] if i % 2 else list(v)
                                for i, v in enumerate(drifted["genres_labels"])]
    table = write(drifted, "drifted")
    assert main(["--spec", kinds, "--table", table, *dirs]) == 1
    assert "FAIL expect_column_mean_to_be_between(genres_has_Thriller)" in capsys.readouterr().out
    assert main(["--spec", kinds, "--table", table, "--max-label-share-shift", "0.5",
                 *dirs]) == 0
    assert main(["--spec", kinds, "--table", table, "--max-label-share-shift", "2",
                 *dirs]) == 2  # not a share
