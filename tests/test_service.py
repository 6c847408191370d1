"""The ranking service against the small real Feast repo of test_train_ranker: ranking,
defaults for unknown ids, 4xx for bad requests, 503 for an unreachable online store,
training/serving consistency, cache refresh after materialization, and a real uvicorn."""
from __future__ import annotations

import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from ranking_service import model as ranker_model
from ranking_service.app import MAX_CANDIDATES, create_app
from tests.service_process import start_service
from tests.test_train_ranker import build_repo, copy_repo

ROOT = Path(__file__).resolve().parent.parent
USER = 7


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    from tests.test_train_ranker import _built
    build_repo(tmp_path_factory.mktemp("ranker"))
    return _built


@pytest.fixture(scope="module")
def client(trained) -> TestClient:
    return TestClient(create_app(str(trained["repo"]), str(trained["model"])))


@pytest.fixture(scope="module")
def candidates(trained) -> list[int]:
    ratings = pd.read_csv(trained["ratings"])
    return ratings["movieId"].drop_duplicates().head(30).tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_sorts_scores_and_respects_k(client, candidates):
    full = client.post("/rank", json={"user_id": USER, "item_ids": candidates}).json()
    scores = [it["score"] for it in full["items"]]
    assert sorted(it["item_id"] for it in full["items"]) == sorted(candidates)
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    assert not full["unknown_user"] and full["unknown_items"] == []
    top = client.post("/rank", json={"user_id": USER, "item_ids": candidates, "k": 5}).json()
    assert top["items"] == full["items"][:5]
    assert client.get("/health").json()["status"] == "ok"


def test_unknown_ids_get_defaults_and_are_flagged(client, candidates):
    unknown_item = 10**12
    r = client.post("/rank", json={"user_id": 999_999, "item_ids": [*candidates[:3], unknown_item]})
    assert r.status_code == 200
    body = r.json()
    assert body["unknown_user"] is True and body["unknown_items"] == [unknown_item]
    assert len(body["items"]) == 4 and all(np.isfinite(it["score"]) for it in body["items"])


@pytest.mark.parametrize("payload, fragment", [
    ('{"user_id": 1, "item_ids": [1, 2', "JSON"),
    ({"item_ids": [1, 2]}, "user_id"),
    ({"user_id": 1}, "item_ids"),
    ({"user_id": "7", "item_ids": [1]}, "user_id"),
    ({"user_id": 1.5, "item_ids": [1]}, "user_id"),
    ({"user_id": 1, "item_ids": [1, "x"]}, "item_ids"),
    ({"user_id": 1, "item_ids": []}, "item_ids"),
    ({"user_id": 1, "item_ids": list(range(MAX_CANDIDATES + 1))}, "item_ids"),
    ({"user_id": 1, "item_ids": [1, 2], "k": 0}, "k"),
    ({"user_id": 2**63, "item_ids": [1]}, "user_id"),
    ({"user_id": 1, "item_ids": [3, 3]}, "repeat"),
    ({"user_id": 1, "item_ids": [1], "candidates": [2]}, "candidates"),
])
def test_bad_requests_get_4xx_with_a_reason(client, payload, fragment):
    if isinstance(payload, str):
        r = client.post("/rank", content=payload, headers={"content-type": "application/json"})
    else:
        r = client.post("/rank", json=payload)
    assert 400 <= r.status_code < 500
    assert fragment in r.text


def test_scores_equal_the_offline_model_on_point_in_time_rows(trained, client, candidates):
    """Serving reads the online store; training reads the offline store as of a time.
    As of now both hold the newest rows, so the model must score them identically."""
    from feast import FeatureStore
    ranker = ranker_model.load(trained["model"])
    fs = ranker.features
    entity = pd.DataFrame({"user_id": USER, "item_id": candidates,
                           "event_timestamp": pd.Timestamp.now(tz="UTC")})
    rows = FeatureStore(repo_path=str(trained["repo"])).get_historical_features(
        entity_df=entity, features=fs.item_refs() + fs.user_refs()).to_df()
    offline = dict(zip(rows["item_id"], ranker.predict(fs.matrix(rows))))
    served = client.post("/rank", json={"user_id": USER, "item_ids": candidates}).json()
    for it in served["items"]:
        assert it["score"] == pytest.approx(float(offline[it["item_id"]]), abs=1e-6)


