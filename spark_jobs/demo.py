"""The whole flow on the shipped MovieLens data and the embedded default engine.

    make demo        (or: .venv/bin/python -m spark_jobs.demo)

Each stage runs the same command a user would run, so the demo doubles as a smoke test of the
command-line surface:

  1. prepare   MovieLens movies -> artifacts/demo/items.parquet, feature_repo/data/item_metadata
  2. annotate  spark-submit spark_jobs/annotate.py (local mode) -> feature_repo/data/item_annotations
               (attributes, caption and semantic IDs; the quantiser under _quantizers/)
  3. features  spark_jobs.build_features -> feature_repo/data/{item_stats,user_stats}
  4. gate      spark_jobs.validate (the data-quality CI check) -> artifacts/reports/
  5. feast     feast apply + feast materialize, gated by the Great Expectations engine
  6. train     spark_jobs.train_ranker -> artifacts/ranker/ (model, ablation.json, ablation.png):
               six variants on rolling time folds, overall and on cold-start items
  7. serve     ranking_service on 127.0.0.1, POST /rank for a few users

    make demo ENGINE=smollm2   (or: .venv/bin/python -m spark_jobs.demo --engine smollm2)

runs the same flow with a real LLM: the packaged SmolLM2-135M-Instruct through vLLM's CPU
build labels and captions the --llm-items most popular movies (head/tail routing), the
embedded default the rest; the semantic IDs stay MiniLM's. The summary says which engine
labelled how many items.

    python -m spark_jobs.demo --engine smollm2 --llm-model DIR

puts a local Hugging Face model directory (e.g. one spark_jobs.finetune wrote) in the
packaged model's place, through the same vLLM engine and routing; its labels carry the
directory's name (`vllm:<DIR's name>`).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REPO = ROOT / "feature_repo"
ART = ROOT / "artifacts"
SPEC = ROOT / "specs" / "movielens.yaml"
RATINGS = ROOT / "data" / "movielens" / "ratings.csv"
# --engine smollm2: vLLM's CPU build (installed by `make test-venv`) on one Spark core, since
# vLLM's CPU engine core binds a core of its own; 0.5 = the share of host memory that must be
# free when it starts (vLLM's default 0.9 fails beside Spark)
LLM_ENGINES = {"smollm2": {"type": "vllm", "model": "smollm2-135m-instruct",
                           "max_model_len": 1024, "gpu_memory_utilization": 0.5}}
# The tail and the semantic IDs: one MiniLM (the same config, so one engine and one cache
# per worker, udfs.worker) on both cores: local[1] runs one task, and in the tail pass no
# LLM is loaded (routing swaps head and tail in one slot), so the second core is free
TAIL_ENGINE = {"type": "embedding", "threads": 2}


def llm_engine(engine: str, llm_model: str | None = None) -> dict | None:
    """The head engine's config for --engine/--llm-model (None: the embedded default for all
    items); a bad --llm-model raises SystemExit with one line."""
    if llm_model is None:
        return LLM_ENGINES.get(engine)
    if engine not in LLM_ENGINES:
        raise SystemExit(f"demo: error: --llm-model needs an LLM --engine "
                         f"({', '.join(LLM_ENGINES)}), not {engine!r}")
    path = Path(llm_model).resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"demo: error: --llm-model {llm_model}: not a Hugging Face model "
                         f"directory (no config.json)")
    return {**LLM_ENGINES[engine], "model": str(path)}


def env() -> dict:
    # What `source .venv/bin/activate` gives: spark-submit and feast from this environment.
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def step(title: str, cmd: list[str], check: bool = True, cwd: Path = ROOT) -> int:
    print(f"\n=== {title}\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    started = time.time()
    rc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env()).returncode
    print(f"--- {title}: exit {rc} in {time.time() - started:.1f}s", flush=True)
    if check and rc != 0:
        raise SystemExit(f"demo stopped: {title} failed with exit code {rc}")
    return rc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_rank(n_users: int, n_candidates: int) -> list[dict]:
    port = free_port()
    cmd = [sys.executable, "-m", "ranking_service", "--repo", str(REPO),
           "--model", str(ART / "ranker"), "--host", "127.0.0.1", "--port", str(port)]
    print(f"\n=== serve\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"demo stopped: the ranking service exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("demo stopped: the ranking service did not come up in 120 s")
            time.sleep(0.5)
        ratings = pd.read_csv(RATINGS)
        popular = ratings["movieId"].value_counts().index.tolist()
        results = []
        for user_id in sorted(ratings["userId"].unique())[:n_users]:
            seen = set(ratings.loc[ratings["userId"] == user_id, "movieId"])
            candidates = [int(i) for i in popular if i not in seen][:n_candidates]
            body = {"user_id": int(user_id), "item_ids": candidates, "k": 5}
            r = httpx.post(f"{url}/rank", json=body, timeout=30)
            r.raise_for_status()
            results.append(r.json())
        return results
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=None, help="annotate only the first N items")
    p.add_argument("--users", type=int, default=3, help="users to rank for at the end")
    p.add_argument("--verbose", action="store_true",
                   help="Feast's and the gate's INFO logs, and the annotate job's")
    p.add_argument("--engine", choices=["embedding", *LLM_ENGINES], default="embedding",
                   help="embedding: the embedded default for every item; smollm2: the "
                        "packaged LLM through vLLM for the most popular items")
    p.add_argument("--llm-items", type=int, default=1000,
                   help="--engine smollm2: how many of the most popular items the LLM labels "
                        "(about 10 minutes for the whole demo on 2 cores at 1000)")
    p.add_argument("--llm-model", default=None, metavar="DIR",
                   help="--engine smollm2: this local model directory (e.g. a fine-tuned "
                        "one from spark_jobs.finetune) instead of the packaged model")
    args = p.parse_args(argv)
    llm = llm_engine(args.engine, args.llm_model)
    started = time.time()
    data = REPO / "data"
    data.mkdir(parents=True, exist_ok=True)
    (ART / "reports").mkdir(parents=True, exist_ok=True)
    items = ART / "demo" / "items.parquet"
    annotations = data / "item_annotations"

    step("prepare", [sys.executable, "-m", "spark_jobs.movielens", "--out", items,
                     "--metadata-out", data / "item_metadata"]
         + (["--limit", str(args.limit)] if args.limit else []))
    routed = [] if llm is None else [
        "--engine", json.dumps(llm), "--tail-engine", json.dumps(TAIL_ENGINE),
        "--embed-engine", json.dumps(TAIL_ENGINE),
        "--popularity-column", "popularity", "--head-budget", str(args.llm_items)]
    step("annotate", [BIN / "spark-submit", "--master", "local[2]" if llm is None else "local[1]",
                      "--conf", f"spark.pyspark.python={sys.executable}",
                      ROOT / "spark_jobs" / "annotate.py", "--spec", SPEC, "--input", items,
                      "--output", annotations, "--timestamp-column", "event_timestamp",
                      "--report", ART / "reports" / "annotate.json", *routed,
                      *(["--verbose"] if args.verbose else [])])
    step("features", [sys.executable, "-m", "spark_jobs.build_features", "--ratings", RATINGS,
                      "--annotations", annotations, "--out", data])
    gate_rc = step("gate", [sys.executable, "-m", "spark_jobs.validate", "--repo", REPO,
                            "--table", annotations, "--report-dir", ART / "reports"], check=False)
    if gate_rc != 0:
        raise SystemExit("demo stopped: the data-quality gate refused the annotations; "
                         f"see {ART / 'reports'}")
    # Feast logs every view's progress at INFO (the gate's per-view timings too); the gate
    # prints its verdict per view at any level, refusals are errors, the summary below says
    # the rest
    feast = [BIN / "feast", "--log-level", "INFO" if args.verbose else "WARNING"]
    step("feast apply", [*feast, "apply"], cwd=REPO)
    end = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    step("feast materialize (gated)", [*feast, "materialize", "1990-01-01T00:00:00", end],
         cwd=REPO)
    step("train", [sys.executable, "-m", "spark_jobs.train_ranker", "--repo", REPO,
                   "--ratings", RATINGS, "--spec", SPEC, "--out", ART / "ranker"])
    rankings = serve_and_rank(args.users, n_candidates=50)
    summarise(annotations, rankings, time.time() - started)
    return 0


def _ci(m: dict, signed: bool = False) -> str:
    f = "{:+.4f}" if signed else "{:.4f}"
    return f"{f.format(m['mean'])} [{f.format(m['ci95'][0])}, {f.format(m['ci95'][1])}]"


def print_ablation(ablation: dict) -> None:
    """The ablation table: per variant, NDCG@10 and AUC with their paired gains over the
    reference, overall and on cold-start items."""
    proto, folds = ablation["protocol"], ablation["folds"]
    ref = proto["reference"]
    print(f"ranker ablation     {proto['folds']} rolling time folds from {folds[0]['cutoff'][:10]}: "
          f"{ablation['test_interactions']} test interactions, {ablation['test_users']} users "
          f"({ablation['test_units']} user-folds); served: {proto['served_variant']}")
    print(f"                    cold start = {proto['cold_start']}: "
          f"{ablation['cold_start_interactions']} interactions; 95% paired bootstrap over users")
    for subset, title in (("overall", "all test items"), ("cold_start", "cold-start items")):
        print(f"  {title:<16} {'NDCG@10':<25} {'vs ' + ref:<27} {'AUC (rating >= 4)':<25} "
              f"{'vs ' + ref}")
        for name, v in ablation["variants"].items():
            m = v[subset]
            gain_n, gain_a = m.get(f"ndcg@10_vs_{ref}"), m.get(f"auc_liked_vs_{ref}")
            print(f"  {name:<16} {_ci(m['ndcg@10']):<25} "
                  f"{(_ci(gain_n, True) if gain_n else 'reference'):<27} "
                  f"{_ci(m['auc_liked']):<25} {_ci(gain_a, True) if gain_a else 'reference'}")
    gains = ablation.get("served_gain_by_group")
    if gains:
        print(f"  what the served model ({proto['served_variant']}) leans on, share of its split "
              "gain: " + ", ".join(f"{g} {v:.0%}" for g, v in gains.items()))
    for name, r in ablation.get("genre_redundancy", {}).items():
        print(f"  {name} from the human genres: {r['accuracy_from_genres']:.0%} of "
              f"{r['items']} items predicted (5-fold; always the commonest label: "
              f"{r['majority_share']:.0%})")


def summarise(annotations: Path, rankings: list[dict], seconds: float) -> None:
    from feast import FeatureStore

    from udfs.semantic_ids import describe_usage
    from udfs.spec import load_spec
    from udfs.table import read_latest

    report = json.loads((ART / "reports" / "annotate.json").read_text())
    spec = load_spec(SPEC)
    table, key = read_latest(str(annotations), spec)
    first = f"{next(iter(spec.attributes))}_label"
    ablation = json.loads((ART / "ranker" / "ablation.json").read_text())
    store = FeatureStore(repo_path=str(REPO))
    online = store.get_online_features(
        features=[f"item_annotations:{first}"],
        entity_rows=[{key: int(i)} for i in table[key]]).to_df()
    print("\n================ annofeat demo summary ================")
    print(f"rows annotated      {report['rows_annotated']} (reused {report['rows_reused']}, "
          f"errors {report['rows_with_errors']}, {report['rows_per_second']} rows/s)")
    for model, n in table["model"].value_counts().items():
        tiers = ", ".join(f"{t} {k}" for t, k in
                          table.loc[table["model"] == model, "labelled_by"].value_counts().items())
        print(f"labelled by         {model}: {n} items ({tiers})")
    print(f"{first:<20}" + ", ".join(
        f"{k} {v}" for k, v in table[first].value_counts().items()))
    print("gate                passed (report in artifacts/reports/)")
    print(f"rows materialized   {int(online[first].notna().sum())} items online "
          f"(of {len(table)})")
    sid = report.get("semantic_id")
    if sid:
        print(f"semantic IDs        quantiser {sid['version']} "
              f"({'fitted on ' + str(sid['sample_size']) + ' items' if sid['fitted'] else 'reused'}"
              f"), {sid['levels']} levels x {sid['codes']} codes")
        for line in describe_usage(sid["usage"]).split("; "):
            print(f"                    {line}")
    print_ablation(ablation)
    for r in rankings:
        top = ", ".join(f"{it['item_id']} ({it['score']:.3f})" for it in r["items"])
        print(f"user {r['user_id']:<4} top 5: {top}")
    print(f"artifacts           feature_repo/data/, artifacts/ (took {seconds:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
