"""Point-in-time stats (spark_jobs.build_features), the model matrix (ranking_service.features)
and the saved model format (ranking_service.model). No Spark, no Feast; the build_features
job runs end to end on annotation tables committed as the annotate job commits them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from ranking_service import model as ranker_model
from ranking_service.features import (REFERENCE, VARIANTS, FeatureSet, genre_vocabulary,
                                      hot_column, score_column, share_column, sid_column)
from spark_jobs import build_features
from spark_jobs.build_features import annotations_at, item_stats, read_ratings, user_stats
from udfs.schema import AnnotationSchema
from udfs.spec import load_spec
from udfs.table import FeatureTable
from udfs.tokens import caption_tokens

ROOT = Path(__file__).resolve().parent.parent
SPEC = load_spec(ROOT / "specs" / "movielens.yaml")
VIBES = SPEC.attributes["vibe"].labels


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    r = read_ratings(ROOT / "data" / "movielens" / "ratings.csv")
    return r[r["user_id"] <= 40].reset_index(drop=True)


@pytest.fixture(scope="module")
def history(ratings) -> pd.DataFrame:
    """An annotation history: each item labelled "dark" from the epoch, re-annotated at its
    median rating time with another label (or a failure: None) by a row that ties on time
    with an older-created one, which it beats by created_timestamp."""
    items = np.sort(ratings["item_id"].unique())
    midway = ratings.groupby("item_id")["ts"].median().loc[items].astype("int64").to_numpy()
    old = pd.DataFrame({"item_id": items, "event_timestamp": pd.Timestamp(0, tz="UTC"),
                        "created_timestamp": pd.Timestamp("2020-01-01", tz="UTC"),
                        "vibe_label": "dark"})
    new = old.assign(event_timestamp=pd.to_datetime(midway, unit="s", utc=True),
                     created_timestamp=pd.Timestamp("2021-01-01", tz="UTC"),
                     vibe_label=[VIBES[i % len(VIBES)] if i % 7 else None
                                 for i in range(len(items))])
    beaten = new.assign(created_timestamp=pd.Timestamp("2020-06-01", tz="UTC"),
                        vibe_label="beaten")
    return pd.concat([new, old, beaten], ignore_index=True)


@pytest.fixture(scope="module")
def labels(ratings, history) -> pd.Series:
    """Each rating's label as of its time."""
    return annotations_at(ratings, history, ["vibe_label"])["vibe_label"]


def brute_as_of(ratings: pd.DataFrame, history: pd.DataFrame, column: str) -> list:
    """Per rating, `column` of the newest row by (event_timestamp, created_timestamp) stamped
    <= its time, row by row."""
    rows = history.assign(t=(history["event_timestamp"] - pd.Timestamp(0, tz="UTC"))
                          / pd.Timedelta(seconds=1))
    by_item = {i: list(g.sort_values(["t", "created_timestamp"])[["t", column]].itertuples(
        index=False)) for i, g in rows.groupby("item_id")}
    out = []
    for item, ts in zip(ratings["item_id"], ratings["ts"]):
        valid = [value for t, value in by_item.get(item, []) if t <= ts]
        out.append(valid[-1] if valid else None)
    return out


def as_of(stats: pd.DataFrame, key: str, ratings: pd.DataFrame) -> pd.DataFrame:
    """What Feast's as-of join gives each interaction: the newest row stamped <= its time."""
    left = ratings.assign(event_timestamp=pd.to_datetime(ratings["ts"], unit="s", utc=True))
    return pd.merge_asof(left.sort_values("event_timestamp"),
                         stats.sort_values("event_timestamp"),
                         on="event_timestamp", by=key, direction="backward")


def test_each_rating_sees_the_annotation_valid_at_its_time(ratings, history, labels):
    assert labels.index.equals(ratings.index)
    assert labels.tolist() == brute_as_of(ratings, history, "vibe_label")
    # the old label before the re-annotation, the new one (or its failure) after; the
    # row created earlier at the same time never wins
    assert (labels == "dark").any() and labels.isna().any()
    assert labels.isin(set(VIBES) - {"dark"}).any() and not (labels == "beaten").any()


def test_item_stats_never_include_the_interaction_itself(ratings):
    joined = as_of(item_stats(ratings), "item_id", ratings)
    assert joined["item_n_ratings"].notna().all()  # every interaction finds a row
    for item in joined["item_id"].drop_duplicates().head(25):  # brute force
        mine = ratings[ratings["item_id"] == item]
        for _, row in joined[joined["item_id"] == item].iterrows():
            before = mine[mine["ts"] < row["ts"]]
            assert row["item_n_ratings"] == len(before)
            if len(before):
                assert row["item_mean_rating"] == pytest.approx(before["rating"].mean())
            else:
                assert np.isnan(row["item_mean_rating"])


