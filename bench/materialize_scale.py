"""Gated materialization at catalogue scale: wall time and driver memory, gate on and off.

    .venv/bin/python bench/materialize_scale.py [--sizes 200000,2000000] [--engines spark,local]

Synthetic annotation tables (generated with Spark, committed the way the annotate job
commits: one run file under the spec's fingerprint directory) with realistic columns (both
attributes' labels, confidences and versions, a caption and its token array, provenance,
1% error rows) are materialized into a real redis-server, each configuration in a fresh
process, in one run:

    spark  the production config: Spark offline store (SparkSource), Feast's Spark compute
           engine, behind the gate (`spark gated`) or alone (`spark ungated`)
    local  the embedded config's engine: DuckDB offline store, Feast's local engine,
           behind the gate (`local gated`) or alone (`local ungated`); Redis online store

Printed per size and configuration: the wall time of `FeatureStore.materialize()` (the Spark
session is started before the clock in both Spark runs: a JVM start is no cost of the
gate), the rows that reached Redis, and peak RSS of the Python driver, of the JVM (in
local mode the JVM is driver and executors at once: its heap, spark.driver.memory, bounds
it) and of the largest Python worker. Then the two ratios the gate is held to, on each
engine: gated / ungated wall time (target <= 1.25) and Python driver peak RSS at the
largest size / at the smallest (target <= 1.3: the driver holds no rows).

Both configurations write in batches of 10,000 rows (materialization.online_write_batch_size;
Feast's default, one batch for the whole table, would need several GB of protobufs at 2M).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from bench.peak_rss import RssSampler  # noqa: E402

MASTER = "local[2]"
START, END = datetime(2023, 1, 1, tzinfo=timezone.utc), datetime(2025, 1, 1, tzinfo=timezone.utc)
EVENT = datetime(2024, 1, 1, tzinfo=timezone.utc)
WRITE_BATCH = 10_000
CONFIGS = ("spark gated", "spark ungated", "local gated", "local ungated")
TARGET_TIME, TARGET_RSS = 1.25, 1.3


# --- the measured child ----------------------------------------------------------------

def child(repo: str, config: str) -> None:
    """Materialize item_annotations once; print one JSON line of figures."""
    import logging

    from feast import FeatureStore
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("annofeat.gate").setLevel(logging.INFO)

    store = FeatureStore(repo_path=repo, fs_yaml_file=Path(repo) / config)
    with RssSampler() as rss:
        if store.config.offline_store.type == "spark":  # the session, outside the clock
            from feast.infra.offline_stores.contrib.spark_offline_store.spark import (
                get_spark_session_or_start_new_with_repoconfig)
            get_spark_session_or_start_new_with_repoconfig(store.config.offline_store)
        started = time.perf_counter()
        store.materialize(START, END, feature_views=["item_annotations"])
        seconds = time.perf_counter() - started
    me = os.getpid()
    jvm = [rss.peak[p] for p in rss.peak if p != me and "java" in rss.names[p]]
    workers = [rss.peak[p] for p in rss.peak if p != me and "java" not in rss.names[p]]
    with open(f"/proc/{me}/status") as f:  # the kernel's exact high-water mark
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    print("RESULT " + json.dumps({"seconds": seconds, "driver": max(hwm, rss.peak[me]),
                                  "jvm": max(jvm, default=0), "worker": max(workers, default=0),
                                  "processes": sorted([rss.names[p], rss.peak[p] >> 20] for p in rss.peak)}),
          flush=True)


# --- the orchestrating parent ----------------------------------------------------------

def generate(spark, data: Path, n: int) -> None:
    """An annotation table of n items (one committed run), plus the two small stats tables
    the feature repo declares."""
    from pyspark.sql import functions as F

    from tests.test_gate import SPEC, item_stats_frame, user_stats_frame, write_parquet
    from udfs import schema as S
    from udfs.schema import AnnotationSchema
    from udfs.table import FeatureTable, new_run_id, run_file_name

    table = AnnotationSchema(SPEC)
    store = FeatureTable(str(data / "item_annotations"))
    h = lambda salt: F.abs(F.xxhash64(F.col("id"), F.lit(salt)))  # noqa: E731
    error = (h("err") % 100) == 0  # 1% of rows failed to annotate
    cols = {table.id_column: F.col("id"), S.EVENT_TIMESTAMP: F.lit(EVENT),
            S.CREATED_TIMESTAMP: F.lit(EVENT)}
    for name, attr in SPEC.attributes.items():
        labels = F.array(*[F.lit(x) for x in attr.labels])
        cols[S.label(name)] = F.when(~error, F.element_at(
            labels, (h(name) % len(attr.labels)).cast("int") + 1))
        cols[S.confidence(name)] = F.when(~error, 0.3 + (h(name + "c") % 7000) / 10000.0)
        cols[S.version(name)] = F.lit(attr.version)
    words = F.array(*[F.lit(w) for w in SPEC.caption.descriptors])
    k = (h("k") % 6 + 3).cast("int")  # 3..8 words
    picked = F.transform(F.sequence(F.lit(1), k), lambda i: F.element_at(
        words, (F.abs(F.xxhash64(F.col("id"), i)) % len(SPEC.caption.descriptors)).cast("int")
        + 1))
    cols[S.CAPTION] = F.array_join(picked, " ")
    cols[S.CAPTION_TOKENS] = F.transform(picked, lambda w: F.abs(F.xxhash64(w)))
    cols[S.CAPTION_VERSION] = F.lit(SPEC.caption.version)
    cols[S.MODEL] = F.lit("Qwen/Qwen2.5-7B-Instruct")
    cols[S.LABELLED_BY] = F.lit("head")
    cols[S.SPEC_VERSION] = F.lit(SPEC.version)
    cols[S.CONTENT_HASH] = F.sha2(F.col("id").cast("string"), 256)
    cols[S.ERROR] = F.when(error, F.lit("engine timeout"))
    for c in table.columns:  # any other part the spec has (e.g. a semantic ID): plain values
        if c.name not in cols:
            cols[c.name] = {
                S.TOKENS: F.array(*[h(f"{c.name}{i}") % 4096 for i in range(3)]),
                S.CODES: F.array(*[h(f"{c.name}{i}") % 64 for i in range(3)]),
                S.DOUBLE: F.lit(0.5), S.INT64: h(c.name) % 1000,
            }.get(c.type, F.lit(f"{c.name}-v1"))
    frame = spark.range(1, n + 1).select(*[
        cols[c.name].cast(table.spark_type(c.type)).alias(c.name) for c in table.columns])
    run_id = new_run_id()
    staged = store.staging(run_id)
    frame.coalesce(1).write.parquet(f"{staged}/final")
    store.commit(f"{staged}/final", table, run_file_name(EVENT, run_id))
    store.clean(run_id)
    write_parquet(item_stats_frame(), data / "item_stats")
    write_parquet(user_stats_frame(), data / "user_stats")
    # a drift reference from a sample, so the gate's checks include the KL divergence
    from expectations.reference import write_reference
    sample = frame.select([S.label(a) for a in SPEC.attributes]).limit(20_000).toPandas()
    write_reference(data / "gate" / "reference" / "item_annotations.json", sample, SPEC)


def make_repo(base: Path, engine: str, redis: str) -> Path:
    """feature_repo/ and specs/ side by side; `gated.yaml` and `ungated.yaml` differing only
    in batch_engine, both writing to `redis` in batches."""
    repo = base / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    (repo / "data").mkdir()
    if not (base / "specs").exists():
        shutil.copytree(ROOT / "specs", base / "specs")
    source = "feature_store.production.yaml" if engine == "spark" else "feature_store.yaml"
    config = yaml.safe_load((ROOT / "feature_repo" / source).read_text())
    config["online_store"] = {"type": "redis", "connection_string": redis}
    config["materialization"] = {"online_write_batch_size": WRITE_BATCH}
    if engine == "spark":
        config["offline_store"]["spark_conf"]["spark.master"] = MASTER
    gated = dict(config)
    ungated = {**config, "batch_engine": dict(config["batch_engine"]["engine"])}
    if engine == "spark":  # Feast's Spark engine reads the session conf from here when it
        ungated["batch_engine"]["spark_conf"] = config["offline_store"]["spark_conf"]
    (repo / "gated.yaml").write_text(yaml.safe_dump(gated, sort_keys=False))
    (repo / "ungated.yaml").write_text(yaml.safe_dump(ungated, sort_keys=False))
    return repo


def run(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess | None:
    """Run a child in its own process group; None when it ran past `timeout` (the group,
    the child's JVM and Python workers included, is killed then)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def run_child(repo: Path, config: str, env: dict, timeout: float) -> dict | None:
    proc = run([sys.executable, __file__, "--child", str(repo), config], env, timeout)
    if proc is None:
        return None
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        # kept outside the work directory, which is removed at the end
        log = Path(tempfile.gettempdir()) / (
            f"matbench-{repo.parent.parent.name}-{repo.parent.name}-{config}.stderr")
        log.write_text(proc.stderr)
        errors = [x for x in proc.stderr.splitlines()
                  if ("Error" in x or "Exception" in x) and not x.startswith(("\tat ", " "))]
        print(f"    {config} in {repo} failed (exit {proc.returncode}); stderr in {log}:\n      "
              + "\n      ".join(errors[:5] or proc.stderr.splitlines()[-5:]), flush=True)
        return {"failed": True}
    for line in proc.stderr.splitlines():
        if "annofeat.gate" in line:
            print("    " + line, flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="200000,2000000")
    p.add_argument("--engines", default="spark,local")
    p.add_argument("--repeats", default="3,1",
                   help="runs per configuration, per size (the fastest counts: the machine may "
                        "be shared); one number for all sizes, or one per size")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds one materialization may take; a run past it is stopped and "
                        "reported as not finished (default 1800)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--generate", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if args.generate:
        generate_all(Path(args.generate[0]), [int(n) for n in args.generate[1].split(",")])
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    engines = args.engines.split(",")
    repeats = [int(r) for r in args.repeats.split(",")]
    repeats = dict(zip(sizes, repeats if len(repeats) == len(sizes) else repeats[:1] * len(sizes)))
    work = Path(tempfile.mkdtemp(prefix="annofeat-matbench-"))
    from tests.redis_server import start_redis
    server, redis_proc = start_redis(work)
    client = server.client()
    print(f"machine: {len(os.sched_getaffinity(0))} cores (nproc), "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; Spark {MASTER}; redis-server "
          f"{redis_version(client)} on {server.connection_string}; work dir {work}", flush=True)
    results: dict[tuple[str, int], dict | None] = {}
    try:
        # in a process of its own, so its JVM is gone before anything is measured
        made = run([sys.executable, __file__, "--generate", str(work), args.sizes],
                   {**os.environ, "PYTHONPATH": str(ROOT)}, timeout=3600)
        if made is None or made.returncode:
            sys.exit(f"generating the tables failed:\n{made.stderr[-4000:] if made else 'timeout'}")
        print(made.stdout, end="", flush=True)
        for n in sizes:
            for engine in engines:
                base = work / f"n{n}" / engine
                repo = make_repo(base, engine, server.connection_string)
                env = {**os.environ, "PYTHONPATH": str(ROOT),
                       "ANNOFEAT_FEATURE_DATA": str(work / f"n{n}" / "data"),
                       "ANNOFEAT_OFFLINE_STORE": "spark" if engine == "spark" else "file",
                       "SPARK_MASTER": MASTER}
                # the reference the gate reads lives with the data
                config = yaml.safe_load((repo / "gated.yaml").read_text())
                config["batch_engine"]["reference_dir"] = str(work / f"n{n}" / "data" / "gate" /
                                                              "reference")
                (repo / "gated.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                applied = subprocess.run([str(Path(sys.executable).with_name("feast")), "-c",
                                          str(repo), "-f", str(repo / "gated.yaml"), "apply"],
                                         env=env, capture_output=True, text=True)
                if applied.returncode:
                    sys.exit(f"feast apply failed:\n{applied.stderr[-4000:]}")
                for i in range(repeats[n]):  # alternate, so both see the same machine
                    for gate in ("gated", "ungated"):
                        client.flushall()
                        r = run_child(repo, f"{gate}.yaml", env, args.timeout)
                        if r is not None and r.get("failed"):
                            results.setdefault((f"{engine} {gate}", n), None)
                            continue
                        if r is None:
                            print(f"{n:>9,} rows  {engine} {gate:<8} did not finish in "
                                  f"{args.timeout:.0f} s: stopped  (load "
                                  f"{os.getloadavg()[0]:.1f})", flush=True)
                            results.setdefault((f"{engine} {gate}", n), None)
                            continue
                        r["keys"] = client.dbsize()
                        best = results.get((f"{engine} {gate}", n))
                        if best is None or r["seconds"] < best["seconds"]:
                            results[(f"{engine} {gate}", n)] = r
                        print(f"{n:>9,} rows  {engine} {gate:<8} {r['seconds']:7.1f} s  "
                              f"{r['keys']:>9,} keys in Redis  driver "
                              f"{r['driver'] / 2**20:6.0f} MiB  JVM {r['jvm'] / 2**20:5.0f} MiB  "
                              f"worker {r['worker'] / 2**20:5.0f} MiB  "
                              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(results, sizes, engines)
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


def redis_version(client) -> str:
    return client.info("server").get("redis_version", "?")


def generate_all(work: Path, sizes: list[int]) -> None:
    from spark_jobs.session import get_spark
    spark = get_spark("annofeat-matbench-gen", MASTER, {"spark.ui.enabled": "false",
                                                        "spark.ui.showConsoleProgress": "false",
                                                        "spark.driver.memory": "4g"})
    for n in sizes:
        t0 = time.perf_counter()
        generate(spark, work / f"n{n}" / "data", n)
        print(f"generated {n:,} rows with Spark in {time.perf_counter() - t0:.0f} s", flush=True)
    spark.stop()


def report(results: dict, sizes: list[int], engines: list[str]) -> None:
    print("\nratios, fastest run of each (targets: gated/ungated time <= 1.25, "
          "driver peak RSS largest/smallest <= 1.3)")
    small, large = min(sizes), max(sizes)
    for engine in engines:
        for n in sizes:
            g, u = results.get((f"{engine} gated", n)), results.get((f"{engine} ungated", n))
            if not g or not u:
                print(f"  {engine:<5} {n:>9,} rows: gated / ungated wall time = n/a (a run did "
                      "not finish)")
                continue
            ratio = g["seconds"] / u["seconds"]
            print(f"  {engine:<5} {n:>9,} rows: gated / ungated wall time = {ratio:.2f}"
                  f"  ({g['seconds']:.1f} s / {u['seconds']:.1f} s)"
                  f"  {'meets' if ratio <= TARGET_TIME else 'MISSES'} {TARGET_TIME}")
        if small != large:
            for gate in ("gated", "ungated"):
                a, b = results.get((f"{engine} {gate}", large)), results.get((f"{engine} {gate}",
                                                                              small))
                if not a or not b:
                    print(f"  {engine:<5} {gate:<8} driver peak RSS {large:,} / {small:,} = n/a "
                          "(a run did not finish or failed)")
                    continue
                ratio = a["driver"] / b["driver"]
                jvm = f", JVM {a['jvm'] / b['jvm']:.2f}" if b["jvm"] else ""
                print(f"  {engine:<5} {gate:<8} driver peak RSS {large:,} / {small:,} = "
                      f"{ratio:.2f} ({a['driver'] / 2**20:.0f} / {b['driver'] / 2**20:.0f} MiB"
                      f"{jvm})  {'meets' if ratio <= TARGET_RSS else 'MISSES'} {TARGET_RSS}")


if __name__ == "__main__":
    sys.exit(main())
