"""The ranking service under load and with its Redis online store going away and back."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from tests.redis_server import start_redis
from tests.service_process import start_service
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
    state = {"url": url, "server": server, "proc": proc, "rdir": rdir,
             "users": sorted(ratings["userId"].unique().tolist()),
             "items": ratings["movieId"].drop_duplicates().head(100).tolist()}
    yield state
    os.killpg(app.pid, signal.SIGTERM)
    app.wait(timeout=30)
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