def test_user_stats_match_a_brute_force_computation(ratings, labels):
    stats = user_stats(ratings, {"vibe": labels}, {"vibe": VIBES})
    joined = as_of(stats, "user_id", ratings)
    # the whole table: an interaction's count is the number of the user's strictly earlier
    # ratings, i.e. its minimum rank among the user's timestamps, minus one
    earlier = joined.groupby("user_id")["ts"].rank(method="min") - 1
    assert (joined["user_n_ratings"] == earlier).all()
    for user in (1, 7, 23):  # every feature, for a few users
        mine = ratings[ratings["user_id"] == user]
        for _, row in joined[joined["user_id"] == user].iterrows():
            before = mine[mine["ts"] < row["ts"]]
            if not len(before):
                assert row["user_n_ratings"] == 0 and np.isnan(row["user_mean_rating"])
                continue
            assert row["user_mean_rating"] == pytest.approx(before["rating"].mean())
            item_labels = labels.loc[before.index]  # each as of its own rating
            for lab in VIBES:  # unlabelled items count in the denominator only
                assert row[share_column("vibe", lab)] == pytest.approx(
                    (item_labels == lab).sum() / len(before))


def test_stats_tables_have_the_feature_view_schema(ratings, labels):
    items, users = item_stats(ratings), user_stats(ratings, {"vibe": labels}, {"vibe": VIBES})
    assert list(items.columns) == ["item_id", "event_timestamp", "item_n_ratings",
                                   "item_mean_rating"]
    assert list(users.columns) == ["user_id", "event_timestamp", "user_n_ratings",
                                   "user_mean_rating",
                                   *[f"user_vibe_share_{v.replace('-', '_')}" for v in VIBES]]
    for df in (items, users):
        assert str(df["event_timestamp"].dtype) == "datetime64[ns, UTC]"
        assert df.iloc[:, 2].dtype == np.int64
        assert not df.duplicated(subset=list(df.columns[:2])).any()


def feature_rows(n: int = 6) -> pd.DataFrame:
    """Raw feature rows as Feast returns them (nulls included)."""
    rows = pd.DataFrame({
        "item_n_ratings": [3, None, 5, 0, 8, 1][:n], "item_mean_rating": [4.0, None, 3.5, None, 2.0, 5.0][:n],
        "user_n_ratings": [10] * n, "user_mean_rating": [3.9] * n,
        "vibe_label": ["romantic", None, "light-hearted", "not-a-label", "dark", "whimsical"][:n],
        "vibe_confidence": [0.9, None, 0.5, 0.4, 0.7, 0.6][:n],
        "audience_label": ["kids", "adults", None, "teens", "kids", "adults"][:n],
        "audience_confidence": [0.8, 0.3, None, 0.5, 0.6, 0.7][:n],
        "caption_tokens": [caption_tokens("dark crime noir"), None, [], np.array([5, 5]),
                           caption_tokens("comedy"), caption_tokens("family fun")][:n],
        "genres": ["Crime|Film-Noir", None, "Comedy", "Sci-Fi|Comedy", "(none)", "Children"][:n],
        "semantic_id": [[1, 2, 3], None, np.array([0, 63, 7], dtype=np.int32), [1, 2],
                        [64, 0, 0], [5, 5, 5]][:n],
    })
    for name, attr in SPEC.attributes.items():
        for i, lab in enumerate(attr.labels):
            rows[share_column(name, lab)] = (i + 1) / 100 + (0.5 if name == "audience" else 0)
    return rows


def test_matrix_uses_the_spec_categories_and_crosses_user_shares():
    fs = FeatureSet.from_spec(SPEC, n_buckets=8)
    rows = feature_rows()
    m = fs.matrix(rows)
    assert list(m.columns) == fs.columns
    assert list(m["vibe_label"].cat.categories) == list(VIBES)
    # an unexpected label is missing, not a new category
    assert m["vibe_label"].isna().tolist() == [False, True, False, True, False, False]
    # the cross feature is the user's share for this item's label
    expected = [share_column("vibe", lab) if lab in VIBES else None for lab in rows["vibe_label"]]
    for got, col in zip(m["user_share_vibe"], expected):
        assert np.isnan(got) if col is None else got == rows[col].iloc[0]
    # every attribute of the spec crosses its own shares
    audiences = SPEC.attributes["audience"].labels
    expected = [share_column("audience", lab) if lab in audiences else None
                for lab in rows["audience_label"]]
    for got, col in zip(m["user_share_audience"], expected):
        assert np.isnan(got) if col is None else got == rows[col].iloc[0]
    # no caption is missing; an empty caption is zero counts
    buckets = m[[c for c in m.columns if c.startswith("caption_bucket_")]].to_numpy()
    assert np.isnan(buckets[1]).all() and (buckets[2] == 0).all()
    assert buckets[0].sum() == 3 and buckets[3].sum() == 2
    # a row's features do not depend on the other rows in the batch (serving scores subsets)
    pd.testing.assert_frame_equal(fs.matrix(rows.iloc[[4, 0]]), m.iloc[[4, 0]])


