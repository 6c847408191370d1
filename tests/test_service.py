"""The ranking service against the small real Feast repo of test_train_ranker: ranking,
defaults for unknown ids, 422 for bad requests (NaN and Infinity included, short answers),
503 for an unreachable online store, training/serving consistency, the cache refreshed in
place after a materialization, and a real uvicorn (keep-alive kept after bad bodies)."""
from __future__ import annotations

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from ranking_service import model as ranker_model
from ranking_service.app import MAX_BODY_BYTES, MAX_CANDIDATES, create_app
from tests.service_process import start_service, stop_service
from tests.test_train_ranker import build_repo, copy_repo

ROOT = Path(__file__).resolve().parent.parent
USER = 7
# After a materialization, answers carry the new rows once the refresh thread has re-read
# the cached ones: within its poll interval (0.5 s) plus the re-read, well under a second
# for these few rows; generous for a busy 2-core box.
REFRESH_WAIT_S = 30
# connections tried at most for both `--workers 2` processes to answer
MAX_CONNECTIONS = 400
# NaN / Infinity (which Python's json accepts) in each field, and 1e400 (a float overflow)
NON_FINITE_BODIES = [
    ('{"user_id": NaN, "item_ids": [1, 2]}', "user_id", "NaN"),
    ('{"user_id": 1, "item_ids": [1, Infinity]}', "item_ids", "Infinity"),
    ('{"user_id": 1, "item_ids": [-Infinity]}', "item_ids", "-Infinity"),
    ('{"user_id": 1, "item_ids": [1, 2], "k": NaN}', "k", "NaN"),
    ('{"user_id": 1e400, "item_ids": [1]}', "user_id", "Infinity"),
    ('{"user_id": 1, "item_ids": [1], "extra": [NaN]}', "extra", "NaN"),
]


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
    assert r.status_code == 422
    assert fragment in r.text


