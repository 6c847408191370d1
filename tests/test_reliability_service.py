"""The ranking service under load, with its Redis online store going away and back, and
through a materialization under load (the cache is refreshed in place)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from tests.redis_server import start_redis
from tests.service_process import start_service, stop_service
from tests.test_service import (REFRESH_WAIT_S, each_old_or_new, materialize_reset_item_stats,
                                online_scores, same_scores, scores_of)
from tests.test_train_ranker import _built, build_repo, copy_repo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The small trained repo, materialized into a dedicated redis-server, served by uvicorn."""
    base = tmp_path_factory.mktemp("svc_redis")
    build_repo(tmp_path_factory.mktemp("ranker"))
    repo = base / "feature_repo"
    copy_repo(_built["repo"], repo, materialize=False)  # into Redis, below
    rdir = base / "redis"
    rdir.mkdir()
    server, proc = start_redis(rdir)
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    config["online_store"] = {"type": "redis", "connection_string": server.connection_string}
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
    from feast import FeatureStore
    store = FeatureStore(repo_path=str(repo))
    store.materialize(datetime(1990, 1, 1, tzinfo=timezone.utc), datetime.now(timezone.utc))

    app, url = start_service(repo, _built["model"])
    ratings = pd.read_csv(_built["ratings"])
    state = {"url": url, "server": server, "proc": proc, "rdir": rdir, "repo": repo,
             "users": sorted(ratings["userId"].unique().tolist()),
             "items": ratings["movieId"].drop_duplicates().head(100).tolist(),
             "other_items": ratings["movieId"].drop_duplicates().iloc[100:].tolist()}
    yield state
    stop_service(app)
    state["proc"].terminate()
    state["proc"].wait(timeout=15)


def test_32_concurrent_clients_without_errors(service):
    users = service["users"][:20]
    body = lambda u: {"user_id": int(u), "item_ids": service["items"], "k": 10}  # noqa: E731

    def client(n: int) -> list[tuple[int, float]]:
        out = []
        with httpx.Client(base_url=service["url"], timeout=60) as http:
            for i in range(20):
                started = time.perf_counter()
                r = http.post("/rank", json=body(users[(n + i) % len(users)]))
                out.append((r.status_code, time.perf_counter() - started))
                assert len(r.json()["items"]) == 10
        return out

    with ThreadPoolExecutor(32) as pool:
        results = [x for chunk in pool.map(client, range(32)) for x in chunk]
    assert len(results) == 640
    assert [s for s, _ in results if s != 200] == []


def test_bad_requests_over_http_are_4xx(service):
    url = service["url"]
    user = int(service["users"][0])
    assert httpx.post(f"{url}/rank", content=b"{not json", timeout=10,
                      headers={"content-type": "application/json"}).status_code == 422
    assert httpx.post(f"{url}/rank", json={"user_id": user}, timeout=10).status_code == 422
    huge = {"user_id": user, "item_ids": list(range(100_000))}
    assert httpx.post(f"{url}/rank", json=huge, timeout=30).status_code == 422
    r = httpx.post(f"{url}/rank", json={"user_id": 10**9, "item_ids": [10**12, 1]}, timeout=10)
    assert r.status_code == 200 and r.json()["unknown_user"] is True


def test_redis_down_gives_503_and_the_service_recovers(service):
    url, server = service["url"], service["server"]
    fresh_user = int(service["users"][-1])  # never requested: not in the service's cache
    body = {"user_id": fresh_user, "item_ids": service["items"][:10]}
    client = server.client()
    client.shutdown(save=True)  # stop the server, keeping its data on disk for the restart
    service["proc"].wait(timeout=15)

    down = httpx.post(f"{url}/rank", json=body, timeout=60)
    assert down.status_code == 503
    assert "online store" in down.json()["detail"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # the service lives on

    _, service["proc"] = start_redis(service["rdir"], port=server.port)
    deadline = time.time() + 30
    while True:
        back = httpx.post(f"{url}/rank", json=body, timeout=60)
        if back.status_code == 200 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert back.status_code == 200
    assert back.json()["unknown_user"] is False  # the features are served again


def test_a_materialization_under_load_is_served_from_the_cache(service):
    """Eight clients keep asking while item_stats is materialized into Redis: every answer
    is a 200, every item's score is its old or its new one, the request path reads only ids
    it has never seen (the refresh thread re-reads the cached rows), and within a bounded
    wait every answer carries the new scores. A ninth client asks for unseen items all the
    while: Feast marks a view MATERIALIZING meanwhile, and the service must still read it."""
    url, items, repo = service["url"], service["items"], service["repo"]
    users = [int(u) for u in service["users"][:4]]
    unseen = iter(service["other_items"])
    with httpx.Client(base_url=url, timeout=60) as http:
        old = {u: scores_of(http.post("/rank", json={"user_id": u, "item_ids": items}))
               for u in users}  # also puts every user and item in the cache
        cache0 = http.get("/health").json()["cache"]
    answers: list[tuple[int, object]] = []
    novel: list[object] = []
    done = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not done.is_set():
                u = users[n % len(users)]
                answers.append((u, http.post("/rank", json={"user_id": u, "item_ids": items})))

    def novel_client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not done.is_set():
                fresh_ids = [i for _, i in zip(range(5), unseen)]
                if not fresh_ids:
                    break
                novel.append(http.post("/rank", json={"user_id": users[0], "item_ids": fresh_ids}))
                time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    threads.append(threading.Thread(target=novel_client))
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        materialize_reset_item_stats(repo, items)
        new = {u: online_scores(repo, _built["model"], items, user=u) for u in users}
        assert not same_scores(old[users[0]], new[users[0]])
        deadline = time.monotonic() + REFRESH_WAIT_S
        while len(answers) < 16 or not all(same_scores(scores_of(r), new[u])
                                           for u, r in answers[-16:]):
            assert time.monotonic() < deadline, f"not fresh after {REFRESH_WAIT_S} s"
            time.sleep(0.2)
        seen = len(answers)
        while len(answers) < seen + 64:
            time.sleep(0.05)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert [r.text for r in novel if r.status_code != 200] == []
    for u, r in answers:
        assert each_old_or_new(scores_of(r), old[u], new[u])
    assert all(same_scores(scores_of(r), new[u]) for u, r in answers[seen:])
    cache = httpx.get(f"{url}/health", timeout=10).json()["cache"]
    assert cache["fresh"]
    novel_ids = sum(len(r.json()["items"]) for r in novel)
    assert len(novel) > 10
    assert cache["fetched_on_request"] == cache0["fetched_on_request"] + novel_ids
    assert cache["refreshed_in_background"] >= len(items)