GENRES = ("Children", "Comedy", "Crime", "Film-Noir", "Sci-Fi")


def test_genres_and_semantic_ids_are_item_features():
    assert genre_vocabulary(feature_rows()["genres"]) == ("(none)", *GENRES)
    fs = FeatureSet.from_spec(SPEC, n_buckets=4, genres=GENRES)
    assert fs.variant == "all" and fs.semantic_levels == SPEC.semantic_id.levels
    rows = feature_rows()
    m = fs.matrix(rows)
    assert list(m.columns) == fs.columns
    # multi-hot over the fixed vocabulary; no metadata row is missing, not "no genre"
    genres = m[["genre_children", "genre_comedy", "genre_crime", "genre_film_noir",
                "genre_sci_fi"]].to_numpy()
    np.testing.assert_array_equal(genres[0], [0, 0, 1, 1, 0])
    assert np.isnan(genres[1]).all()
    np.testing.assert_array_equal(genres[3], [0, 1, 0, 0, 1])
    np.testing.assert_array_equal(genres[4], [0, 0, 0, 0, 0])  # unknown genre: none of ours
    # one categorical per level, categories = the codes; a missing, short or out-of-range
    # path is missing at every level
    levels = [sid_column(i) for i in (1, 2, 3)]
    assert all(list(m[c].cat.categories) == list(range(SPEC.semantic_id.codes)) for c in levels)
    codes = np.column_stack([m[c].cat.codes for c in levels])
    np.testing.assert_array_equal(codes, [[1, 2, 3], [-1] * 3, [0, 63, 7], [-1] * 3, [-1] * 3,
                                          [5, 5, 5]])
    # serving's cached blocks give the training matrix, codes as floats
    served = fs.assemble(fs.encode_items(rows), fs.encode_users(rows.iloc[[0]]))
    np.testing.assert_array_equal(served[:, fs.columns.index("sid_l2")],
                                  [2, np.nan, 63, np.nan, np.nan, 5])
    assert FeatureSet.from_dict(fs.to_dict()) == fs


def test_variants_nest_and_need_only_their_refs():
    full = FeatureSet.from_spec(SPEC, genres=GENRES)
    sets = {v: full.with_variant(v) for v in VARIANTS}
    assert REFERENCE == "genres" and full.variant == "all"
    # every variant is baseline + groups, in the full set's column order
    for v, fs in sets.items():
        assert fs.columns[:4] == sets["baseline"].columns
        assert [c for c in full.columns if c in fs.columns] == fs.columns
        assert set(fs.item_refs()) <= set(full.item_refs())
        assert set(fs.user_refs()) <= set(full.user_refs())
        if v != "baseline":  # each LLM variant is genres + one group
            assert set(sets["genres"].columns) <= set(fs.columns)
    assert sets["genres"].item_refs()[-1] == "item_metadata:genres"
    assert set(sets["attributes"].columns) & set(sets["captions"].columns) == \
        set(sets["genres"].columns)
    assert "item_annotations:semantic_id" in sets["semantic_ids"].item_refs()
    assert "item_annotations:caption_tokens" not in sets["semantic_ids"].item_refs()
    assert set(full.columns) == set().union(*(fs.columns for fs in sets.values()))
    baseline = sets["baseline"]
    rows = feature_rows()[["item_n_ratings", "item_mean_rating", "user_n_ratings",
                           "user_mean_rating"]]
    assert list(baseline.matrix(rows).columns) == baseline.columns
    with pytest.raises(KeyError, match="caption_tokens"):
        full.matrix(feature_rows().drop(columns="caption_tokens"))
    assert FeatureSet.from_dict(full.to_dict()) == full
    # without a genre vocabulary (a repo without item_metadata) or a semantic ID in the
    # spec, those groups are absent and need nothing from Feast
    plain = FeatureSet.from_spec(SPEC.restricted(["vibe", "audience", "caption"]))
    assert plain.columns == [c for c in full.columns
                             if not c.startswith(("genre_", "sid_"))]
    assert not any(r.startswith("item_metadata") or r.endswith("semantic_id")
                   for r in plain.item_refs())
    assert plain.with_variant("genres").columns == baseline.columns


