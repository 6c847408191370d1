"""Semantic IDs: the residual quantiser (pure), its storage, and semantic_id() from SQL on the
packaged MiniLM: deterministic fits, stable codes across runs, code usage."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

import udfs
from udfs import semantic_ids as sid
from udfs.semantic_fit import fit_on, quantizer_for
from udfs.semantic_ids import QuantizerError
from udfs.spec import SemanticId, SpecError, parse_spec

from tests.conftest import SPEC_PATH

CONFIG = SemanticId(levels=3, codes=8, sample=40, seed=0)


def spec_with(**semantic) -> "udfs.Spec":
    data = yaml.safe_load(SPEC_PATH.read_text())
    data["semantic_id"] = semantic
    return parse_spec(data)


def clustered(n: int = 400, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Unit vectors around 12 directions, as item embeddings cluster by kind."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    x = centres[rng.integers(0, 12, n)] + 0.3 * rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- the quantiser, pure ---------------------------------------------------------------------

def test_fit_is_deterministic_and_assignment_does_not_depend_on_the_batch():
    x = clustered()
    config = SemanticId(levels=3, codes=16, sample=400, seed=7)
    a, b = sid.fit(x, config, "m", "fp"), sid.fit(x, config, "m", "fp")
    assert a.version == b.version and np.array_equal(a.centroids, b.centroids)
    codes = a.assign(x)
    assert codes.shape == (len(x), 3) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 16
    # the same vector gets the same codes alone, in any batch, in any order
    one_by_one = np.concatenate([a.assign(x[i:i + 1]) for i in range(0, 50)])
    np.testing.assert_array_equal(one_by_one, codes[:50])
    perm = np.random.default_rng(1).permutation(len(x))
    np.testing.assert_array_equal(a.assign(x[perm]), codes[perm])
    # residual quantisation: each level brings the reconstruction closer
    errors = []
    recon = np.zeros_like(x)
    for level in range(3):
        recon += a.centroids[level][codes[:, level]]
        errors.append(np.linalg.norm(x - recon, axis=1).mean())
    assert errors[0] > errors[1] > errors[2]
    # the version names the inputs: another seed, sample, model or setting is another one
    assert sid.fit(x, SemanticId(levels=3, codes=16, sample=400, seed=8), "m", "fp").version \
        != a.version
    assert sid.fit(x, config, "m", "other sample").version != a.version
    assert sid.fit(x, config, "another model", "fp").version != a.version
    # tokens: one per prefix, stable, and specific to the quantiser's version
    toks = a.tokens(codes[0])
    assert len(toks) == 3 and toks == sid.prefix_tokens(list(codes[0]), a.version)
    assert all(0 <= t < 2**63 for t in toks)
    assert sid.prefix_tokens(codes[0], "other")[0] != toks[0]
    same_prefix = np.flatnonzero((codes[:, 0] == codes[0, 0]) & (codes[:, 1] != codes[0, 1]))
    if len(same_prefix):
        assert a.tokens(codes[same_prefix[0]])[0] == toks[0]
        assert a.tokens(codes[same_prefix[0]])[1] != toks[1]


def test_usage_report_and_small_samples():
    x = clustered()
    q = sid.fit(x, SemanticId(levels=2, codes=16, sample=400), "m", "fp")
    u = q.meta["usage_on_sample"]
    assert u["items"] == len(x) and len(u["levels"]) == 2
    for level in u["levels"]:
        assert 1 <= level["used"] <= 16 and level["codes"] == 16
        assert 0 < level["entropy"] <= 1 and 1 <= level["perplexity"] <= 16
        assert 1 / 16 <= level["largest_share"] <= 1
    assert 1 <= u["distinct_paths"] <= len(x)
    assert "L1" in sid.describe_usage(u) and "distinct paths" in sid.describe_usage(u)
    # uniform use of every code is entropy 1, perplexity K
    flat = sid.usage([[c, 0] for c in range(8)] * 3, 8)
    assert flat["levels"][0] == {"level": 1, "used": 8, "codes": 8, "entropy": 1.0,
                                 "perplexity": 8.0, "largest_share": 0.125}
    assert flat["levels"][1]["entropy"] == 0.0 and flat["levels"][1]["largest_share"] == 1.0
    # fewer distinct vectors than codes: each is a code, and codes stay in range
    tiny = sid.fit(x[:5], SemanticId(levels=2, codes=16, sample=400), "m", "fp")
    assert tiny.sizes[0] == 5 and tiny.assign(x).max() < 16
    with pytest.raises(QuantizerError, match="no embeddings"):
        sid.fit(np.zeros((0, 4)), CONFIG, "m", "fp")
    with pytest.raises(QuantizerError, match="size 16"):
        q.assign(np.zeros((2, 3)))


def test_saved_quantisers_round_trip_and_are_found_by_settings_and_model(tmp_path):
    x = clustered()
    q = sid.fit(x, CONFIG, "embedding:m", "fp")
    path = sid.save(q, str(tmp_path / "table"))
    assert path == f"{tmp_path / 'table'}/_quantizers/{q.version}"
    loaded = sid.load(path)
    assert loaded == q and np.array_equal(loaded.assign(x), q.assign(x))
    assert loaded.meta["usage_on_sample"] == q.meta["usage_on_sample"]
    assert sid.find(str(tmp_path / "table"), CONFIG, "embedding:m") == q
    assert sid.find(str(tmp_path / "table"), CONFIG, "embedding:other") is None
    assert sid.find(str(tmp_path / "table"), SemanticId(levels=2, codes=8, sample=40),
                    "embedding:m") is None
    assert sid.find(str(tmp_path / "nothing"), CONFIG, "embedding:m") is None
    # a save that did not finish (no quantizer.json) is never read
    (tmp_path / "table" / "_quantizers" / "half").mkdir()
    assert [m["version"] for m in sid.saved(str(tmp_path / "table"))] == [q.version]
    # a damaged centroid file is refused
    np.save(f"{path}/centroids.npy", q.centroids + 1)
    with pytest.raises(QuantizerError, match="checksum"):
        sid.load(path)


def test_the_spec_section_is_validated():
    spec = spec_with(levels=2, codes=16)
    assert spec.semantic_id == SemanticId(levels=2, codes=16)
    assert spec_with().semantic_id == SemanticId()  # `semantic_id: {}`: the defaults
    assert spec.version != spec_with(levels=3, codes=16).version
    no_sid = yaml.safe_load(SPEC_PATH.read_text())
    no_sid.pop("semantic_id")
    assert parse_spec(no_sid).semantic_id is None
    for bad, message in (({"levels": 0}, r"semantic_id.levels: must be an integer in \[1, 8\]"),
                         ({"codes": "64"}, "semantic_id.codes: must be an integer"),
                         ({"codes": 64, "sample": 10}, "semantic_id.sample: must be at least"),
                         ({"depth": 3}, r"semantic_id: unknown keys \['depth'\]")):
        with pytest.raises(SpecError, match=message):
            spec_with(**bad)
    data = yaml.safe_load(SPEC_PATH.read_text())
    data["semantic_id"] = [3, 64]
    with pytest.raises(SpecError, match="semantic_id: must be a mapping"):
        parse_spec(data)
    data = yaml.safe_load(SPEC_PATH.read_text())
    data["attributes"]["semantic_id"] = data["attributes"].pop("audience")
    with pytest.raises(SpecError, match="'semantic_id' names the spec's semantic ID"):
        parse_spec(data)


# --- with Spark and the packaged MiniLM ------------------------------------------------------

@pytest.fixture(scope="module")
def catalogue(spark, items_small):
    df = items_small[["item_id", "title", "description"]].copy()
    extra = pd.DataFrame({"item_id": [-1, -2], "title": [None, "   "], "description": None})
    return spark.createDataFrame(pd.concat([df, extra], ignore_index=True))


@pytest.fixture(scope="module")
def fitted(catalogue, tmp_path_factory):
    spec = spec_with(levels=3, codes=8, sample=40, seed=0)
    root = str(tmp_path_factory.mktemp("sid") / "table")
    q, info = quantizer_for(catalogue, ["title"], spec, {"type": "embedding"}, table_root=root)
    return spec, root, q, info


def codes_from_sql(spark, catalogue, spec, q, partitions: int) -> pd.DataFrame:
    udfs.register(spark, spec, engine={"type": "embedding"}, quantizer=q)
    catalogue.repartition(partitions).createOrReplaceTempView("catalogue")
    out = spark.sql("SELECT item_id, semantic_id(title) AS s FROM catalogue").toPandas()
    return out.set_index("item_id").sort_index()


def test_semantic_id_from_sql_is_deterministic_and_reported(spark, catalogue, fitted):
    spec, root, q, info = fitted
    assert info["fitted"] and info["embedder"] == "embedding:all-MiniLM-L6-v2"
    # 40 drawn; an item without text is drawn but not embedded
    assert q.meta["sample_size"] + q.meta["sample_failed"] == 40 and q.sizes == (8, 8, 8)
    usage = q.meta["usage_on_sample"]
    assert usage["items"] == q.meta["sample_size"] >= 38 and [lv["codes"] for lv in usage["levels"]] == [8, 8, 8]
    first = codes_from_sql(spark, catalogue, spec, q, partitions=2)
    again = codes_from_sql(spark, catalogue, spec, q, partitions=3)  # other batches
    assert len(first) == catalogue.count()
    ok = first.index > 0
    for item, row in first[ok].iterrows():
        s = row["s"]
        assert s["error"] is None and s["version"] == q.version
        assert len(s["codes"]) == 3 and all(0 <= c < 8 for c in s["codes"])
        assert list(s["tokens"]) == q.tokens(s["codes"])
        assert list(again.loc[item, "s"]["codes"]) == list(s["codes"])
    for item in (-1, -2):  # no text: a row error, never an exception
        assert first.loc[item, "s"]["codes"] is None and "empty text" in first.loc[item, "s"]["error"]
    # the codes are the quantiser's assignment of the engine's embeddings
    from udfs.engines import build_engine
    titles = catalogue.where("item_id > 0").toPandas().set_index("item_id").sort_index()
    expected = q.assign(build_engine({"type": "embedding"}).embed(titles["title"].tolist()))
    got = np.array([list(s["codes"]) for s in first.loc[titles.index, "s"]])
    np.testing.assert_array_equal(got, expected)
    # code usage over the catalogue's SQL codes: what the report says is what was assigned
    u = sid.usage(list(got), 8)
    assert u["items"] == len(got) and u["distinct_paths"] == len({tuple(c) for c in got})
    for level, report in enumerate(u["levels"]):
        counts = np.bincount(got[:, level], minlength=8)
        assert report["used"] == int((counts > 0).sum())
        assert report["largest_share"] == round(counts.max() / len(got), 4)
    # k-means of 38 distinct titles into 8 codes spreads them: more than two effective codes
    # at the first level (a collapsed quantiser, one code for most items, would be ~1)
    assert u["levels"][0]["perplexity"] > 2


def test_refits_with_the_same_seed_and_sample_give_the_same_codes(spark, catalogue, fitted):
    spec, root, q, _ = fitted
    # reused when it is saved: the same quantiser, no fit
    again, info = quantizer_for(catalogue, ["title"], spec, {"type": "embedding"},
                                table_root=root)
    assert not info["fitted"] and again == q
    # refitted: the same sample and seed reproduce it (same version, same centroids)
    refit, info = quantizer_for(catalogue, ["title"], spec, {"type": "embedding"},
                                table_root=root, refit=True)
    assert info["fitted"] and info["reproduced"] and refit.version == q.version
    assert info["centroid_difference"] <= sid.REPRODUCE_TOLERANCE
    # an independent fit (nothing saved, other partitioning) assigns the same codes
    fresh = fit_on(catalogue.repartition(3), ["title"], spec.semantic_id, {"type": "embedding"})
    assert fresh.version == q.version
    assert np.abs(fresh.centroids - q.centroids).max() <= sid.REPRODUCE_TOLERANCE
    a = codes_from_sql(spark, catalogue, spec, q, partitions=2)
    b = codes_from_sql(spark, catalogue, spec, fresh, partitions=2)
    assert [list(s["codes"]) if s["codes"] is not None else None for s in a["s"]] == \
        [list(s["codes"]) if s["codes"] is not None else None for s in b["s"]]
    # another seed draws another sample: another quantiser
    other, info = quantizer_for(catalogue, ["title"], spec_with(levels=3, codes=8, sample=40,
                                                                seed=1),
                                {"type": "embedding"}, table_root=root)
    assert info["fitted"] and other.version != q.version
    assert len(sid.saved(root)) == 2


def test_annotate_all_carries_the_semantic_id_and_engines_that_cannot_embed_say_so(
        spark, catalogue, fitted):
    spec, _, q, _ = fitted
    udfs.register(spark, spec, engine={"type": "embedding"}, quantizer=q)
    catalogue.createOrReplaceTempView("catalogue")
    rows = spark.sql("SELECT item_id, annotate_all(title) AS a, semantic_id(title) AS s "
                     "FROM catalogue WHERE item_id > 0").collect()
    for r in rows:
        assert list(r.a.semantic_id) == list(r.s.codes) and r.a.semantic_id_version == q.version
        assert list(r.a.semantic_id_tokens) == list(r.s.tokens) and r.a.error is None
    # no quantiser given: a row error saying how to get one
    udfs.register(spark, spec, engine={"type": "embedding"}, prefix="bare_")
    # (a filter and collect(), not LIMIT/first(): a task whose output is not read to the end
    # loses its Python worker, and the worker's loaded engine with it)
    [row] = [r.s for r in spark.sql("SELECT bare_semantic_id(title) AS s FROM catalogue "
                                    "WHERE item_id = 1").collect()]
    assert row.codes is None and "no fitted semantic-ID quantiser" in row.error
    # an engine without embed(): a row error from SQL, and the fit refuses up front
    probe = {"type": "tests.faulty_engines:GpuProbe"}
    udfs.register(spark, spec, engine=probe, quantizer=q, prefix="probe_")
    [row] = [r.s for r in spark.sql("SELECT probe_semantic_id(title) AS s FROM catalogue "
                                    "WHERE item_id = 1").collect()]
    assert row.codes is None and "cannot embed" in row.error
    with pytest.raises(QuantizerError, match="cannot embed"):
        quantizer_for(catalogue, ["title"], spec, probe)
