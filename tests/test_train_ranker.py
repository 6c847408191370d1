"""The ranker's training job on a small real Feast repo: point-in-time historical features,
the ablation (six variants, rolling time folds, cold-start figures), and the saved model.

The repo is a temp copy of feature_repo/ with 40 MovieLens users, the build_features
tables, the catalogue's item_metadata (genres) and a synthetic item_annotations table
(semantic IDs included); `feast apply` runs through the real CLI.
"""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ranking_service import model as ranker_model
from ranking_service.features import VARIANTS, FeatureSet
from spark_jobs import build_features, movielens, train_ranker
from udfs.schema import AnnotationSchema
from udfs.semantic_ids import prefix_tokens
from udfs.spec import load_spec
from udfs.table import FeatureTable, read_latest
from udfs.tokens import caption_tokens

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "specs" / "movielens.yaml"
RATINGS = ROOT / "data" / "movielens" / "ratings.csv"
N_USERS = 40
RELABELLED = 1  # Toy Story: annotated twice, the first time with an engine error
FOLDS = 2
_built: dict[str, Path] = {}


def _annotations(ratings: pd.DataFrame) -> pd.DataFrame:
    """One annotation per rated item, available from its first rating (as the demo's
    annotate job stamps them); vibe follows the first genre, the caption is the genres."""
    spec = load_spec(SPEC_PATH)
    vibes, audiences = spec.attributes["vibe"].labels, spec.attributes["audience"].labels
    genre_vibe = {"Horror": "dark", "Crime": "dark", "Comedy": "light-hearted",
                  "Romance": "romantic", "Action": "thrilling", "Thriller": "thrilling",
                  "Drama": "thoughtful", "Animation": "whimsical", "Children": "whimsical"}
    movies = pd.read_csv(ROOT / "data" / "movielens" / "movies.csv").set_index("movieId")
    first = ratings.groupby("item_id")["ts"].min()
    genres = movies.loc[first.index, "genres"].str.split("|")
    rng = np.random.default_rng(1)
    vibe = [next((genre_vibe[g] for g in gs if g in genre_vibe), vibes[i % len(vibes)])
            for i, gs in enumerate(genres)]
    captions = [" ".join(gs).lower() for gs in genres]
    n = len(first)
    # a semantic ID that follows the genres, as an embedding's would: level 1 the first
    # genre, level 2 the second, level 3 the item's id
    names = sorted({g for gs in genres for g in gs})
    sids = [[names.index(gs[0]) % spec.semantic_id.codes,
             names.index(gs[-1]) % spec.semantic_id.codes, int(i) % spec.semantic_id.codes]
            for gs, i in zip(genres, first.index)][:n]
    return pd.DataFrame({
        "item_id": first.index.astype("int64"),
        "event_timestamp": pd.to_datetime(first.to_numpy(), unit="s", utc=True),
        "created_timestamp": pd.Timestamp("2024-01-01", tz="UTC"),
        "vibe_label": vibe, "vibe_confidence": rng.uniform(0.2, 1, n),
        "audience_label": [audiences[i % 3] for i in range(n)],
        "audience_confidence": rng.uniform(0.3, 1, n),
        "caption": captions, "caption_tokens": [caption_tokens(c) for c in captions],
        "model": "test:genre-rules", "spec_version": spec.version,
        "content_hash": [f"h{i}" for i in first.index], "error": None,
        "labelled_by": "head", "caption_version": spec.caption.version,
        **{f"{a}_version": attr.version for a, attr in spec.attributes.items()},
        "semantic_id": sids, "semantic_id_tokens": [prefix_tokens(c, "q-test") for c in sids],
        "semantic_id_version": "q-test",
    })


def _store_yaml(src: Path) -> dict:
    """The repo's feature_store.yaml for a copy elsewhere: the batch engine's paths out of
    the repo made absolute, or the engine dropped if its module does not import."""
    config = yaml.safe_load(src.read_text())
    engine = config.get("batch_engine")
    if isinstance(engine, dict) and "." in str(engine.get("type", "")):
        try:
            importlib.import_module(engine["type"].rsplit(".", 1)[0])
        except ImportError:
            config.pop("batch_engine")
        else:
            for key, value in engine.items():
                if isinstance(value, str) and value.startswith("../"):
                    engine[key] = str((src.parent / value).resolve())
    return config