def test_feature_set_rejects_bad_settings():
    with pytest.raises(ValueError, match="variant"):
        FeatureSet.from_spec(SPEC, variant="everything")
    with pytest.raises(ValueError, match="share attributes"):
        FeatureSet.from_spec(SPEC, share_attributes=["mood"])
    with pytest.raises(ValueError, match="collide"):
        FeatureSet.from_spec(SPEC, genres=["Sci-Fi", "Sci Fi"])


def _tiny_model(fs: FeatureSet) -> tuple[xgb.Booster, pd.DataFrame]:
    rows = pd.concat([feature_rows()] * 5, ignore_index=True)
    rng = np.random.default_rng(0)
    rows["item_mean_rating"] = rng.uniform(1, 5, len(rows))
    m = fs.matrix(rows)
    ranker = xgb.XGBRanker(n_estimators=5, enable_categorical=True, tree_method="hist")
    ranker.fit(m, rng.integers(0, 4, len(rows)), qid=np.repeat(np.arange(5), 6))
    return ranker.get_booster(), m


def test_model_round_trip_and_mismatch_is_refused(tmp_path):
    fs = FeatureSet.from_spec(SPEC, n_buckets=4)
    booster, m = _tiny_model(fs)
    ranker_model.save(tmp_path / "m", booster, fs, {"name": "tiny"})
    loaded = ranker_model.load(tmp_path / "m")
    assert loaded.features == fs and loaded.name == "tiny"
    np.testing.assert_allclose(loaded.predict(m), booster.predict(
        xgb.DMatrix(m, enable_categorical=True)), rtol=1e-6)
    meta_path = tmp_path / "m" / "ranker.json"
    saved = json.loads(meta_path.read_text())
    saved["features"]["n_buckets"] = 6  # features.py would now build two more columns
    meta_path.write_text(json.dumps(saved))
    with pytest.raises(ranker_model.ModelError, match="features.py builds"):
        ranker_model.load(tmp_path / "m")
    with pytest.raises(ranker_model.ModelError, match="not a ranker directory"):
        ranker_model.load(tmp_path / "nowhere")


def test_blocks_split_by_side_not_by_name():
    """An attribute may be named user_...: it is still an item column, and the service's
    cached blocks assemble to the same matrix as training's."""
    fs = FeatureSet((("user_intent", ("buy", "browse")),), share_attributes=("user_intent",),
                    n_buckets=2, variant="attributes", genres=("Drama",))
    rows = pd.DataFrame({"item_n_ratings": [1, 2, 3], "item_mean_rating": [4.0, 3.0, None],
                         "user_n_ratings": [5] * 3, "user_mean_rating": [3.5] * 3,
                         "user_intent_label": ["browse", None, "buy"],
                         "user_intent_confidence": [0.9, None, 0.4],
                         share_column("user_intent", "buy"): [0.25] * 3,
                         share_column("user_intent", "browse"): [0.75] * 3,
                         "genres": ["Drama", None, "Comedy"]})
    assert "user_intent_label" in fs.item_columns
    m = fs.matrix(rows)
    assert m["user_intent_label"].tolist()[::2] == ["browse", "buy"]
    np.testing.assert_array_equal(m["user_share_user_intent"], [0.75, np.nan, 0.25])
    served = fs.assemble(fs.encode_items(rows), fs.encode_users(rows.iloc[[0]]))
    np.testing.assert_array_equal(served[:, fs.columns.index("user_share_user_intent")],
                                  m["user_share_user_intent"])


# --- attribute kinds: multi-label and ordinal (specs/movielens_kinds.yaml) -------------------

KINDS_SPEC = load_spec(ROOT / "specs" / "movielens_kinds.yaml")
GENRE_LABELS = KINDS_SPEC.attributes["genres"].labels  # Action, Comedy, Drama, Romance, Thriller
LEVELS = KINDS_SPEC.attributes["intensity"].labels     # "1".."5"