def materialize_reset_item_stats(repo: Path, items: list[int]) -> None:
    """A newer item_stats row for every item: no ratings at all (as after a data reset)."""
    from feast import FeatureStore
    now = pd.Timestamp.now(tz="UTC").floor("s")
    stats = pd.DataFrame({"item_id": items, "event_timestamp": now,
                          "item_n_ratings": 0, "item_mean_rating": np.nan})
    stats.to_parquet(repo / "data" / "item_stats" / "part-zz-reset.parquet", index=False)
    time.sleep(0.01)
    FeatureStore(repo_path=str(repo)).materialize(
        now.to_pydatetime() - pd.Timedelta(seconds=1), datetime.now(timezone.utc),
        feature_views=["item_stats"])


def online_scores(repo: Path, model: Path, items: list[int]) -> dict[int, float]:
    """What the model gives the online store's current rows, scored offline."""
    from feast import FeatureStore
    ranker = ranker_model.load(model)
    fs = ranker.features
    rows = FeatureStore(repo_path=str(repo)).get_online_features(
        features=fs.item_refs() + fs.user_refs(),
        entity_rows=[{"user_id": USER, "item_id": i} for i in items]).to_df()
    return dict(zip(rows["item_id"], map(float, ranker.predict(fs.matrix(rows)))))


def test_cache_refreshes_after_a_new_materialization(trained, candidates, tmp_path):
    repo = tmp_path / "repo"
    copy_repo(trained["repo"], repo)
    app_client = TestClient(create_app(str(repo), str(trained["model"])))
    request = {"user_id": USER, "item_ids": candidates}
    before = {it["item_id"]: it["score"] for it in app_client.post("/rank", json=request).json()["items"]}
    materialize_reset_item_stats(repo, candidates)
    after = {it["item_id"]: it["score"] for it in app_client.post("/rank", json=request).json()["items"]}
    # the served scores are now those of the fresh online rows ...
    fresh = online_scores(repo, trained["model"], candidates)
    for i in candidates:
        assert after[i] == pytest.approx(fresh[i], abs=1e-6)
    # ... which differ from the cached ones served before
    assert any(abs(after[i] - before[i]) > 1e-6 for i in candidates)


def test_every_worker_serves_and_refreshes_its_own_cache(trained, candidates, tmp_path):
    """`--workers 2`: two processes, each with its own cache, each dropping it when the
    registry changes. A fresh connection lands on either worker; /health says which."""
    repo = tmp_path / "repo"
    copy_repo(trained["repo"], repo)
    request = {"user_id": USER, "item_ids": candidates}

    def by_worker(n: int) -> dict[int, list[dict[int, float]]]:
        seen: dict[int, list[dict[int, float]]] = {}
        for _ in range(n):
            with httpx.Client(base_url=url, timeout=30) as c:  # one connection, one worker
                pid = c.get("/health").json()["pid"]
                r = c.post("/rank", json=request)
                assert r.status_code == 200, f"worker {pid}: {r.status_code} {r.text}"
                items = r.json()["items"]
            seen.setdefault(pid, []).append({it["item_id"]: it["score"] for it in items})
        return seen

    proc, url = start_service(repo, trained["model"], "--workers", "2")
    try:
        before = by_worker(30)
        assert len(before) == 2, f"30 connections reached only workers {sorted(before)}"
        materialize_reset_item_stats(repo, candidates)
        after = by_worker(30)
        fresh = online_scores(repo, trained["model"], candidates)
        assert set(after) == set(before)
        for pid, answers in after.items():
            for scores in answers:
                assert scores == pytest.approx(fresh, abs=1e-6), f"worker {pid} served stale scores"
        old = before[next(iter(before))][0]
        assert any(abs(old[i] - fresh[i]) > 1e-6 for i in candidates)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_unreachable_online_store_is_a_503(trained, candidates, tmp_path):
    repo = tmp_path / "repo"
    copy_repo(trained["repo"], repo)
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    config["online_store"] = {"type": "redis",
                              "connection_string": f"127.0.0.1:{free_port()}"}  # nobody listens
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
    r = TestClient(create_app(str(repo), str(trained["model"]))).post(
        "/rank", json={"user_id": USER, "item_ids": candidates[:3]})
    assert r.status_code == 503 and "online store" in r.json()["detail"]


def test_startup_refuses_a_model_that_features_py_cannot_build(trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    meta = model / "ranker.json"
    meta.write_text(meta.read_text().replace('"n_buckets": 16', '"n_buckets": 8'))
    with pytest.raises(ranker_model.ModelError, match="features.py builds"):
        create_app(str(trained["repo"]), str(model))


def test_real_uvicorn_server(trained, candidates):
    proc, url = start_service(trained["repo"], trained["model"])
    try:
        r = httpx.post(f"{url}/rank", json={"user_id": USER, "item_ids": candidates, "k": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        assert httpx.post(f"{url}/rank", json={"user_id": USER, "item_ids": []}).status_code == 422
    finally:
        proc.terminate()
        proc.wait(timeout=30)