def _relabel_midway(ann: pd.DataFrame, ratings: pd.DataFrame) -> pd.DataFrame:
    """Item RELABELLED: its first annotation failed (null labels, error set); a second
    one, available from the middle of its interactions, labels it."""
    ts = np.sort(ratings.loc[ratings["item_id"] == RELABELLED, "ts"].unique())
    midway = pd.Timestamp(int(ts[len(ts) // 2]), unit="s", tz="UTC")
    first = ann["item_id"] == RELABELLED
    failed = ann[first].assign(vibe_label=None, vibe_confidence=np.nan, audience_label=None,
                               audience_confidence=np.nan, caption=None, caption_tokens=None,
                               semantic_id=None, semantic_id_tokens=None,
                               error="engine: timeout")
    fixed = ann[first].assign(event_timestamp=midway, vibe_label="whimsical",
                              created_timestamp=pd.Timestamp("2024-02-01", tz="UTC"))
    return pd.concat([ann[~first], failed, fixed], ignore_index=True)


def feast_apply(repo: Path) -> None:
    feast = Path(sys.executable).parent / "feast"
    subprocess.run([str(feast), "apply"], cwd=repo, check=True, capture_output=True)


def copy_repo(src: Path, dst: Path, materialize: bool = True) -> Path:
    """A built repo copied with its data but not its registry or online store, then applied
    (and materialized) afresh: the sources are absolute paths, and applying a copied
    registry would also drop the original's online tables (Feast's infra diff)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("registry.db", "online_store.db"))
    if not (dst.parent / "specs").exists():  # definitions.py reads ../specs
        shutil.copytree(src.parent / "specs", dst.parent / "specs")
    feast_apply(dst)
    if materialize:
        from feast import FeatureStore
        FeatureStore(repo_path=str(dst)).materialize(
            datetime(1990, 1, 1, tzinfo=timezone.utc), datetime.now(timezone.utc))
    return dst


def build_repo(root: Path) -> Path:
    """A materialized small Feast repo and a model trained on it (built once per session)."""
    if "repo" in _built:
        return _built["repo"]
    repo, data = root / "feature_repo", root / "feature_repo" / "data"
    data.mkdir(parents=True)
    shutil.copy(ROOT / "feature_repo" / "definitions.py", repo)
    shutil.copytree(ROOT / "specs", root / "specs")  # definitions.py reads ../specs
    (repo / "feature_store.yaml").write_text(
        yaml.safe_dump(_store_yaml(ROOT / "feature_repo" / "feature_store.yaml")))
    raw = pd.read_csv(RATINGS)
    raw = raw[raw["userId"] <= N_USERS]
    raw.to_csv(root / "ratings.csv", index=False)
    ratings = build_features.read_ratings(root / "ratings.csv")
    ann = _relabel_midway(_annotations(ratings), ratings)
    FeatureTable(str(data / "item_annotations")).write_frame(
        ann, AnnotationSchema(load_spec(SPEC_PATH)))
    items = movielens.load_items()
    movielens.write_metadata(items[items["item_id"].isin(ratings["item_id"])],
                             data / "item_metadata")
    assert build_features.main(["--ratings", str(root / "ratings.csv"), "--annotations",
                                str(data / "item_annotations"), "--out", str(data),
                                "--spec", str(SPEC_PATH)]) == 0
    feast_apply(repo)
    from feast import FeatureStore
    FeatureStore(repo_path=str(repo)).materialize(
        datetime(1990, 1, 1, tzinfo=timezone.utc), datetime.now(timezone.utc))
    assert train_ranker.main(["--repo", str(repo), "--ratings", str(root / "ratings.csv"),
                              "--spec", str(SPEC_PATH), "--out", str(root / "ranker"),
                              "--n-buckets", "16", "--bootstrap", "200", "--max-users", "0",
                              "--folds", str(FOLDS), "--fold-fraction", "0.15"]) == 0
    _built.update(repo=repo, model=root / "ranker", ratings=root / "ratings.csv")
    return repo


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    build_repo(tmp_path_factory.mktemp("ranker"))
    return _built


def test_training_writes_model_ablation_and_plot(trained):
    out = trained["model"]
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["variants"]) == list(VARIANTS) == [
        "baseline", "genres", "attributes", "captions", "semantic_ids", "all"]
    sizes = {v: r["n_features"] for v, r in report["variants"].items()}
    assert sizes["baseline"] < sizes["genres"] < min(sizes[v] for v in (
        "attributes", "captions", "semantic_ids")) <= sizes["all"]
    assert sizes["semantic_ids"] == sizes["genres"] + load_spec(SPEC_PATH).semantic_id.levels
    assert report["genres"] and "Comedy" in report["genres"]
    proto = report["protocol"]
    assert proto["reference"] == "genres" and proto["served_variant"] == "all"
    assert proto["folds"] == FOLDS and proto["cold_min_ratings"] == 5
    for name, v in report["variants"].items():
        for subset in ("overall", "cold_start"):
            m = v[subset]
            lo, hi = m["ndcg@10"]["ci95"]
            assert 0 <= lo <= m["ndcg@10"]["mean"] <= hi <= 1, (name, subset)
            lo, hi = m["auc_liked"]["ci95"]
            assert 0 <= lo <= hi <= 1 and 0 <= m["auc_liked"]["mean"] <= 1, (name, subset)
            if name == "genres":
                assert "ndcg@10_vs_genres" not in m
            else:  # paired gains over the genres variant
                for key in ("ndcg@10_vs_genres", "auc_liked_vs_genres"):
                    lo, hi = m[key]["ci95"]
                    assert lo <= m[key]["mean"] <= hi and -1 <= lo <= hi <= 1, (name, key)
        assert v["cold_start"]["interactions"] == report["cold_start_interactions"]
        assert v["overall"]["interactions"] == report["test_interactions"]
        assert v["cold_start"]["ndcg_units"] <= v["overall"]["ndcg_units"]
    # folds: consecutive test windows, each trained on everything before it
    folds = report["folds"]
    assert len(folds) == FOLDS
    assert [f["cutoff"] for f in folds] == sorted(f["cutoff"] for f in folds)
    assert folds[0]["end"] == folds[1]["cutoff"] and folds[-1]["end"] is None
    assert folds[1]["train_interactions"] == folds[0]["train_interactions"] + \
        folds[0]["test_interactions"]
    n = len(pd.read_csv(trained["ratings"]))
    assert report["test_interactions"] == sum(f["test_interactions"] for f in folds)
    assert report["test_interactions"] == pytest.approx(FOLDS * 0.15 * n, rel=0.1)
    assert 0 < report["cold_start_interactions"] < report["test_interactions"]
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ranker = ranker_model.load(out)
    assert ranker.features.variant == "all" and ranker.features.n_buckets == 16
    assert ranker.features.genres == tuple(report["genres"])
    assert ranker.features.semantic_levels == 3
    assert ranker.meta["spec_version"] == load_spec(SPEC_PATH).version
    assert ranker.meta["variants"] == report["variants"]


def test_the_report_says_what_the_model_leans_on_and_what_the_genres_already_say(trained):
    report = json.loads((trained["model"] / "ablation.json").read_text())
    gains = report["served_gain_by_group"]
    assert list(gains) == ["stats", "genres", "attributes", "captions", "semantic_ids"]
    assert sum(gains.values()) == pytest.approx(1.0, abs=1e-3) and gains["stats"] > 0
    ranker = ranker_model.load(trained["model"])
    by_column = ranker.booster.get_score(importance_type="total_gain")
    genre_cols = [c for c in by_column if c.startswith("genre_")]
    assert gains["genres"] == pytest.approx(
        sum(by_column[c] for c in genre_cols) / sum(by_column.values()), abs=1e-4)
    redundancy = report["genre_redundancy"]
    assert set(redundancy) == {"vibe", "audience"}  # the spec's single-label attributes
    for r in redundancy.values():
        assert 0 <= r["accuracy_from_genres"] <= 1 and 0 < r["majority_share"] <= 1


def test_genre_redundancy_on_a_known_case():
    """An attribute that is a function of the genres is predicted from them; one drawn at
    random is predicted no better than its commonest label."""
    rng = np.random.default_rng(0)
    genres = rng.choice(["Horror", "Comedy", "Drama|Romance", "Horror|Thriller"], 400)
    rows = pd.DataFrame({
        "item_id": np.arange(400), "event_timestamp": pd.Timestamp("2020-01-01", tz="UTC"),
        "genres": genres,
        "vibe_label": np.where(pd.Series(genres).str.contains("Horror"), "dark", "romantic"),
        "audience_label": rng.choice(["kids", "adults"], 400)})
    full = FeatureSet((("vibe", ("dark", "romantic")), ("audience", ("kids", "adults"))),
                      genres=("Comedy", "Drama", "Horror", "Romance", "Thriller"))
    out = train_ranker.genre_redundancy(rows, full)
    assert out["vibe"]["accuracy_from_genres"] == 1.0
    assert out["audience"]["accuracy_from_genres"] <= out["audience"]["majority_share"] + 0.05
    assert out["vibe"]["items"] == 400


def test_cold_start_and_paired_metrics_on_a_known_case():
    """A perfect and a reversed scorer on two folds: the metrics, their gains over the
    reference and the cold-start subset are what they must be."""
    rng = np.random.default_rng(0)
    tests, cold = [], []
    for f in range(2):
        users = np.repeat(np.arange(20) + 10 * f, 8)  # users 10..19 are in both folds
        rating = rng.integers(1, 11, len(users)) / 2
        tests.append(pd.DataFrame({"user_id": users, "rating": rating}))
        cold.append(np.arange(len(users)) % 2 == 0)
    scores = {"genres": [t["rating"].to_numpy() for t in tests],  # perfect
              "all": [-t["rating"].to_numpy() for t in tests]}     # reversed
    m = train_ranker.ablation_metrics(tests, scores, cold, draws=200, seed=0)
    perfect, reversed_ = m["genres"], m["all"]
    assert perfect["overall"]["ndcg@10"]["mean"] == pytest.approx(1.0)
    assert perfect["overall"]["ndcg@10"]["ci95"] == pytest.approx([1.0, 1.0])
    assert perfect["overall"]["auc_liked"]["mean"] == pytest.approx(1.0)
    assert reversed_["overall"]["auc_liked"]["mean"] == pytest.approx(0.0)
    gain = reversed_["overall"]["ndcg@10_vs_genres"]
    assert gain["mean"] < 0 and gain["ci95"][1] < 0
    assert reversed_["cold_start"]["auc_liked_vs_genres"]["mean"] == pytest.approx(-1.0)
    # units: (fold, user) pairs; 40 of them over 30 distinct users
    assert perfect["overall"]["ndcg_units"] == 40 and perfect["overall"]["ndcg_users"] == 30
    assert perfect["cold_start"]["interactions"] == sum(c.sum() for c in cold)


def test_historical_features_are_as_of_each_interaction(trained):
    from feast import FeatureStore
    ratings = build_features.read_ratings(trained["ratings"])
    entity = train_ranker.interactions(trained["ratings"])
    entity = entity[(entity["user_id"] <= 12) | (entity["item_id"] == RELABELLED)]
    fs = FeatureSet.from_spec(load_spec(SPEC_PATH), n_buckets=16)
    rows = train_ranker.historical_features(FeatureStore(repo_path=str(trained["repo"])),
                                            entity, fs)
    assert len(rows) == len(entity)  # no interaction dropped by the join
    # whole seconds since the epoch, whatever unit the offline store returns
    ts = (rows["event_timestamp"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    # stats: strictly earlier interactions only, brute force per row
    for row, t in zip(rows.itertuples(), ts):
        assert row.item_n_ratings == ((ratings["item_id"] == row.item_id) & (ratings["ts"] < t)).sum()
        assert row.user_n_ratings == ((ratings["user_id"] == row.user_id) & (ratings["ts"] < t)).sum()
    # annotations: the failed version (null label) before the fix was available, then the fix
    all_rel = rows[rows["item_id"] == RELABELLED]
    ann = pd.read_parquet(trained["repo"] / "data" / "item_annotations")
    fixed_at = ann.loc[(ann["item_id"] == RELABELLED) & ann["vibe_label"].notna(),
                       "event_timestamp"].iloc[0]
    before = all_rel[all_rel["event_timestamp"] < fixed_at]
    after = all_rel[all_rel["event_timestamp"] >= fixed_at]
    assert len(before) and len(after)
    assert before["vibe_label"].isna().all() and before["caption_tokens"].isna().all()
    assert (after["vibe_label"] == "whimsical").all()
    m = fs.matrix(all_rel)
    assert m.loc[before.index, "vibe_label"].isna().all()
    assert np.isnan(m.loc[before.index, "caption_bucket_00"]).all()


def test_training_refuses_annotations_the_gate_refuses(trained, tmp_path, capsys):
    """The repo's annotation rows are checked as its gate would check a `feast materialize`
    of them: a label outside the spec in the newest rows stops the job before training."""
    repo = copy_repo(trained["repo"], tmp_path / "feature_repo", materialize=False)
    table, spec = repo / "data" / "item_annotations", load_spec(SPEC_PATH)
    newest, _ = read_latest(str(table), spec)
    FeatureTable(str(table)).write_frame(  # a later run re-labels three items wrongly
        newest.head(3).assign(vibe_label="spooky",
                              created_timestamp=pd.Timestamp.now(tz="UTC").floor("us")),
        AnnotationSchema(spec))
    capsys.readouterr()
    assert train_ranker.main(["--repo", str(repo), "--ratings", str(trained["ratings"]),
                              "--spec", str(SPEC_PATH), "--out", str(tmp_path / "ranker")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "train_ranker: error: the expectations gate refuses the annotation table "
        "(expect_column_values_to_be_in_set(vibe_label)); the report: python -m "
        f"spark_jobs.validate --repo {repo}"]
    assert not (tmp_path / "ranker").exists()