def kinds_rows(arrays: bool) -> pd.DataFrame:
    """Feature rows in the kinds schema: list values as numpy arrays (`arrays`: what
    Parquet and pandas give) or Python lists (what Feast's online read gives), nulls and
    values outside the spec included."""
    seq = (lambda v, dtype=object: np.array(v, dtype=dtype)) if arrays else \
        (lambda v, dtype=object: list(v))
    rows = pd.DataFrame({
        "item_n_ratings": [3, 1, 5, 0, 8, 2, 4], "item_mean_rating": [4.0, 2.5, 3.5, None, 2.0, 5.0, 3.0],
        "user_n_ratings": [10] * 7, "user_mean_rating": [3.9] * 7,
        "vibe_label": ["dark", None, "thoughtful", "light-hearted", "dark", "x", "dark"],
        "vibe_confidence": [0.9, None, 0.5, 0.4, 0.7, 0.6, 0.8],
        "genres_labels": [seq(["Action", "Thriller"]), None, seq(["Comedy"]),
                          seq([]), seq(["Drama", "Western"]), seq(["Western"]),
                          seq(["Romance", "Comedy", "Drama"])],
        "genres_scores": [seq([0.9, 0.1, 0.2, 0.05, 0.7], float), None,
                          seq([0.1, 0.95, 0.3, 0.2, 0.1], float),
                          seq([0.2, 0.3], float),                       # not one per label
                          seq([0.1, 0.2, 0.8, None, 0.3]),              # a null score
                          seq([0.1, 0.1, 0.1, 0.1, 0.1], float),
                          seq([0.05, 0.6, 0.55, 0.9, 0.0], float)],
        "intensity_label": ["5", None, "1", "3", "9", "2", "4"],
        "intensity_confidence": [0.8, None, 0.6, 0.4, 0.3, 0.5, 0.7],
        "intensity_value": [4.7, None, 1.3, 3.0, 2.2, 2.1, 3.8],
        "caption_tokens": [caption_tokens("a b"), None, [], caption_tokens("c"),
                           caption_tokens("d e f"), caption_tokens("g"), caption_tokens("h")],
    })
    for name, attr in KINDS_SPEC.attributes.items():
        for i, lab in enumerate(attr.labels):
            rows[share_column(name, lab)] = (i + 1) / 16 + {"vibe": 0, "genres": 0.3,
                                                            "intensity": 0.6}[name]
    return rows


def test_multi_label_and_ordinal_attributes_become_features_by_kind():
    fs = FeatureSet.from_spec(KINDS_SPEC, n_buckets=4)
    assert fs.kind("vibe") == "single" and fs.kind("genres") == "multi" \
        and fs.kind("intensity") == "ordinal"
    assert {r.split(":")[1] for r in fs.item_refs()} >= {
        "genres_labels", "genres_scores", "intensity_label", "intensity_confidence",
        "intensity_value"}
    assert "item_annotations:genres_label" not in fs.item_refs()
    hot = [hot_column("genres", g) for g in GENRE_LABELS]
    score = [score_column("genres", g) for g in GENRE_LABELS]
    assert hot[0] == "genres_has_Action" and score[-1] == "genres_score_Thriller"
    assert fs.columns == [
        "item_n_ratings", "item_mean_rating", "user_n_ratings", "user_mean_rating",
        "vibe_label", "vibe_confidence", *hot, *score,
        "intensity_label", "intensity_confidence", "intensity_value",
        "user_share_vibe", "user_share_genres", "user_share_intensity",
        *[f"caption_bucket_{i:02d}" for i in range(4)]]
    rows = kinds_rows(arrays=True)
    m = fs.matrix(rows)
    # multi-hot in spec order; labels outside the spec ignored; no annotation (null) is NaN
    # throughout, an empty set zeros
    np.testing.assert_array_equal(m[hot].to_numpy(), [
        [1, 0, 0, 0, 1], [np.nan] * 5, [0, 1, 0, 0, 0], [0] * 5, [0, 0, 1, 0, 0], [0] * 5,
        [0, 1, 1, 1, 0]])
    # one score per spec label; a null or malformed list NaN throughout, a null score NaN
    scores = m[score].to_numpy()
    np.testing.assert_array_equal(scores[0], [0.9, 0.1, 0.2, 0.05, 0.7])
    assert np.isnan(scores[1]).all() and np.isnan(scores[3]).all()
    np.testing.assert_array_equal(scores[4], [0.1, 0.2, 0.8, np.nan, 0.3])
    # the cross feature of a set: the mean of the user's shares over the item's labels;
    # NaN without an annotation or without a spec label
    share = {g: rows[share_column("genres", g)].iloc[0] for g in GENRE_LABELS}
    expected = [(share["Action"] + share["Thriller"]) / 2, np.nan, share["Comedy"], np.nan,
                share["Drama"], np.nan, (share["Comedy"] + share["Drama"] + share["Romance"]) / 3]
    np.testing.assert_allclose(m["user_share_genres"], expected)
    # ordinal: the label a categorical over the spec's scale (an unexpected one missing),
    # the expected value a number, the cross feature that of its label
    assert list(m["intensity_label"].cat.categories) == list(LEVELS)
    assert m["intensity_label"].astype(object).tolist()[:5] == ["5", np.nan, "1", "3", np.nan]
    np.testing.assert_array_equal(m["intensity_value"], rows["intensity_value"].astype(float))
    assert m["user_share_intensity"].iloc[0] == rows[share_column("intensity", "5")].iloc[0]
    assert np.isnan(m["user_share_intensity"].iloc[4])
    assert list(m["vibe_label"].cat.categories) == list(KINDS_SPEC.attributes["vibe"].labels)
    # a row's features do not depend on the batch
    pd.testing.assert_frame_equal(fs.matrix(rows.iloc[[6, 0, 3]]), m.iloc[[6, 0, 3]])


