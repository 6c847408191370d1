"""The annotation table's commit protocol under faults: the driver is killed (os._exit, no
cleanup, as a crash or SIGKILL) at every step of a run, and after each kill the readers
(DuckDB's glob, Spark, Feast's offline store) see a complete table, the last good one or the
new one, never a mix; the next run completes; no run deletes another's staging files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml

from spark_jobs import annotate
from udfs.schema import AnnotationSchema
from udfs.spec import load_spec, parse_spec
from udfs.table import FeatureTable, read_latest

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "specs" / "movielens.yaml"
N = 12


def titles(edition: str) -> pd.DataFrame:
    films = ["Alien", "Heat", "Up", "Jaws", "Casablanca", "Toy Story", "Shrek", "Vertigo",
             "Psycho", "Brazil", "Amelie", "Fargo"]
    return pd.DataFrame({"item_id": range(1, N + 1),
                         "title": [f"{f} ({edition})" for f in films[:N]],
                         "description": "Genres: Drama",
                         "event_timestamp": pd.Timestamp("2020-01-01", tz="UTC")})


def run_killed_at(step: str, items: Path, out: Path, spec: Path) -> None:
    env = {**os.environ, "ANNOFEAT_FAULT": step, "PYTHONPATH": str(ROOT),
           "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run(
        [sys.executable, "-m", "spark_jobs.annotate", "--master", "local[1]", "--spec", str(spec),
         "--input", str(items), "--output", str(out), "--timestamp-column", "event_timestamp"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 137, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"fault injected at {step}" in proc.stdout


def feast_repo(base: Path, data: Path) -> Path:
    """A copy of the demo's feature repo whose annotation view reads `data`."""
    repo = base / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__py*"))
    shutil.copytree(ROOT / "specs", base / "specs")
    env = {**os.environ, "ANNOFEAT_FEATURE_DATA": str(data), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(Path(sys.executable).with_name("feast")), "-c", str(repo), "apply"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return repo


def readers(out: Path, spec, spark, store) -> dict[str, dict[int, str]]:
    """item -> newest vibe label, as each reader sees the table."""
    directory = FeatureTable(str(out)).directory(AnnotationSchema(spec))
    seen = {"duckdb": dict(duckdb.sql(
        "SELECT item_id, arg_max(vibe_label, row(event_timestamp, created_timestamp)) "
        f"FROM read_parquet('{directory}/*.parquet') GROUP BY item_id").fetchall())}
    spark.read.parquet(directory).createOrReplaceTempView("t")
    seen["spark"] = {r.item_id: r.v for r in spark.sql(
        "SELECT item_id, max_by(vibe_label, struct(event_timestamp, created_timestamp)) AS v "
        "FROM t GROUP BY item_id").collect()}
    if store is not None:
        entity = pd.DataFrame({"item_id": range(1, N + 1),
                               "event_timestamp": pd.Timestamp.now(tz="UTC")})
        rows = store.get_historical_features(entity_df=entity,
                                             features=["item_annotations:vibe_label"]).to_df()
        seen["feast"] = dict(zip(rows["item_id"], rows["vibe_label"]))
    table = read_latest(str(out), spec)[0]
    seen["table"] = dict(zip(table["item_id"], table["vibe_label"]))
    return {reader: {int(k): v for k, v in sorted(labels.items())}
            for reader, labels in seen.items()}


def agree(seen: dict) -> bool:
    """Every reader sees the same complete table."""
    first = next(iter(seen.values()))
    return len(first) == N and all(labels == first for labels in seen.values())


def hashes(out: Path, spec) -> dict[int, str]:
    table = read_latest(str(out), spec)[0]
    return dict(zip(table["item_id"], table["content_hash"]))


def test_a_kill_at_any_step_leaves_a_complete_table(spark, spec, tmp_path):
    from feast import FeatureStore

    out, items = tmp_path / "data" / "item_annotations", tmp_path / "items.parquet"
    first = titles("1st edition")
    first.to_parquet(items, coerce_timestamps="us", allow_truncated_timestamps=True)
    annotate.run(spark, spec, spark.read.parquet(str(items)), str(out),
                 timestamp_column="event_timestamp")
    store = FeatureStore(repo_path=str(feast_repo(tmp_path, tmp_path / "data")))
    good = readers(out, spec, spark, store)
    assert agree(good)
    old_hashes = hashes(out, spec)

    titles("2nd edition").to_parquet(items, coerce_timestamps="us",
                                     allow_truncated_timestamps=True)
    for step in ("staged", "consolidated"):
        run_killed_at(step, items, out, SPEC_PATH)
        assert readers(out, spec, spark, store) == good, step  # the last good table, whole
        assert hashes(out, spec) == old_hashes
    run_killed_at("committed", items, out, SPEC_PATH)  # killed after its commit
    new_hashes = hashes(out, spec)
    assert set(new_hashes) == set(old_hashes)
    assert all(new_hashes[i] != old_hashes[i] for i in new_hashes)  # the whole new run
    after = readers(out, spec, spark, store)
    assert agree(after)
    killed = sorted(str(p) for p in (out / "_staging").iterdir())
    assert len(killed) == 3

    # the next run completes (nothing left to do) and leaves the killed runs' staging alone
    report = annotate.run(spark, spec, spark.read.parquet(str(items)), str(out),
                          timestamp_column="event_timestamp")
    assert report["rows_written"] == 0 and report["stale_staging"] == killed
    assert all(Path(k).exists() for k in killed)
    assert len(pd.read_parquet(FeatureTable(str(out)).directory(AnnotationSchema(spec)))) == 2 * N


def test_a_kill_while_migrating_to_a_new_spec(spark, spec, tmp_path):
    """A spec that adds an attribute seeds a new table directory with the history; a kill
    before or after that seed leaves the old directory whole and the next run completes."""
    out, items = tmp_path / "item_annotations", tmp_path / "items.parquet"
    titles("1st edition").to_parquet(items, coerce_timestamps="us",
                                     allow_truncated_timestamps=True)
    annotate.run(spark, spec, spark.read.parquet(str(items)), str(out),
                 timestamp_column="event_timestamp")
    good = readers(out, spec, spark, None)

    data = yaml.safe_load(SPEC_PATH.read_text())
    data["attributes"]["pace"] = {"labels": {"slow": "slow, contemplative",
                                             "fast": "fast, action-packed"}}
    bigger_path = tmp_path / "bigger.yaml"
    bigger_path.write_text(yaml.safe_dump(data))
    bigger = parse_spec(data)
    new_dir = Path(FeatureTable(str(out)).directory(AnnotationSchema(bigger)))

    run_killed_at("consolidated-migrated", items, out, bigger_path)
    assert readers(out, spec, spark, None) == good
    assert not list(new_dir.glob("*.parquet"))  # the new directory holds no run yet
    run_killed_at("migrated", items, out, bigger_path)
    assert readers(out, spec, spark, None) == good  # the old directory is untouched
    seeded = pd.read_parquet(new_dir)
    assert len(seeded) == N and seeded["pace_label"].isna().all()

    report = annotate.run(spark, bigger, spark.read.parquet(str(items)), str(out),
                          timestamp_column="event_timestamp")
    assert report["parts"]["pace"]["annotated"] == N and report["parts"]["vibe"]["annotated"] == 0
    table = read_latest(str(out), bigger)[0]
    assert table["pace_label"].isin(["slow", "fast"]).all() and len(table) == N
    assert dict(zip(table["item_id"], table["vibe_label"])) == good["table"]
