"""GPU pinning: in-process tasks through one reused worker, and a real standalone cluster.

In-process, a TaskContext is set up per task the way PySpark's worker sets it up (with the
task's GPU addresses), and udfs.worker.get_engine is called as the UDFs call it once per task:
a reused worker must follow each task to its GPU, and refuse only when a live CUDA context
(stubbed at udfs.worker.cuda_initialized, the one function that asks CUDA) is on another.

On the cluster (tests/spark_cluster.py), one Master and one Worker run from the pip pyspark
package; the Worker advertises two GPUs through a discovery script (no real GPU is needed:
Spark only schedules the addresses). The driver runs in its own process (this module run with -m), because a test
session's local SparkContext would otherwise be reused. An application with one core and one
GPU per executor gets two executors, and a pandas UDF on each calls udfs.worker.pin_gpu().
(An executor owning both GPUs does hand one reused worker tasks on either GPU, but Spark's
worker pool does not do it on demand, so the in-process tests make that happen.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.spark_cluster import cluster, wait_for  # noqa: F401 - cluster: a fixture
from udfs import worker

ROOT = Path(__file__).resolve().parents[1]
GPUS = {"0", "1"}
PROBE = {"type": "tests.faulty_engines:GpuProbe"}


@pytest.fixture
def tasks(monkeypatch):
    """run(addresses, config): get_engine as a UDF calls it in a task given those GPUs."""
    from pyspark import TaskContext
    from pyspark.resource import ResourceInformation

    from tests.faulty_engines import GpuProbe

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(worker, "_slots", {})
    GpuProbe.built.clear()
    attempt = iter(range(1000))

    def run(addresses: list[str], config: dict = PROBE):
        TaskContext._setTaskContext(None)  # as PySpark's worker does before each task
        n = next(attempt)
        TaskContext(stageId=0, partitionId=n, attemptNumber=0, taskAttemptId=n, cpus=1,
                    resources={"gpu": ResourceInformation("gpu", list(addresses))})
        return worker.get_engine(config)

    yield run
    TaskContext._setTaskContext(None)
    worker.close_engine()


def test_a_reused_worker_follows_each_task_to_its_gpu(tasks):
    import torch  # loads torch.cuda without initialising CUDA: no reason to refuse anything
    assert "torch.cuda" in sys.modules and not worker.cuda_initialized()
    first = tasks(["0"])
    assert first.cuda_visible_devices == os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert tasks(["0"]) is first  # same config, same GPU: the engine is reused
    second = tasks(["1"])
    assert second is not first and first.closed  # rebuilt on the task's GPU, the old closed
    assert second.cuda_visible_devices == os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    third = tasks(["0"])
    assert third.cuda_visible_devices == "0" and second.closed
    assert torch.cuda.is_initialized() is False


def test_two_engines_in_one_job_switch_gpus_freely(tasks):
    """Head/tail routing: a worker serves the head engine, then the tail, on either GPU."""
    import torch  # noqa: F401 - as a CPU engine's worker has it
    head, tail = dict(PROBE, name="head"), dict(PROBE, name="tail")
    for addresses, config in [(["0"], head), (["1"], tail), (["1"], head), (["0"], tail)]:
        engine = tasks(addresses, config)
        assert engine.name == config["name"] and engine.cuda_visible_devices == addresses[0]


def test_a_live_cuda_context_on_another_gpu_is_refused(tasks, monkeypatch):
    cuda = {"initialized": False}
    monkeypatch.setattr(worker, "cuda_initialized", lambda: cuda["initialized"])
    engine = tasks(["1"])
    cuda["initialized"] = True  # the engine initialised CUDA on GPU 1 in this process
    assert tasks(["1"]) is engine
    with pytest.raises(worker.GpuPinningError, match=r"given GPU 0.*CUDA_VISIBLE_DEVICES='1'"):
        tasks(["0"])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and not engine.closed
    assert tasks(["1"]) is engine  # the engine that is still valid is kept


def test_cuda_initialized_asks_cuda():
    import torch
    assert worker.cuda_initialized() is torch.cuda.is_initialized() is False
    assert worker._driver_initialized() is False  # no driver loaded in this CPU process


def test_each_executor_is_pinned_to_its_own_gpu(cluster, tmp_path):
    master_url, script = cluster
    result = subprocess.run(
        [sys.executable, "-m", "tests.test_gpu_pinning", master_url, str(script)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows, result.stderr[-3000:]

    by_executor: dict[str, set[str]] = {}
    for row in rows:
        by_executor.setdefault(row["executor"], set()).add(row["address"])
        # pin_gpu exported exactly the address Spark assigned to the task
        assert row["pinned"] == row["cuda"] == row["address"]
    assert len(by_executor) == 2, by_executor
    assert all(len(addresses) == 1 for addresses in by_executor.values()), by_executor
    assert set().union(*by_executor.values()) == GPUS


def probe_gpus(master_url: str, script: str, partitions: int = 8) -> list[dict]:
    """Driver side: run the pinning probe on every partition and return one row per task."""
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import pandas_udf

    conf = {
        "spark.executor.cores": "1", "spark.cores.max": "2", "spark.executor.memory": "512m",
        "spark.executor.resource.gpu.amount": "1",
        "spark.executor.resource.gpu.discoveryScript": script,
        "spark.task.resource.gpu.amount": "1",
        "spark.pyspark.python": sys.executable, "spark.python.worker.reuse": "true",
        "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
        "spark.driver.memory": "512m", "spark.ui.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
    }
    builder = SparkSession.builder.master(master_url).appName("annofeat-gpu-pinning")
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    try:
        jsc = spark.sparkContext._jsc.sc()
        # executors register asynchronously; both must be up or one would take every task
        wait_for("two executors", lambda: len(jsc.statusTracker().getExecutorInfos()) >= 3)

        @pandas_udf("string")
        def probe(ids: pd.Series) -> pd.Series:
            from pyspark import TaskContext

            from udfs.worker import pin_gpu
            pinned = pin_gpu()
            time.sleep(0.5)  # long enough that the scheduler spreads tasks over executors
            row = json.dumps({
                # a standalone executor runs in work/<app-id>/<executor-id>/
                "executor": os.path.basename(os.getcwd()), "pid": os.getpid(),
                "address": ",".join(TaskContext.get().resources()["gpu"].addresses),
                "pinned": pinned, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")})
            return pd.Series([row] * len(ids))

        df = spark.range(0, partitions, numPartitions=partitions)
        return [json.loads(r.p) for r in df.select(probe("id").alias("p")).collect()]
    finally:
        spark.stop()


if __name__ == "__main__":
    for task_row in probe_gpus(sys.argv[1], sys.argv[2]):
        print(json.dumps(task_row))


def test_annotate_job_on_the_cluster(cluster, tmp_path, spec):
    """spark-submit of the annotate job to the standalone cluster, the project shipped to the
    executors as a zip (--py-files, as on a real cluster), one GPU per executor."""
    import zipfile

    import pandas as pd

    from spark_jobs.movielens import load_items

    master_url, script = cluster
    shipped = tmp_path / "annofeat.zip"
    with zipfile.ZipFile(shipped, "w") as zf:
        for package in ("udfs", "spark_jobs"):
            for path in (ROOT / package).rglob("*.py"):
                zf.write(path, path.relative_to(ROOT))
    items = load_items().head(150)
    items.to_parquet(tmp_path / "items.parquet", index=False, coerce_timestamps="us",
                     allow_truncated_timestamps=True)
    conf = {"spark.executor.cores": "1", "spark.cores.max": "2", "spark.executor.memory": "1g",
            "spark.executor.resource.gpu.amount": "1",
            "spark.executor.resource.gpu.discoveryScript": str(script),
            "spark.task.resource.gpu.amount": "1", "spark.pyspark.python": sys.executable,
            "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
            "spark.ui.enabled": "false"}
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", master_url,
           "--py-files", str(shipped)]
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    cmd += [str(ROOT / "spark_jobs" / "annotate.py"), "--spec", str(ROOT / "specs/movielens.yaml"),
            "--input", str(tmp_path / "items.parquet"), "--output", str(tmp_path / "out"),
            "--batch-size", "32"]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "out")
    assert len(table) == 150 and table["item_id"].is_unique
    assert table["error"].isna().all()
    assert table["vibe_label"].isin(spec.attributes["vibe"].labels).all()
    assert (table["spec_version"] == spec.version).all()


def test_the_semantic_id_fits_embedder_serves_as_the_main_engine(monkeypatch):
    """The semantic-ID fit builds its embedder in the embed slot; the annotation pass that
    follows asks for the same engine as its main one and gets it (its text-embedding cache
    with it), instead of a second engine encoding the same texts again."""
    from tests.faulty_engines import GpuProbe

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(worker, "_slots", {})
    monkeypatch.setattr(worker, "task_gpu_addresses", lambda: [])
    GpuProbe.built.clear()
    try:
        fitted = worker.get_engine(PROBE, worker.EMBED)
        assert worker.get_engine(PROBE) is fitted and worker.get_engine(PROBE, worker.EMBED) is fitted
        other = worker.get_engine(dict(PROBE, name="llm"))  # an LLM in the main slot
        assert other is not fitted and not fitted.closed  # the embedder stays beside it
    finally:
        worker.close_engine()
