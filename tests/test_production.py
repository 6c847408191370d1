"""The production configuration, run as shipped: feature_store.production.yaml.

Spark offline store reading SparkSource tables (ANNOFEAT_OFFLINE_STORE=spark), Feast's Spark
compute engine behind the expectations gate (the checks run as Spark aggregations), a real
redis-server; the `feast` CLI for apply and materialization, as a user runs it: README's
"Production: Spark engine and Redis" bash block is run verbatim, only the values of its
exports replaced by this test's (the redis-server's port, Spark local[2], a temporary data
directory). If the README stops working when pasted, this test fails.

The annotation table is written the way the annotate job writes it (udfs.table: one run
file per run, newest row per item wins). A first run is materialized by the README block
and served; a bad run is refused by the block's `materialize-incremental` command (exit 1)
with every Redis key unchanged; a re-annotation run, stamped with its run time, is served
after the next incremental materialization while a training row before it still sees the
old label. The rest calls the same engine in-process (FeatureStore with this config, on the
test session's Spark), since each CLI call pays for importing Feast and GE and starting a
JVM and Python workers.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from expectations.feast_engine import GateRefused
from spark_jobs.validate import main as validate_main
from tests.test_feast_gate import make_repo
from tests.test_gate import (SPEC, annotation_frame, item_stats_frame, user_stats_frame,
                             write_parquet)
from udfs.schema import AnnotationSchema
from udfs.table import FeatureTable

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "feature_store.production.yaml"
SECTION = "## Production: Spark engine and Redis"
FIRST_RUN = datetime(2024, 1, 1, tzinfo=timezone.utc)


def readme_script() -> str:
    """The one bash block of README's production section."""
    text = (ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold one bash block"
    return blocks[0]


def with_values(script: str, env: dict[str, str]) -> str:
    """The script with each `export NAME=value` given this test's value (and nothing else
    changed); every variable the test sets must be one the README exports."""
    exported = re.findall(r"^export (\w+)=", script, flags=re.M)
    assert sorted(exported) == sorted(env), exported
    return re.sub(r"^export (\w+)=\S+", lambda m: f"export {m[1]}={shlex.quote(env[m[1]])}",
                  script, flags=re.M)


def commands(script: str) -> tuple[list[str], list[str]]:
    """(the exports, the other commands) of a script, continuation lines joined."""
    lines = [x for x in script.replace("\\\n", " ").splitlines()
             if x.strip() and not x.lstrip().startswith("#")]
    return [x for x in lines if x.startswith("export ")], [
        x for x in lines if not x.startswith("export ")]


def all_but_the_last(script: str) -> str:
    """apply and the first full materialize: the block up to its last command."""
    exports, rest = commands(script)
    assert [c.split()[5] for c in rest] == ["apply", "materialize", "materialize-incremental"]
    return "\n".join(exports + rest[:-1])


def the_last(script: str) -> str:
    """The exports and the block's last command: what a user runs after each annotate run."""
    exports, rest = commands(script)
    return "\n".join(exports + rest[-1:])


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def snapshot(client) -> dict[bytes, bytes]:
    """Every key with its serialized value: equal snapshots mean an unchanged store."""
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}


class Prod:
    """A copy of feature_repo run with the production config and its environment."""

    def __init__(self, repo: Path, env: dict[str, str]) -> None:
        self.repo, self.env = repo, env
        self.table = FeatureTable(str(repo / "data" / "item_annotations"))

    def bash(self, script: str) -> subprocess.CompletedProcess:
        """Run README commands from the directory holding feature_repo/ and specs/, as from
        the project checkout, with the project's environment active."""
        env = {k: v for k, v in os.environ.items() if k not in self.env}
        # `.venv` active, as the README assumes: its `feast` first on PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(  # the plugin from this checkout, installed or not
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        return subprocess.run(["bash", "-euo", "pipefail", "-c", with_values(script, self.env)],
                              cwd=self.repo.parent, env=env, capture_output=True, text=True,
                              timeout=900)

    def store(self):
        from feast import FeatureStore
        return FeatureStore(repo_path=str(self.repo), fs_yaml_file=self.repo / CONFIG)

    def online(self, ids: list[int], features: list[str]) -> dict:
        return self.store().get_online_features(
            features=features, entity_rows=[{"item_id": i} for i in ids]).to_dict()

    def run(self, df: pd.DataFrame, at: datetime) -> str:
        """Commit `df` as one annotate run started at `at`."""
        return self.table.write_frame(df, AnnotationSchema(SPEC), started=at)

    def report(self, view: str) -> dict:
        return json.loads((self.repo / "data" / "gate" / "reports" / f"{view}.json").read_text())


