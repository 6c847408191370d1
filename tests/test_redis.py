"""The gate on the local engine in front of a Redis online store: a real redis-server.

The repo copy keeps the embedded config (DuckDB offline store, Feast's local engine behind
the gate) and swaps the online store for Redis on the fixture's port. The production
config (Spark offline store, Feast's Spark engine, Redis) is tests/test_production.py,
which also runs the refusal through the CLI; here it runs in-process, on the same engine.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import yaml
from feast import FeatureStore

from expectations.feast_engine import GateRefused
from tests.redis_server import redis_server  # noqa: F401  (the session fixture)
from tests.test_feast_gate import WINDOW, feast, make_repo, online, write_tables
from tests.test_gate import annotation_frame, item_stats_frame


def snapshot(client) -> dict[bytes, bytes]:
    """Every key with its serialized value: equal snapshots mean an unchanged store."""
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}


@pytest.fixture(scope="module")
def redis_repo(tmp_path_factory, redis_server):  # noqa: F811
    repo = make_repo(tmp_path_factory.mktemp("redis_gate"))
    config_path = repo / "feature_store.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["online_store"] = {"type": "redis",
                              "connection_string": redis_server.connection_string}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    good = annotation_frame(seed=5)
    write_tables(repo, good)
    for command in (["apply"], ["materialize", *WINDOW]):
        proc = feast(repo, *command)
        assert proc.returncode == 0, proc.stderr
    return repo, good


def test_materialized_features_are_read_back_from_redis(redis_repo, redis_server):  # noqa: F811
    repo, good = redis_repo
    assert snapshot(redis_server.client())  # the features really are in this Redis
    ids = [3, 4, 150]
    served = online(repo, ids, ["item_annotations:vibe_label",
                                "item_annotations:audience_confidence",
                                "item_stats:item_mean_rating"])
    expected = good.set_index("item_id").loc[ids]
    assert served["vibe_label"] == expected["vibe_label"].tolist()
    assert served["audience_confidence"] == pytest.approx(expected["audience_confidence"].tolist())
    assert served["item_mean_rating"] == pytest.approx(
        item_stats_frame().set_index("item_id").loc[ids, "item_mean_rating"].tolist())


def test_refused_materialize_leaves_redis_unchanged(redis_repo, redis_server):  # noqa: F811
    repo, good = redis_repo
    client = redis_server.client()
    bad = annotation_frame(seed=6)
    bad.loc[0, "audience_label"] = "toddlers"
    write_tables(repo, bad)
    before = snapshot(client)

    with pytest.raises(GateRefused) as refused:
        FeatureStore(repo_path=str(repo)).materialize(
            *(datetime.fromisoformat(t).replace(tzinfo=timezone.utc) for t in WINDOW))

    assert "expect_column_values_to_be_in_set(audience_label)" in refused.value.message
    assert snapshot(client) == before and before
    served = online(repo, [1, 2], ["item_annotations:audience_label"])
    assert served["audience_label"] == good.set_index("item_id").loc[[1, 2],
                                                                     "audience_label"].tolist()