@pytest.mark.parametrize("body, field, spelled", NON_FINITE_BODIES)
def test_nan_and_infinity_get_a_422_naming_the_field(client, body, field, spelled):
    r = client.post("/rank", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    assert problem["loc"][:2] == ["body", field]
    assert spelled in problem["input"] and len(r.content) < 500


@pytest.mark.parametrize("body, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),    # json: RecursionError
    ('{"user_id": 1, "item_ids": [%s]}' % ("9" * 5000), "digits"),  # json: int too long
    (b'{"user_id": 1, "item_ids": [1\xff]}', "JSON"),
])
def test_bodies_python_json_cannot_read_get_a_422(client, body, fragment):
    r = client.post("/rank", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and fragment in r.text and len(r.content) < 500


def test_a_422_quotes_only_an_excerpt_of_a_large_body(client):
    ids = list(range(120_000))  # 0.8 MB of JSON, under the body limit
    r = client.post("/rank", json={"user_id": 1, "item_ids": ids})
    assert r.status_code == 422 and len(r.content) < 2_000, len(r.content)
    (problem,) = r.json()["detail"]
    assert problem["loc"] == ["body", "item_ids"] and "120000" in problem["msg"]
    assert problem["input"].startswith("[0, 1, 2") and problem["input"].endswith("120000 items]")
    # a thousand wrong ids: the first few are shown, the rest counted
    r = client.post("/rank", json={"user_id": 1, "item_ids": [f"x{i}" * 200 for i in range(1000)]})
    assert r.status_code == 422 and len(r.content) < 2_000, len(r.content)
    assert len(r.json()["detail"]) == 5 and r.json()["more_errors"] == 995
    # a repeated id is located, not just reported
    r = client.post("/rank", json={"user_id": 1, "item_ids": [5, 6, 7, 6]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "item_ids", 3] and "index 1" in r.text


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


def online_scores(repo: Path, model: Path, items: list[int], user: int = USER) -> dict[int, float]:
    """What the model gives the online store's current rows, scored offline."""
    from feast import FeatureStore
    ranker = ranker_model.load(model)
    fs = ranker.features
    rows = FeatureStore(repo_path=str(repo)).get_online_features(
        features=fs.item_refs() + fs.user_refs(),
        entity_rows=[{"user_id": user, "item_id": i} for i in items]).to_df()
    return dict(zip(rows["item_id"], map(float, ranker.predict(fs.matrix(rows)))))


def same_scores(a: dict[int, float], b: dict[int, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[i] - b[i]) <= 1e-6 for i in a)


def each_old_or_new(scores: dict[int, float], old: dict[int, float],
                    new: dict[int, float]) -> bool:
    """During a refresh an answer may mix items scored on old and on new rows, but every
    item's score is one of the two (its row is never half-encoded)."""
    return all(min(abs(s - old[i]), abs(s - new[i])) <= 1e-6 for i, s in scores.items())


def scores_of(response) -> dict[int, float]:
    assert response.status_code == 200, response.text
    return {it["item_id"]: it["score"] for it in response.json()["items"]}


def test_cache_refreshes_in_place_after_a_new_materialization(trained, candidates, tmp_path):
    """The default refresh: the cached rows are re-read by a background thread and swapped
    in; requests meanwhile get the old rows, never a re-fetch on the request path."""
    repo = tmp_path / "repo"
    copy_repo(trained["repo"], repo)
    app_client = TestClient(create_app(str(repo), str(trained["model"])))
    request = {"user_id": USER, "item_ids": candidates}
    before = scores_of(app_client.post("/rank", json=request))
    cache0 = app_client.get("/health").json()["cache"]
    assert cache0["fresh"] and cache0["rows"] == {"item_id": len(candidates), "user_id": 1}
    materialize_reset_item_stats(repo, candidates)
    fresh = online_scores(repo, trained["model"], candidates)
    assert not same_scores(before, fresh)  # the materialization changed the scores
    deadline = time.monotonic() + REFRESH_WAIT_S
    while True:
        after = scores_of(app_client.post("/rank", json=request))
        assert each_old_or_new(after, before, fresh)
        cache = app_client.get("/health").json()["cache"]
        if same_scores(after, fresh) and cache["fresh"]:
            break
        assert time.monotonic() < deadline, f"not fresh after {REFRESH_WAIT_S} s: {cache}"
        time.sleep(0.05)
    assert cache["generation"] > cache0["generation"]
    # every cached row was re-read in the background, none on the request path
    assert cache["fetched_on_request"] == cache0["fetched_on_request"]
    assert cache["refreshed_in_background"] >= len(candidates)  # user_stats: unchanged
    assert scores_of(app_client.post("/rank", json=request)) == after


def test_drop_refresh_serves_fresh_rows_at_once(trained, candidates, tmp_path):
    """`--refresh drop`: the first request after the change re-reads what it needs."""
    repo = tmp_path / "repo"
    copy_repo(trained["repo"], repo)
    app_client = TestClient(create_app(str(repo), str(trained["model"]), refresh="drop"))
    request = {"user_id": USER, "item_ids": candidates}
    before = scores_of(app_client.post("/rank", json=request))
    fetched = app_client.get("/health").json()["cache"]["fetched_on_request"]
    materialize_reset_item_stats(repo, candidates)
    after = scores_of(app_client.post("/rank", json=request))
    assert same_scores(after, online_scores(repo, trained["model"], candidates))
    assert not same_scores(after, before)
    cache = app_client.get("/health").json()["cache"]
    assert cache["fetched_on_request"] == fetched + len(candidates) + 1
    assert cache["refreshed_in_background"] == 0


def test_every_worker_serves_and_refreshes_its_own_cache(trained, candidates, tmp_path):
    """`--workers 2`: two processes, each with its own cache, each refreshing it when the
    registry changes. A fresh connection lands on either worker; /health says which."""
    repo = tmp_path / "repo"
    copy_repo(trained["repo"], repo)
    request = {"user_id": USER, "item_ids": candidates}

    def one_connection() -> tuple[int, dict[int, float]]:
        with httpx.Client(base_url=url, timeout=30) as c:  # one connection, one worker
            pid = c.get("/health").json()["pid"]
            r = c.post("/rank", json=request)
            assert r.status_code == 200, f"worker {pid}: {r.status_code} {r.text}"
            return pid, {it["item_id"]: it["score"] for it in r.json()["items"]}

    def by_worker(n: int) -> dict[int, list[dict[int, float]]]:
        """At least n connections, 8 at a time, until both workers have answered (bounded).
        The kernel gives a connection to whichever worker accepts first: sequential
        connections can all land on one idle worker, concurrent ones reach the other."""
        seen: dict[int, list[dict[int, float]]] = {}
        made = 0
        with ThreadPoolExecutor(8) as pool:
            while made < n or (len(seen) < 2 and made < MAX_CONNECTIONS):
                for pid, scores in pool.map(lambda _: one_connection(), range(8)):
                    seen.setdefault(pid, []).append(scores)
                made += 8
        return seen

    proc, url = start_service(repo, trained["model"], "--workers", "2")
    try:
        before = by_worker(32)
        assert len(before) == 2, (f"{MAX_CONNECTIONS} connections reached only workers "
                                  f"{sorted(before)}")
        old = before[next(iter(before))][0]
        materialize_reset_item_stats(repo, candidates)
        fresh = online_scores(repo, trained["model"], candidates)
        assert not same_scores(old, fresh)
        # each worker refreshes in the background: wait (bounded) until both answer fresh
        deadline = time.monotonic() + REFRESH_WAIT_S
        while True:
            recent = by_worker(8)
            answers = [a for run in recent.values() for a in run]
            assert all(each_old_or_new(a, old, fresh) for a in answers)
            if len(recent) == 2 and all(same_scores(a, fresh) for a in answers):
                break
            assert time.monotonic() < deadline, f"workers not fresh after {REFRESH_WAIT_S} s"
            time.sleep(0.2)
        after = by_worker(32)
        assert set(after) == set(before)
        for pid, answers in after.items():
            for scores in answers:
                assert scores == pytest.approx(fresh, abs=1e-6), f"worker {pid} served stale scores"
    finally:
        stop_service(proc)


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
        stop_service(proc)


def test_bad_bodies_keep_the_connection_and_log_no_traceback(trained, candidates):
    """Over one keep-alive connection: each bad body gets a short 422 and the next good
    request is answered on the same connection (a 500 used to drop it)."""
    large = json.dumps({"user_id": USER, "item_ids": list(range(120_000))})  # 0.8 MB
    bad = [b for b, _, _ in NON_FINITE_BODIES] + [large, '{"user_id": 1, "item_ids": [1, 2']
    good = {"user_id": USER, "item_ids": candidates, "k": 3}
    proc, url = start_service(trained["repo"], trained["model"])
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            first = http.post("/rank", json=good)
            assert first.status_code == 200
            local = first.extensions["network_stream"].get_extra_info("client_addr")
            for body in bad:
                r = http.post("/rank", content=body, headers={"content-type": "application/json"})
                assert r.status_code == 422 and len(r.content) < 2_000, (body[:80], r.text[:300])
                ok = http.post("/rank", json=good)
                assert ok.status_code == 200 and ok.json() == first.json()
                assert ok.extensions["network_stream"].get_extra_info("client_addr") == local
    finally:
        stderr = stop_service(proc)
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr[-3000:]


def test_a_body_over_the_limit_is_a_413_before_it_is_read(client, trained, candidates):
    """A 5 MB body is refused by its Content-Length, and a chunked one (no length) as soon
    as it passes the limit, without the server buffering the rest; the answer is short
    and says the limit; the server stays up and logs no traceback."""
    huge = json.dumps({"user_id": USER, "item_ids": list(range(650_000))}).encode()  # 5 MB
    assert len(huge) > MAX_BODY_BYTES
    r = client.post("/rank", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and len(r.content) < 500 and f"{MAX_BODY_BYTES:,}" in r.text

    sent = []

    def chunks():  # 64 kB at a time, 80 MB if nobody stops it
        for _ in range(1280):
            sent.append(1)
            yield b" " * 65_536

    good = {"user_id": USER, "item_ids": candidates, "k": 3}
    proc, url = start_service(trained["repo"], trained["model"])
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/rank", content=huge, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "bytes declared" in r.text, r.text
            assert r.headers["connection"] == "close"
        with httpx.Client(base_url=url, timeout=30) as http:
            try:
                r = http.post("/rank", content=chunks(), headers={"content-type": "application/json"})
                assert r.status_code == 413 and "bytes sent" in r.text, r.text
            except httpx.TransportError:  # the server may close before the client is done sending
                pass
            assert len(sent) < 1280, "the whole chunked body was sent: nothing stopped it"
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/rank", json=good).status_code == 200
    finally:
        stderr = stop_service(proc)
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr[-3000:]
