"""Latency of POST /rank with 100 candidates, against Feast's own online read.

    python bench/rank_latency.py --repo feature_repo --model artifacts/ranker

Measures, in one run and with the same requests (200 distinct users, each with 100 distinct
candidate items, drawn from the repo's features):

* /rank on the real service (`python -m ranking_service`, uvicorn on 127.0.0.1), once per
  `--workers` setting: HTTP, features, scoring and sort;
* the reference, Feast's `get_online_features` for the same user and 100 items (the feature
  fetch alone), two ways: in this process through the SDK, and over HTTP through Feast's
  own feature server (`feast serve`, the same worker count as the service, with the number of requests of the SDK);

each for one client and for `--concurrency` concurrent clients. The HTTP load generator is
asyncio on raw keep-alive connections (a closed loop: each client sends its next request when
the last answer is in), so it costs little next to the servers it measures; on a 2-core box
it still shares the cores with them. The target: /rank p99 <= the reference's p99 at the same
concurrency. The service's cache is filled by one untimed pass over the requests first (a
service that has been up a while); that pass's latencies are reported as `first_pass`.

Serving through a materialization (`--materialize`, both refresh modes by default): one
worker, cache warm, `--concurrency` clients for `--baseline-s` seconds; then the same load
while `feast materialize 1990-01-01T00:00:00 <now>` runs on the repo (every view, through
the gate), until the service serves the new rows and `--tail-s` seconds more. The
materialization runs on the same cores, at niceness `--materialize-nice` (19 by default:
it gets the CPU the service leaves, roughly as if it ran on other machines, so the figures
show the service's own reaction; 0: it competes for the cores on equal terms). Figures for
that whole window and its two parts: while the materialize process runs, and after it
exits (where the service re-reads its rows). Printed: p99 and requests/s of each window
and their ratios to the load without a materialization, for `--refresh background` (the
default: cached rows re-read in a background thread and swapped in) and `--refresh drop`
(the cache dropped, rows re-read on demand). The materialization rewrites the repo's
online store (with the same rows, for the demo repo) and its gate reports.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pick_requests(repo: Path, n_requests: int, n_items: int, seed: int) -> list[tuple[int, list[int]]]:
    """(user, candidate items) pairs for entities the repo has features for."""
    rng = np.random.default_rng(seed)
    items = pd.read_parquet(repo / "data" / "item_stats", columns=["item_id"])["item_id"].unique()
    users = pd.read_parquet(repo / "data" / "user_stats", columns=["user_id"])["user_id"].unique()
    return [(int(rng.choice(users)), [int(i) for i in rng.choice(items, n_items, replace=False)])
            for _ in range(n_requests)]


# -- HTTP load generator ---------------------------------------------------------------------

def http_post(path: str, port: int, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def _exchange(reader, writer, req: bytes) -> bytes:
    """Send one request on a keep-alive connection; the body of its 200 answer."""
    writer.write(req)
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length)
    if status.split()[1:2] != [b"200"]:
        raise RuntimeError(f"{status.decode().strip()}: {body[:300]!r}")
    return body


async def _client(port: int, requests: list[bytes], out: list[float]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for req in requests:
            t0 = time.perf_counter()
            await _exchange(reader, writer, req)
            out.append((time.perf_counter() - t0) * 1e3)
    finally:
        writer.close()


async def _client_until(port: int, requests: list[bytes], first: int, stop: asyncio.Event,
                        out: list[tuple[float, float]]) -> None:
    """Requests in turn from `first` until `stop`; (send time, latency ms) of each."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        k = first
        while not stop.is_set():
            t0 = time.perf_counter()
            await _exchange(reader, writer, requests[k % len(requests)])
            out.append((t0, (time.perf_counter() - t0) * 1e3))
            k += 1
    finally:
        writer.close()