def rerun(df: pd.DataFrame, at: datetime) -> pd.DataFrame:
    """Rows of a later run, stamped as the annotate job stamps a re-annotation."""
    t = pd.Timestamp(at)
    return df.assign(event_timestamp=t, created_timestamp=t)


@pytest.fixture(scope="module")
def prod(tmp_path_factory, redis_server, spark):  # noqa: F811
    """Applied with the production config, a first annotate run materialized into Redis."""
    repo = make_repo(tmp_path_factory.mktemp("production"))
    env = {"REDIS_CONNECTION_STRING": redis_server.connection_string,
           "SPARK_MASTER": "local[2]", "ANNOFEAT_OFFLINE_STORE": "spark",
           "ANNOFEAT_FEATURE_DATA": str(repo / "data")}
    p = Prod(repo, env)
    first = annotation_frame(seed=0, created=pd.Timestamp(FIRST_RUN))
    p.run(first, FIRST_RUN)
    write_parquet(item_stats_frame(), repo / "data" / "item_stats")
    write_parquet(user_stats_frame(), repo / "data" / "user_stats")
    assert validate_main([  # a drift reference, so the Spark checks include the KL divergence
        "--spec", str(repo.parent / "specs" / "movielens.yaml"),
        "--table", str(repo / "data" / "item_annotations"), "--write-reference",
        "--report-dir", str(repo / "data" / "gate" / "reports"),
        "--reference-dir", str(repo / "data" / "gate" / "reference")]) == 0
    done = p.bash(all_but_the_last(readme_script()))  # apply, the first materialize
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for noise in ("fetch_arrow_table", "Created temporary directory", "py4j.clientserver"):
        assert noise not in done.stderr, noise
    with pytest.MonkeyPatch.context() as mp:  # for the in-process FeatureStore
        for k, v in env.items():
            mp.setenv(k, v)
        yield p, first


def test_first_run_is_validated_with_spark_and_served_from_redis(prod, redis_server):
    p, first = prod
    assert snapshot(redis_server.client())
    ids = [1, 2, 77, 200]
    served = p.online(ids, ["item_annotations:vibe_label", "item_annotations:audience_confidence",
                            "item_annotations:caption_tokens", "item_stats:item_n_ratings"])
    expected = first.set_index("item_id").loc[ids]
    assert served["vibe_label"] == expected["vibe_label"].tolist()
    assert served["audience_confidence"] == pytest.approx(
        expected["audience_confidence"].tolist())
    assert [list(t) for t in served["caption_tokens"]] == expected["caption_tokens"].tolist()
    assert served["item_n_ratings"] == item_stats_frame().set_index("item_id").loc[
        ids, "item_n_ratings"].tolist()
    report = p.report("item_annotations")
    assert report["success"] is True and report["rows"] == 200
    assert {c["column"] for c in report["checks"]
            if c["expectation"] == "expect_column_kl_divergence_to_be_less_than"} == {
        "vibe_label", "audience_label"}
    assert p.report("user_stats")["success"] is True


