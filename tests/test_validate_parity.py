"""`validate --repo` and `feast materialize` are one check: the same thresholds and suites
from the repo's feature_store.yaml, so they pass and refuse the same tables."""
from __future__ import annotations

import yaml

from spark_jobs.validate import main as validate
from tests.test_feast_gate import WINDOW, feast, make_repo, write_tables
from tests.test_gate import annotation_frame, with_errors


def test_validate_and_materialize_agree_on_the_configured_thresholds(tmp_path, capsys):
    repo = make_repo(tmp_path)
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    config["batch_engine"]["thresholds"]["max_error_share"] = 0.2
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    table = repo / "data" / "item_annotations"

    write_tables(repo, with_errors(annotation_frame(seed=0), 30))  # 15% errors: within 0.2
    assert feast(repo, "apply").returncode == 0
    assert validate(["--repo", str(repo), "--table", str(table)]) == 0
    assert validate(["--repo", str(repo)]) == 0  # rows read through the offline store
    done = feast(repo, "materialize", *WINDOW)
    assert done.returncode == 0, done.stderr[-2000:]

    write_tables(repo, with_errors(annotation_frame(seed=1), 50))  # 25%: over 0.2
    capsys.readouterr()
    assert validate(["--repo", str(repo), "--table", str(table)]) == 1
    said = capsys.readouterr().out
    assert "expect_column_values_to_be_null(error): 50 rows (25.0%)" in said
    assert "'mostly': 0.8" in said  # the repo's threshold, not the default 0.05
    assert validate(["--repo", str(repo)]) == 1
    refused = feast(repo, "materialize", *WINDOW)
    assert refused.returncode != 0
    assert "expect_column_values_to_be_null(error): 50 rows (25.0%)" in refused.stderr
    # a flag overrides one setting, explicitly
    assert validate(["--repo", str(repo), "--table", str(table), "--max-error-share", "0.3"]) == 0
