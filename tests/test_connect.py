"""Spark Connect, against a real Connect server (tests/connect_server.py) whose Python workers
get the project only as the artifact udfs.register ships: the SQL functions and README's
example, the annotate job (spark-submit --remote and annotate.run) giving the classic
session's table, incrementally. README's Spark Connect section (its own server, the job
through `spark-submit --remote`, `feast materialize` of what it wrote) runs as pasted in
tests/test_own_catalogue.py, after the walk-through it continues.

Client code runs in subprocesses: a Connect session switches pyspark's functions to Connect
for the whole process (SPARK_CONNECT_MODE_ENABLED), which the classic session that the other
tests share cannot live with."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tests.connect_server import connect_url  # noqa: F401  (session fixture)
from udfs.spec import load_spec
from udfs.table import read_latest

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "movielens.yaml"


def client(code: str, timeout: int = 600) -> dict:
    """Run `code` as a Connect client program; it prints one JSON line last."""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def readme_example() -> str:
    """README's "From your own Spark code or SQL" block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("From your own Spark code or SQL:", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_example_on_connect_gives_the_classic_rows(spark, connect_url, monkeypatch):
    code = readme_example()
    assert 'master("local[2]")' in code
    collect = ("\nimport json\nprint(json.dumps([r.asDict(recursive=True) for r in "
               "rows.orderBy('movieId').collect()]))\n")
    remote = client(code.replace('master("local[2]")', f'remote("{connect_url}")') + collect)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(code, scope)  # classic: getOrCreate() returns the tests' local[2] session
    classic = [r.asDict(recursive=True) for r in scope["rows"].orderBy("movieId").collect()]
    assert len(remote) == len(classic) == 20
    for c, r in zip(classic, remote):
        assert r["movieId"] == c["movieId"] and r["vibe"]["error"] is None
        assert r["vibe"]["label"] == c["vibe"]["label"]
        assert abs(r["vibe"]["confidence"] - c["vibe"]["confidence"]) < 1e-5
        assert r["caption"]["caption"] == c["caption"]["caption"]
    assert len({r["vibe"]["label"] for r in remote}) > 1


def test_workers_without_the_project_and_classic_only_steps_are_refused_in_one_line(
        connect_url):
    out = client(f"""
import json, warnings
from pyspark.sql import SparkSession
from udfs import register, load_spec
from udfs.connect import ConnectError
from expectations.feast_engine import spark_session
spark = SparkSession.builder.remote("{connect_url}").getOrCreate()
said = {{}}
try:
    register(spark, load_spec("{SPEC}"), ship=False)
except ConnectError as exc:
    said["no_ship"] = str(exc)
try:
    spark_session(None)
except ConnectError as exc:
    said["feast_spark"] = str(exc)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    register(spark, load_spec("{SPEC}"))
said["warnings"] = [str(w.message) for w in caught]
fields = spark.sql("SELECT annotate_all('Heat (1995)') AS a").schema["a"].dataType.fieldNames()
said["fields"] = fields
from udfs import connect
said["parallelism"] = connect.parallelism(spark)
print(json.dumps(said))
""")
    assert "cannot import the udfs package" in out["no_ship"]
    assert "No module named 'udfs'" in out["no_ship"] and "\n" not in out["no_ship"]
    assert "needs a classic SparkSession" in out["feast_spark"]
    # the spec has a semantic_id section but no quantiser was given: said once, left out
    assert [w for w in out["warnings"] if "semantic ID out" in w] == out["warnings"]
    assert len(out["warnings"]) == 1
    assert "vibe_label" in out["fields"] and "semantic_id" not in out["fields"]
    assert out["parallelism"] == 2  # the server's local[2], without a SparkContext


def test_annotate_job_on_connect_gives_the_classic_table_and_reruns_incrementally(
        spark, connect_url, items_small, tmp_path):
    from spark_jobs import annotate

    items = items_small.head(40)
    src = tmp_path / "items.parquet"
    items.to_parquet(src, coerce_timestamps="us", allow_truncated_timestamps=True)
    on_connect, classic = tmp_path / "connect", tmp_path / "classic"
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["spark-submit", "--remote", connect_url, str(ROOT / "spark_jobs" / "annotate.py"),
         "--spec", str(SPEC), "--input", str(src), "--output", str(on_connect),
         "--report", str(tmp_path / "report.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = json.loads((tmp_path / "report.json").read_text())
    assert first["rows_written"] == 40 and first["rows_with_errors"] == 0
    assert first["engine_seconds"] > 0

    report = annotate.run(spark, load_spec(SPEC), spark.read.parquet(str(src)), str(classic),
                          progress=lambda *a, **k: None)
    assert report["rows_written"] == 40 and report["engine_seconds"] > 0
    assert report["semantic_id"]["version"] == first["semantic_id"]["version"]
    spec = load_spec(SPEC)
    a, _ = read_latest(str(on_connect), spec)
    b, _ = read_latest(str(classic), spec)
    a, b = a.sort_values("item_id", ignore_index=True), b.sort_values("item_id", ignore_index=True)
    assert a["item_id"].tolist() == b["item_id"].tolist() == items["item_id"].tolist()
    for name in spec.attributes:
        assert a[f"{name}_label"].tolist() == b[f"{name}_label"].tolist()
        np.testing.assert_allclose(a[f"{name}_confidence"], b[f"{name}_confidence"], atol=1e-5)
    for column in ("caption", "model", "content_hash", "spec_version", "semantic_id_version"):
        assert a[column].tolist() == b[column].tolist(), column
    assert [list(x) for x in a["semantic_id"]] == [list(x) for x in b["semantic_id"]]
    assert [list(x) for x in a["caption_tokens"]] == [list(x) for x in b["caption_tokens"]]
    assert a["error"].isna().all()

    # annotate.run from Python on a Connect session: one edited title is all it redoes
    edited = items.copy()
    edited.loc[0, "title"] = "Toy Story, the director's cut (1995)"
    edited.to_parquet(tmp_path / "edited.parquet", coerce_timestamps="us",
                      allow_truncated_timestamps=True)
    again = client(f"""
import json
from pyspark.sql import SparkSession
from spark_jobs import annotate
from udfs.spec import load_spec
spark = SparkSession.builder.remote("{connect_url}").getOrCreate()
report = annotate.run(spark, load_spec("{SPEC}"),
                      spark.read.parquet("{tmp_path / 'edited.parquet'}"), "{on_connect}")
print(json.dumps(report, default=str))
""")
    assert again["rows_in"] == 40 and again["rows_reused"] == 39 and again["rows_written"] == 1
    assert {p: v["reasons"] for p, v in again["parts"].items()} == \
        {p: {"content": 1} for p in [*spec.attributes, "caption", "semantic_id"]}
    assert again["engine_seconds"] > 0 and not again["semantic_id"]["fitted"]
    rows = pd.read_parquet(on_connect / first["schema"])
    assert len(rows) == 41 and rows["item_id"].value_counts().max() == 2