def test_bad_run_is_refused_by_materialize_incremental_and_redis_unchanged(prod, redis_server):
    p, first = prod
    client = redis_server.client()
    bad = rerun(first.set_index("item_id").loc[[10, 20]].reset_index(), now())
    bad["vibe_label"] = "spooky"
    p.run(bad, now())
    before = snapshot(client)

    time.sleep(1.1)  # the command's end date (whole seconds) is after the bad run's time
    proc = p.bash(the_last(readme_script()))  # materialize-incremental

    assert proc.returncode == 1, proc.stderr
    assert snapshot(client) == before and before
    assert "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert "FAIL expect_column_values_to_be_in_set(vibe_label): 2 rows" in proc.stderr
    report = p.report("item_annotations")
    assert report["rows"] == 2 and not report["success"]
    [failed] = report["failures"]
    assert failed["unexpected_values"] == ["spooky"] and failed["unexpected_count"] == 2
    batch, failing = (Path(q) for q in report["quarantine"])
    assert batch.is_dir() and len(pd.read_parquet(batch)) == 2  # written by Spark
    rows = pd.read_parquet(failing)
    assert sorted(rows["item_id"]) == [10, 20]
    assert all(list(x) == ["expect_column_values_to_be_in_set(vibe_label)"]
               for x in rows["failed_expectations"])


def test_reannotation_is_served_after_incremental_and_history_keeps_the_old_label(prod, spark):
    p, first = prod
    ids = [10, 20, 30, 40]
    old = first.set_index("item_id")
    changed = rerun(old.loc[ids].reset_index(), now())
    labels = list(SPEC.attributes["vibe"].labels)
    changed["vibe_label"] = [labels[(labels.index(v) + 1) % len(labels)]
                             for v in changed["vibe_label"]]
    t2 = changed["event_timestamp"].iloc[0].to_pydatetime()
    p.run(changed, t2)

    p.store().materialize_incremental(end_date=now() + timedelta(seconds=1))

    served = p.online(ids + [50], ["item_annotations:vibe_label"])
    assert served["vibe_label"] == changed["vibe_label"].tolist() + [old.loc[50, "vibe_label"]]
    assert p.report("item_annotations")["rows"] == 4  # the window held the new run only

    entity_df = pd.DataFrame({
        "item_id": [30, 30],
        "event_timestamp": [pd.Timestamp("2025-01-01", tz="UTC"),
                            pd.Timestamp(t2 + timedelta(minutes=1))]})
    training = p.store().get_historical_features(
        entity_df=entity_df, features=["item_annotations:vibe_label"]).to_df()
    training = training.sort_values("event_timestamp")
    assert training["vibe_label"].tolist() == [old.loc[30, "vibe_label"],
                                               changed.set_index("item_id").loc[30,
                                                                                "vibe_label"]]

    # nothing new since: an empty window passes (the table has rows) and writes nothing
    p.store().materialize_incremental(end_date=now() + timedelta(seconds=2))
    report = p.report("item_annotations")
    assert report["success"] and report["rows"] == 0
    assert any("no rows in the window" in n for n in report["notes"])


def test_missing_column_and_empty_table_are_refused_with_one_line_each(prod, redis_server):
    """In-process on the same Spark engine path; the annotation table is swapped for one
    lacking a declared column, user_stats for an empty one, and put back afterwards."""
    p, first = prod
    client = redis_server.client()
    before = snapshot(client)
    directory = Path(p.table.directory(AnnotationSchema(SPEC)))
    aside = directory.with_name("aside")
    stats = p.repo / "data" / "user_stats"
    stats_aside = stats.with_name("user_stats_aside")
    directory.rename(aside)
    shutil.copytree(stats, stats_aside)
    try:
        directory.mkdir()
        broken = first.drop(columns=["audience_confidence"])
        pq.write_table(pa.Table.from_pandas(broken, preserve_index=False),
                       directory / "run-20240101T000000000000-0badc01.parquet")
        write_parquet(user_stats_frame().head(0), stats)
        with pytest.raises(GateRefused) as refused:
            p.store().materialize(datetime(2023, 6, 1, tzinfo=timezone.utc), now())
    finally:
        shutil.rmtree(directory)
        aside.rename(directory)
        shutil.rmtree(stats)
        stats_aside.rename(stats)
    message = refused.value.message
    assert ("FAIL expect_table_columns_to_include: the table lacks ['audience_confidence'], "
            "which the spec declares; was it written with this spec?") in message
    assert ("user_stats: FAILED (0/1 expectations met, 0 rows)\n  FAIL "
            "expect_table_row_count_to_be_between: the table has no rows") in message
    assert "AnalysisException" not in message
    assert snapshot(client) == before