def test_kinds_encode_the_same_from_lists_and_from_arrays():
    """Online rows (Feast: Python lists) and offline rows (Parquet: numpy arrays) give the
    same matrix, and serving's cached blocks assemble to training's matrix."""
    fs = FeatureSet.from_spec(KINDS_SPEC, n_buckets=4)
    offline, online = kinds_rows(arrays=True), kinds_rows(arrays=False)
    assert isinstance(online["genres_labels"].iloc[0], list)
    assert isinstance(offline["genres_labels"].iloc[0], np.ndarray)
    items = fs.encode_items(online)
    np.testing.assert_array_equal(items, fs.encode_items(offline))
    served = fs.assemble(items, fs.encode_users(online.iloc[[0]]))
    as_codes = np.column_stack([
        np.where(c.cat.codes >= 0, c.cat.codes, np.nan)
        if isinstance(c.dtype, pd.CategoricalDtype) else c.to_numpy(np.float64)
        for _, c in fs.matrix(offline).items()])
    np.testing.assert_array_equal(served, as_codes)  # categoricals as Ranker.predict sends them
    # a string where a list belongs (malformed) is missing, not split into characters
    odd = online.assign(genres_labels=["Action", None, None, None, None, None, None])
    assert np.isnan(fs.matrix(odd)[hot_column("genres", "Action")].iloc[0])


def test_the_kinds_are_saved_with_the_model(tmp_path):
    fs = FeatureSet.from_spec(KINDS_SPEC, n_buckets=4)
    d = fs.to_dict()
    assert d["kinds"] == {"vibe": "single", "genres": "multi", "intensity": "ordinal"}
    assert FeatureSet.from_dict(json.loads(json.dumps(d))) == fs
    # a model saved before kinds: every attribute single-label, as it was trained
    old = {k: v for k, v in FeatureSet.from_spec(SPEC).to_dict().items() if k != "kinds"}
    assert FeatureSet.from_dict(old) == FeatureSet.from_spec(SPEC)
    assert FeatureSet.from_spec(SPEC).kinds == ()
    with pytest.raises(ValueError, match="kind must be one of"):
        FeatureSet.from_dict({**d, "kinds": {"genres": "bag"}})
    # a real model on the kinds' features, saved and loaded, scores the same
    rows = pd.concat([kinds_rows(arrays=True)] * 6, ignore_index=True)
    rng = np.random.default_rng(0)
    rows["item_mean_rating"] = rng.uniform(1, 5, len(rows))
    m = fs.matrix(rows)
    ranker = xgb.XGBRanker(n_estimators=5, enable_categorical=True, tree_method="hist")
    ranker.fit(m, rng.integers(0, 4, len(rows)), qid=np.repeat(np.arange(6), 7))
    ranker_model.save(tmp_path / "m", ranker.get_booster(), fs, {"name": "kinds"})
    loaded = ranker_model.load(tmp_path / "m")
    assert loaded.features == fs
    online = kinds_rows(arrays=False).assign(item_mean_rating=rows["item_mean_rating"][:7])
    np.testing.assert_allclose(
        loaded.predict(loaded.features.assemble(
            fs.encode_items(online), fs.encode_users(online.iloc[[0]]))),
        loaded.predict(m.iloc[:7]), rtol=1e-6)
    # the kinds decide the columns: a model whose saved kinds were lost is refused
    meta = tmp_path / "m" / "ranker.json"
    saved = json.loads(meta.read_text())
    del saved["features"]["kinds"]
    meta.write_text(json.dumps(saved))
    with pytest.raises(ranker_model.ModelError, match="features.py builds"):
        ranker_model.load(tmp_path / "m")


def test_multi_label_columns_must_not_collide():
    with pytest.raises(ValueError, match="collide"):
        FeatureSet((("tags", ("Sci-Fi", "Sci Fi")),), kinds=(("tags", "multi"),))
    with pytest.raises(ValueError, match="not an attribute"):
        FeatureSet((("tags", ("a", "b")),), kinds=(("mood", "multi"),))


