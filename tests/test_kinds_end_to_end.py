"""A spec with one attribute of each kind (specs/movielens_kinds.yaml: vibe single, genres
multi, intensity ordinal) through every command a user runs: spark-submit of the annotate job
-> spark_jobs.validate -> `feast apply` -> `feast materialize` (gated) ->
get_online_features -> build_features -> train_ranker -> the ranking service scoring
candidates from the online store. Then the spec's multi-label threshold changes and the job
re-annotates that attribute alone, keeping the others."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from udfs.spec import load_spec
from udfs.table import read_latest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RATINGS = ROOT / "data" / "movielens" / "ratings.csv"
N_ITEMS, N_USERS = 150, 60


def run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    base = tmp_path_factory.mktemp("kinds")
    repo, specs = base / "feature_repo", base / "specs"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__py*"))
    shutil.copytree(ROOT / "specs", specs)
    spec_path = specs / "movielens_kinds.yaml"
    store = yaml.safe_load((repo / "feature_store.yaml").read_text())
    store["batch_engine"]["spec"] = "../specs/movielens_kinds.yaml"
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(store))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ANNOFEAT_SPEC": str(spec_path),
           "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    data = repo / "data"
    items = base / "items.parquet"
    # the most rated movies, so the ranker has interactions on them
    ratings = pd.read_csv(RATINGS)
    ratings = ratings[ratings["userId"] <= N_USERS]
    top = ratings["movieId"].value_counts().index[:N_ITEMS]
    ratings = ratings[ratings["movieId"].isin(top)]
    ratings.to_csv(base / "ratings.csv", index=False)
    run([sys.executable, "-m", "spark_jobs.movielens", "--out", base / "all.parquet",
         "--metadata-out", data / "item_metadata"], ROOT, env)
    catalogue = pd.read_parquet(base / "all.parquet")
    catalogue[catalogue["item_id"].isin(top)].to_parquet(items, index=False)
    annotations = data / "item_annotations"
    annotate = [BIN / "spark-submit", "--master", "local[2]",
                "--conf", f"spark.pyspark.python={sys.executable}",
                ROOT / "spark_jobs" / "annotate.py", "--spec", spec_path, "--input", items,
                "--output", annotations, "--timestamp-column", "event_timestamp",
                "--report", base / "annotate.json"]
    run(annotate, ROOT, env)
    first = json.loads((base / "annotate.json").read_text())
    run([sys.executable, "-m", "spark_jobs.build_features", "--ratings", base / "ratings.csv",
         "--annotations", annotations, "--out", data, "--spec", spec_path], ROOT, env)
    # the first run writes the drift reference; `feast materialize` checks against it
    gate = run([sys.executable, "-m", "spark_jobs.validate", "--repo", repo, "--table",
                annotations, "--report-dir", base / "reports", "--write-reference"], ROOT, env)
    run([BIN / "feast", "apply"], repo, env)
    run([BIN / "feast", "materialize", "1990-01-01T00:00:00", "2030-01-01T00:00:00"], repo, env)
    run([sys.executable, "-m", "spark_jobs.train_ranker", "--repo", repo, "--ratings",
         base / "ratings.csv", "--spec", spec_path, "--out", base / "ranker", "--folds", "1",
         "--bootstrap", "50", "--n-buckets", "8"], ROOT, env)
    return {"base": base, "repo": repo, "spec_path": spec_path, "env": env,
            "annotate": annotate, "first": first, "gate": gate, "top": list(top)}


def test_every_kind_goes_from_spark_submit_to_the_online_store(flow):
    spec = load_spec(flow["spec_path"])
    table, key = read_latest(str(flow["repo"] / "data" / "item_annotations"), spec)
    assert len(table) == N_ITEMS and table["error"].isna().all()
    genres, intensity = spec.attributes["genres"], spec.attributes["intensity"]
    for labels, scores in zip(table["genres_labels"], table["genres_scores"]):
        assert list(labels) == genres.choose(list(scores)) and 1 <= len(labels) <= 3
    assert table["intensity_value"].between(1, 5).all()
    assert table["intensity_label"].isin(intensity.labels).all()
    assert "item_annotations: PASSED" in flow["gate"].stdout

    from feast import FeatureStore
    ids = [int(i) for i in table[key].iloc[:5]]
    served = FeatureStore(repo_path=str(flow["repo"])).get_online_features(
        features=["item_annotations:genres_labels", "item_annotations:genres_scores",
                  "item_annotations:intensity_value", "item_annotations:vibe_label"],
        entity_rows=[{"item_id": i} for i in ids]).to_dict()
    expected = table.set_index(key).loc[ids]
    assert [list(v) for v in served["genres_labels"]] == \
        [list(v) for v in expected["genres_labels"]]
    np.testing.assert_allclose(np.array(served["genres_scores"], dtype=float),
                               np.stack(expected["genres_scores"]), atol=1e-12)
    np.testing.assert_allclose(served["intensity_value"], expected["intensity_value"])
    assert served["vibe_label"] == expected["vibe_label"].tolist()


def test_the_ranker_trains_and_serves_on_every_kind(flow):
    from fastapi.testclient import TestClient

    from ranking_service import model as ranker_model
    from ranking_service.app import create_app

    model_dir = flow["base"] / "ranker"
    columns = ranker_model.load(model_dir).features.columns
    for name in ("genres_has_Comedy", "genres_score_Comedy", "user_share_genres",
                 "intensity_label", "intensity_value", "vibe_label"):  # every kind's features
        assert name in columns, (name, columns)
    with TestClient(create_app(str(flow["repo"]), str(model_dir))) as client:
        reply = client.post("/rank", json={"user_id": 1, "item_ids": flow["top"][:20], "k": 5})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert len(body["items"]) == 5 and not body["unknown_items"] and not body["unknown_user"]
    assert all(np.isfinite(i["score"]) for i in body["items"])


def test_a_changed_threshold_reannotates_that_attribute_alone(flow):
    changed = yaml.safe_load(flow["spec_path"].read_text())
    changed["attributes"]["genres"]["threshold"] = 0.3
    path = flow["base"] / "specs" / "movielens_kinds_lower.yaml"
    path.write_text(yaml.safe_dump(changed, sort_keys=False))
    cmd = list(flow["annotate"])
    cmd[cmd.index(flow["spec_path"])] = path
    cmd[cmd.index("--report") + 1] = flow["base"] / "again.json"
    run(cmd, ROOT, flow["env"])
    again = json.loads((flow["base"] / "again.json").read_text())
    genres = again["parts"]["genres"]
    assert (genres["annotated"], genres["reasons"]) == (N_ITEMS, {"definition": N_ITEMS})
    # MiniLM reads 256 word pieces: a longer lead is cut, and counted (never an error)
    assert 0 <= genres.get("truncated_texts", 0) <= N_ITEMS and again["rows_with_errors"] == 0
    for part in ("vibe", "intensity", "caption"):
        assert again["parts"][part]["annotated"] == 0, again["parts"]
    spec = load_spec(path)
    table, _ = read_latest(str(flow["repo"] / "data" / "item_annotations"), spec)
    assert (table["genres_version"] == spec.attributes["genres"].version).all()
    lower = spec.attributes["genres"]
    for labels, scores in zip(table["genres_labels"], table["genres_scores"]):
        assert list(labels) == lower.choose(list(scores))
