"""Latency of POST /rank with 100 candidates, against Feast's own online read.

    python bench/rank_latency.py --repo feature_repo --model artifacts/ranker

Starts the service (`python -m ranking_service`) on a free 127.0.0.1 port with real
uvicorn, then measures p50/p99 of /rank for one client and for 32 concurrent clients (a
bounded number of requests each), and in the same run `FeatureStore.get_online_features`
for the same user and 100 items: the feature fetch alone, the reference the service is
meant to beat (target: /rank p99 <= reference p99).
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_entities(repo: Path, n_items: int, seed: int) -> tuple[int, list[int]]:
    """A user and items that the repo has features for."""
    rng = np.random.default_rng(seed)
    items = pd.read_parquet(repo / "data" / "item_stats", columns=["item_id"])["item_id"].unique()
    users = pd.read_parquet(repo / "data" / "user_stats", columns=["user_id"])["user_id"].unique()
    return int(rng.choice(users)), [int(i) for i in rng.choice(items, n_items, replace=False)]


def timed_posts(url: str, body: dict, n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.post(url, json=body)
            out.append((time.perf_counter() - t0) * 1e3)
            r.raise_for_status()
    return out


def start_service(repo: Path, model: Path, port: int, no_cache: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ranking_service", "--repo", str(repo), "--model", str(model),
           "--port", str(port)] + (["--no-cache"] if no_cache else [])
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"service exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("service did not start in 180 s")


def reference(repo: Path, model: Path, user: int, items: list[int], n: int) -> list[float]:
    """Feast's get_online_features for the refs the model needs, user x 100 items."""
    from feast import FeatureStore
    from ranking_service.model import load
    fs = load(model).features
    store = FeatureStore(repo_path=str(repo))
    refs, rows = fs.item_refs() + fs.user_refs(), [{"user_id": user, "item_id": i} for i in items]
    store.get_online_features(features=refs, entity_rows=rows).to_dict()  # warm-up
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        store.get_online_features(features=refs, entity_rows=rows).to_dict()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(ROOT / "feature_repo"))
    p.add_argument("--model", default=str(ROOT / "artifacts" / "ranker"))
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--requests", type=int, default=1000, help="single-client requests")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--per-client", type=int, default=30, help="requests per concurrent client")
    p.add_argument("--reference-calls", type=int, default=300)
    p.add_argument("--no-cache", action="store_true", help="service reads Feast per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    repo, model = Path(args.repo), Path(args.model)
    user, items = pick_entities(repo, args.candidates, args.seed)
    body = {"user_id": user, "item_ids": items}
    port = free_port()
    url = f"http://127.0.0.1:{port}/rank"
    proc = start_service(repo, model, port, args.no_cache)
    try:
        timed_posts(url, body, 20)  # warm-up (fills the feature cache)
        single = timed_posts(url, body, args.requests)
        with ThreadPoolExecutor(args.concurrency) as pool:
            t0 = time.perf_counter()
            runs = list(pool.map(lambda _: timed_posts(url, body, args.per_client),
                                 range(args.concurrency)))
            wall = time.perf_counter() - t0
        concurrent = [ms for run in runs for ms in run]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ref = reference(repo, model, user, items, args.reference_calls)
    figures = {
        "candidates": args.candidates, "service_cache": not args.no_cache,
        "rank_single_client": percentiles(single),
        f"rank_{args.concurrency}_clients": {**percentiles(concurrent),
                                             "throughput_rps": round(len(concurrent) / wall, 1)},
        "feast_get_online_features": percentiles(ref),
    }
    figures["p99_ratio_rank_single_vs_feast"] = round(
        figures["rank_single_client"]["p99_ms"] / figures["feast_get_online_features"]["p99_ms"], 3)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