def test_user_shares_of_label_sets_match_a_brute_force_computation(ratings):
    """A multi-label attribute: the share of past ratings on items carrying each label (an
    item with several labels counts towards each; failed items in the denominator only);
    an ordinal one like a single label."""
    items = np.sort(ratings["item_id"].unique())
    sets = [None if i % 9 == 0 else np.array([g for j, g in enumerate(GENRE_LABELS)
                                              if (i >> j) & 1], dtype=object)
            for i in range(len(items))]
    sets[1] = np.array(["Drama", "Western"], dtype=object)  # outside the spec: ignored
    ann = pd.DataFrame({"item_id": items, "event_timestamp": pd.Timestamp(0, tz="UTC"),
                        "created_timestamp": pd.Timestamp("2021-01-01", tz="UTC"),
                        "genres_labels": sets,
                        "intensity_label": [LEVELS[i % 5] if i % 4 else None
                                            for i in range(len(items))]})
    at = annotations_at(ratings, ann, ["genres_labels", "intensity_label"])
    genres, intensity = at["genres_labels"], at["intensity_label"]
    stats = user_stats(ratings, {"genres": genres, "intensity": intensity},
                       {"genres": GENRE_LABELS, "intensity": LEVELS})
    assert list(stats.columns[4:]) == [share_column("genres", g) for g in GENRE_LABELS] + \
        [share_column("intensity", lev) for lev in LEVELS]
    joined = as_of(stats, "user_id", ratings)
    for user in (2, 9):
        mine = ratings[ratings["user_id"] == user]
        for _, row in joined[joined["user_id"] == user].iterrows():
            before = mine[mine["ts"] < row["ts"]]
            if not len(before):
                continue
            for g in GENRE_LABELS:
                carrying = [v is not None and g in list(v) for v in genres.loc[before.index]]
                assert row[share_column("genres", g)] == pytest.approx(sum(carrying) / len(before))
            for lev in LEVELS:
                assert row[share_column("intensity", lev)] == pytest.approx(
                    (intensity.loc[before.index] == lev).sum() / len(before))


# --- the job on committed annotation tables: labels as of each rating, the gate ------------

T0 = 1_000_000_000  # 2001-09-09T01:46:40Z, a whole second


def at(seconds: float) -> pd.Timestamp:
    """T0 + seconds, in microseconds (the table's unit), so fractions of a second survive."""
    return pd.Timestamp(T0 * 10**6 + round(seconds * 10**6), unit="us", tz="UTC")


def commit_runs(root: Path, spec, *runs: pd.DataFrame) -> Path:
    """Each frame committed as one run of the table, oldest first (FeatureTable.write_frame:
    the annotate job's layout and commit), each created one second after the last."""
    created = pd.Timestamp.now(tz="UTC").floor("us")
    for k, run in enumerate(runs):
        run = run.assign(created_timestamp=created + pd.Timedelta(seconds=k))
        FeatureTable(str(root)).write_frame(run, AnnotationSchema(spec))
    return root


def run_job(tmp_path: Path, monkeypatch, table: Path, spec: str, rows: list[tuple],
            *flags: str) -> tuple[int, pd.DataFrame | None]:
    """build_features on `rows` (user, item, rating, seconds after T0); in tmp_path, so the
    gate finds no drift reference of the working tree. (exit status, user_stats)."""
    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "ratings.csv"
    pd.DataFrame([(u, i, r, T0 + s) for u, i, r, s in rows],
                 columns=["userId", "movieId", "rating", "timestamp"]).to_csv(csv, index=False)
    rc = build_features.main(["--ratings", str(csv), "--annotations", str(table),
                              "--out", str(tmp_path / "out"), "--spec", spec, *flags])
    stats = tmp_path / "out" / "user_stats"
    return rc, pd.read_parquet(stats).set_index(["user_id", "event_timestamp"]) \
        if rc == 0 else None


def shares(users: pd.DataFrame, user: int, seconds: float, attribute: str, labels) -> dict:
    """The user's shares in the row stamped at T0 + seconds, for the labels they are not 0."""
    row = users.loc[(user, at(seconds))]
    return {lab: row[share_column(attribute, lab)] for lab in labels
            if row[share_column(attribute, lab)]}