def load(port: int, requests: list[bytes], clients: int, per_client: int) -> tuple[list[float], float]:
    """`clients` concurrent connections, each sending `per_client` requests in turn (client c
    starts at request c, so concurrent requests differ); latencies (ms) and wall seconds."""
    async def run() -> list[float]:
        out: list[float] = []
        await asyncio.gather(*(
            _client(port, [requests[(c + k) % len(requests)] for k in range(per_client)], out)
            for c in range(clients)))
        return out
    t0 = time.perf_counter()
    out = asyncio.run(run())
    return out, time.perf_counter() - t0


def measure_http(port: int, requests: list[bytes], args, n_single: int, per_client: int) -> dict:
    single, _ = load(port, requests, 1, n_single)
    many, wall = load(port, requests, args.concurrency, per_client)
    return {"single_client": percentiles(single),
            f"{args.concurrency}_clients": {**percentiles(many),
                                            "throughput_rps": round(len(many) / wall, 1)}}


# -- servers ---------------------------------------------------------------------------------

def start(cmd: list[str], port: int, health: str, cwd: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:3]} exited with {proc.returncode}: "
                             f"{proc.stderr.read().decode()[-2000:]}")
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.sendall(f"GET {health} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                if s.recv(64).split()[1:2] == [b"200"]:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop(proc)
    raise SystemExit(f"{cmd[:3]} did not start in 180 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench_service(args, workers: int, pairs) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "ranking_service", "--repo", args.repo, "--model", args.model,
           "--port", str(port), "--workers", str(workers)] + (["--no-cache"] if args.no_cache else [])
    reqs = [http_post("/rank", port, {"user_id": u, "item_ids": items}) for u, items in pairs]
    proc = start(cmd, port, "/health", ROOT)
    try:
        first, _ = load(port, reqs, 1, len(reqs))  # fills one worker's feature cache
        load(port, reqs, args.concurrency, len(reqs))  # and, untimed, every worker's
        return {"first_pass": percentiles(first),
                **measure_http(port, reqs, args, args.requests, args.per_client)}
    finally:
        stop(proc)


# -- serving through a materialization ---------------------------------------------------------

async def _health(port: int) -> dict:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        return json.loads(await _exchange(
            reader, writer, f"GET /health HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()))
    finally:
        writer.close()


async def _window(port: int, requests: list[bytes], clients: int, during):
    """`clients` closed-loop clients running while `during()` runs: (send time, latency ms)
    of every request, when `during` started and ended, and what it returned."""
    stop, out = asyncio.Event(), []
    tasks = [asyncio.create_task(_client_until(port, requests, c, stop, out))
             for c in range(clients)]
    await asyncio.sleep(0.5)  # every client connected and running
    t0 = time.perf_counter()
    info = await during()
    t1 = time.perf_counter()
    stop.set()
    await asyncio.gather(*tasks)
    return out, t0, t1, info


def _figures(out: list[tuple[float, float]], t0: float, t1: float) -> dict:
    """Latency figures of the requests sent in [t0, t1]."""
    ms = [m for t, m in out if t0 <= t <= t1]
    return {**percentiles(ms), "seconds": round(t1 - t0, 2),
            "throughput_rps": round(len(ms) / (t1 - t0), 1)}


async def _materialize(args, port: int) -> dict:
    """`feast materialize` over everything, then wait until the service serves the new
    rows (its cache is fresh for a newer registry), then `--tail-s` more seconds."""
    gen0 = (await _health(port))["cache"]["generation"]
    feast = Path(sys.executable).parent / "feast"
    end = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    proc = await asyncio.create_subprocess_exec(
        "nice", "-n", str(args.materialize_nice),
        str(feast), "materialize", "1990-01-01T00:00:00", end, cwd=args.repo,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"feast materialize failed ({proc.returncode}): {err.decode()[-2000:]}")
    done = time.perf_counter()
    await asyncio.sleep(1.0)  # the service notices the last registry write (it polls at 0.5 s)
    while not ((cache := (await _health(port))["cache"])["fresh"] and cache["generation"] > gen0):
        await asyncio.sleep(0.1)
    fresh = time.perf_counter()
    await asyncio.sleep(args.tail_s)
    return {"materialized_at": done, "fresh_at": fresh,
            "registry_changes": cache["generation"] - gen0,
            "rows_refreshed_in_background": cache["refreshed_in_background"],
            "rows_fetched_on_request": cache["fetched_on_request"]}


def bench_materialization(args, refresh: str, pairs) -> dict:
    """/rank under `--concurrency` clients for `--baseline-s` seconds, then the same load
    while `feast materialize` runs and until the service is fresh, plus `--tail-s`: one
    worker, `--refresh <refresh>`, the cache warm at the start. Figures for the whole
    materialization window and for its two parts: while the materialize process runs
    (sharing the cores), and after it exits (the refresh: no other process competing)."""
    port = free_port()
    cmd = [sys.executable, "-m", "ranking_service", "--repo", args.repo, "--model", args.model,
           "--port", str(port), "--refresh", refresh]
    reqs = [http_post("/rank", port, {"user_id": u, "item_ids": items}) for u, items in pairs]
    proc = start(cmd, port, "/health", ROOT)
    try:
        load(port, reqs, 1, len(reqs))  # warm: every request's rows in the cache
        out, t0, t1, _ = asyncio.run(_window(port, reqs, args.concurrency,
                                             lambda: asyncio.sleep(args.baseline_s)))
        steady = _figures(out, t0, t1)
        out, t0, t1, info = asyncio.run(_window(port, reqs, args.concurrency,
                                                lambda: _materialize(args, port)))
    finally:
        stop(proc)
    done, fresh = info.pop("materialized_at"), info.pop("fresh_at")
    windows = {"during_materialization": _figures(out, t0, t1),
               "while_materialize_runs": _figures(out, t0, done),
               "after_materialize_exits": _figures(out, done, t1)}
    return {"without_materialization": steady, **windows,
            "materialize_nice": args.materialize_nice, "materialize_s": round(done - t0, 2),
            "fresh_after_materialize_s": round(fresh - done, 2), **info,
            "p99_ratios": {k: round(w["p99_ms"] / steady["p99_ms"], 2)
                           for k, w in windows.items()},
            "throughput_ratios": {k: round(w["throughput_rps"] / steady["throughput_rps"], 2)
                                  for k, w in windows.items()}}


def bench_feature_server(args, workers: int, refs: list[str], pairs) -> dict:
    port = free_port()
    feast = Path(sys.executable).parent / "feast"
    # Feast's defaults restart a worker every ~1000 requests; turned off to measure it at its best
    cmd = [str(feast), "serve", "--host", HOST, "--port", str(port), "--workers", str(workers),
           "--no-access-log", "--max-requests", "1000000000"]
    reqs = [http_post("/get-online-features", port,
                      {"features": refs, "entities": {"item_id": items, "user_id": [u] * len(items)}})
            for u, items in pairs]
    proc = start(cmd, port, "/health", Path(args.repo))
    try:
        load(port, reqs, args.concurrency, 2)  # warm-up, every worker
        return measure_http(port, reqs, args, args.reference_calls, args.reference_per_client)
    finally:
        stop(proc)


def bench_sdk(args, refs: list[str], pairs) -> dict:
    """get_online_features in this process: one caller, then `concurrency` threads."""
    from feast import FeatureStore
    store = FeatureStore(repo_path=args.repo)
    rows = [[{"user_id": u, "item_id": i} for i in items] for u, items in pairs]

    def calls(offset: int, n: int) -> list[float]:
        out = []
        for k in range(n):
            t0 = time.perf_counter()
            store.get_online_features(features=refs, entity_rows=rows[(offset + k) % len(rows)]).to_dict()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    calls(0, 10)  # warm-up
    single = calls(0, args.reference_calls)
    with ThreadPoolExecutor(args.concurrency) as pool:
        t0 = time.perf_counter()
        runs = list(pool.map(lambda c: calls(c, args.reference_per_client), range(args.concurrency)))
        wall = time.perf_counter() - t0
    many = [ms for run in runs for ms in run]
    return {"single_client": percentiles(single),
            f"{args.concurrency}_clients": {**percentiles(many),
                                            "throughput_rps": round(len(many) / wall, 1)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(ROOT / "feature_repo"))
    p.add_argument("--model", default=str(ROOT / "artifacts" / "ranker"))
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--distinct", type=int, default=200, help="distinct (user, candidates) requests")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="server processes; each setting is measured")
    p.add_argument("--requests", type=int, default=1000, help="single-client /rank requests")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--per-client", type=int, default=60, help="/rank requests per concurrent client")
    p.add_argument("--reference-calls", type=int, default=300,
                   help="single-client Feast calls (SDK and feature server)")
    p.add_argument("--reference-per-client", type=int, default=10,
                   help="Feast calls per concurrent client (SDK and feature server)")
    p.add_argument("--no-feature-server", action="store_true", help="skip `feast serve`")
    p.add_argument("--no-cache", action="store_true", help="service reads Feast per request")
    p.add_argument("--materialize", nargs="*", default=["background", "drop"],
                   choices=["background", "drop"],
                   help="--refresh modes to measure through a `feast materialize` of the "
                        "repo (it rewrites the repo's online store; none: skip)")
    p.add_argument("--materialize-nice", type=int, default=19,
                   help="niceness of the `feast materialize` process: 19 (default) lets it "
                        "use only the CPU the service leaves, as when it runs elsewhere; 0 "
                        "makes it compete for the same cores")
    p.add_argument("--baseline-s", type=float, default=10,
                   help="seconds of load without a materialization, before it")
    p.add_argument("--tail-s", type=float, default=3,
                   help="seconds of load kept after the service is fresh again")
    p.add_argument("--only-materialization", action="store_true",
                   help="measure only serving through a materialization")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    args.repo, args.model = str(Path(args.repo).resolve()), str(Path(args.model).resolve())

    from ranking_service.model import load as load_model
    fs = load_model(args.model).features
    refs = fs.item_refs() + fs.user_refs()
    pairs = pick_requests(Path(args.repo), args.distinct, args.candidates, args.seed)
    c = f"{args.concurrency}_clients"
    figures: dict = {"candidates": args.candidates, "distinct_requests": args.distinct,
                     "service_cache": not args.no_cache, "cpus": os.cpu_count()}
    if args.only_materialization:
        args.workers = []
    else:
        figures["feast_sdk_in_process"] = bench_sdk(args, refs, pairs)
    for w in args.workers:
        figures[f"rank_{w}_workers"] = bench_service(args, w, pairs)
        if not args.no_feature_server:
            figures[f"feast_feature_server_{w}_workers"] = bench_feature_server(args, w, refs, pairs)
    ratios = {}
    for w in args.workers:
        rank = figures[f"rank_{w}_workers"]
        for load_name in ("single_client", c):
            ratios[f"rank_{w}w_{load_name}_vs_sdk"] = round(
                rank[load_name]["p99_ms"] / figures["feast_sdk_in_process"][load_name]["p99_ms"], 3)
            if not args.no_feature_server:
                ratios[f"rank_{w}w_{load_name}_vs_feature_server_{w}w"] = round(
                    rank[load_name]["p99_ms"]
                    / figures[f"feast_feature_server_{w}_workers"][load_name]["p99_ms"], 3)
    if ratios:
        figures["p99_ratios"] = ratios  # target: every ratio <= 1
    for refresh in [] if args.no_cache else args.materialize:
        m = bench_materialization(args, refresh, pairs)
        figures[f"through_materialization_{refresh}"] = m
        base = m["without_materialization"]
        print(f"/rank, {args.concurrency} clients, --refresh {refresh}: without a "
              f"materialization p99 {base['p99_ms']} ms at {base['throughput_rps']} requests/s",
              file=sys.stderr)
        for window in ("during_materialization", "while_materialize_runs",
                       "after_materialize_exits"):
            w = m[window]
            print(f"  {window}: p99 {w['p99_ms']} ms at {w['throughput_rps']} requests/s "
                  f"(p99 ratio {m['p99_ratios'][window]}, throughput ratio "
                  f"{m['throughput_ratios'][window]})", file=sys.stderr)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