def test_user_shares_use_the_label_valid_at_each_rating(tmp_path, monkeypatch):
    from tests.test_gate import annotation_frame
    first = annotation_frame(event=at(0))
    first.loc[first["item_id"] == 1, "vibe_label"] = "dark"
    first.loc[first["item_id"] == 2, ["vibe_label", "event_timestamp"]] = ["thrilling", at(500)]
    first.loc[first["item_id"] == 3, "event_timestamp"] = at(500.4)   # later in that second
    first.loc[first["item_id"] == 4, "event_timestamp"] = at(86_400)  # a day later
    again = first[first["item_id"] == 1].assign(vibe_label="romantic", event_timestamp=at(1000))
    table = commit_runs(tmp_path / "item_annotations", SPEC, first, again)
    rc, users = run_job(tmp_path, monkeypatch, table, str(ROOT / "specs" / "movielens.yaml"), [
        (1, 1, 4.0, 100), (1, 1, 5.0, 2000),    # item 1 before and after its re-annotation
        (2, 2, 3.0, 500), (2, 3, 3.0, 500),     # item 2 stamped at the second, 3 just after
        (3, 3, 4.0, 501), (3, 4, 4.0, 600)])    # item 3 valid by now; item 4 not yet
    assert rc == 0
    assert shares(users, 1, 101, "vibe", VIBES) == {"dark": 1.0}
    assert shares(users, 1, 2001, "vibe", VIBES) == {"dark": 0.5, "romantic": 0.5}
    assert shares(users, 2, 501, "vibe", VIBES) == {"thrilling": 0.5}  # item 3: unlabelled
    label_3 = first.loc[first["item_id"] == 3, "vibe_label"].item()
    assert shares(users, 3, 601, "vibe", VIBES) == {label_3: 0.5}      # item 4: unlabelled
    assert users.loc[(3, at(601)), "user_n_ratings"] == 2


def test_label_sets_are_as_of_each_rating(tmp_path, monkeypatch):
    from tests.test_gate_kinds import kinds_frame
    first = kinds_frame(event=at(0))  # row k: item k + 1
    first.at[0, "genres_labels"] = ["Action"]
    first.at[0, "genres_scores"] = [0.9, 0.1, 0.1, 0.1, 0.1]
    first.at[1, "event_timestamp"] = at(86_400)  # item 2: a day after its rating
    again = first.iloc[[0]].assign(event_timestamp=at(1000))  # item 1 re-annotated
    again.at[0, "genres_labels"] = ["Comedy", "Romance"]
    again.at[0, "genres_scores"] = [0.1, 0.9, 0.1, 0.9, 0.1]
    table = commit_runs(tmp_path / "item_annotations", KINDS_SPEC, first, again)
    rc, users = run_job(tmp_path, monkeypatch, table,
                        str(ROOT / "specs" / "movielens_kinds.yaml"),
                        [(1, 1, 4.0, 100), (1, 1, 4.0, 2000), (2, 2, 3.0, 600), (2, 1, 3.0, 700)])
    assert rc == 0
    assert shares(users, 1, 101, "genres", GENRE_LABELS) == {"Action": 1.0}
    assert shares(users, 1, 2001, "genres", GENRE_LABELS) == {
        "Action": 0.5, "Comedy": 0.5, "Romance": 0.5}
    assert shares(users, 2, 601, "genres", GENRE_LABELS) == {}  # item 2 not annotated yet
    assert shares(users, 2, 701, "genres", GENRE_LABELS) == {"Action": 0.5}


def test_a_table_the_gate_refuses_is_not_used_unless_skipped(tmp_path, monkeypatch, capsys):
    from tests.test_gate import annotation_frame
    bad = annotation_frame(event=at(0))
    bad.loc[0, "vibe_label"] = "spooky"  # not a label of the spec
    table = commit_runs(tmp_path / "item_annotations", SPEC, bad)
    spec = str(ROOT / "specs" / "movielens.yaml")
    rows = [(1, 1, 4.0, 100), (1, 50, 3.0, 200)]
    rc, _ = run_job(tmp_path, monkeypatch, table, spec, rows)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not (tmp_path / "out").exists()
    assert err == ["build_features: error: the expectations gate refuses the annotation "
                   "table (expect_column_values_to_be_in_set(vibe_label)); the report: "
                   f"python -m spark_jobs.validate --spec {spec} --table {table}"]
    # no report or quarantine left behind (validate's would be under feature_repo/data/gate)
    assert not (tmp_path / "feature_repo").exists()
    rc, users = run_job(tmp_path, monkeypatch, table, spec, rows, "--skip-gate-check")
    err = capsys.readouterr().err
    assert rc == 0 and len(users) == 3
    assert err.startswith("build_features: WARNING: --skip-gate-check: the annotation table "
                          "was NOT checked by the expectations gate")
