"""Train the XGBoost ranker on point-in-time Feast features and report an ablation.

    python -m spark_jobs.train_ranker --repo feature_repo --ratings data/movielens/ratings.csv \
        --spec specs/movielens.yaml --out artifacts/ranker

Every interaction (user, item, rating time) is an entity row of
`FeatureStore.get_historical_features`, so each feature is as of the moment of the rating.
First, the repo's annotation rows are checked as its expectations gate checks a `feast
materialize` of them: a table the gate refuses does not feed training (exit 2) unless
--skip-gate-check says so, loudly.

The ablation protocol (fixed before any result was seen; docs/QUALITY.md):

* variants (ranking_service.features.VARIANTS): `baseline` (interaction statistics),
  `genres` (+ the catalogue's human genres), then, each on top of `genres`: `attributes`
  (LLM attributes by kind, single, multi-label or ordinal, and the user's share of the
  item's label; ranking_service.features), `captions` (caption tokens),
  `semantic_ids` (the semantic ID's code per level), and `all`. The reference is `genres`:
  an LLM feature is worth something only if it adds to the metadata the catalogue has;
* rolling time folds: the newest `folds` x `fold_fraction` of interactions (by time) are
  cut into `folds` consecutive windows; fold k trains on every interaction before its
  window and tests on the window. More folds test more users and interactions, which is
  how the intervals narrow; the fold layout does not depend on any variant's result;
* one XGBRanker per variant and fold, same parameters and seed (rank:ndcg, query = user,
  relevance = 2 x rating, pairs truncated at the top 10 as the metric is NDCG@10);
* metrics per fold's test window: NDCG@10 per (fold, user) (users whose test ratings are
  all equal are left out: every order is ideal), and the AUC of "rating >= 4" from the
  score, per fold, averaged over folds weighted by their test interactions. The same for
  cold-start items: interactions with items that had fewer than `cold_min_ratings` ratings
  before the fold's cutoff (NDCG@10 over each user's cold test items, AUC over the cold
  test interactions);
* intervals: one percentile bootstrap over users (a drawn user brings every (fold, user)
  unit and test interaction of theirs, so a user tested in several folds is not counted
  as independent evidence); every metric and every variant is computed on the same draws,
  so the gains over `genres` are paired.

The `all` variant of the newest fold (trained on everything before the last window) is saved
as the serving model; ablation.json and ablation.png go beside it.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb

from ranking_service import model as ranker_model
from ranking_service.features import (GENRES, ITEM_METADATA, REFERENCE, VARIANTS, FeatureSet,
                                      genre_vocabulary)
from spark_jobs.build_features import gate_allows, read_ratings
from udfs import schema as S
from udfs.spec import load_spec

PARAMS = dict(objective="rank:ndcg", n_estimators=200, learning_rate=0.1, max_depth=6,
              min_child_weight=1.0, subsample=0.8, tree_method="hist",
              enable_categorical=True, max_cat_to_onehot=8, random_state=0,
              # the metric is NDCG@10: pair each query's top 10 with the rest (XGBoost's
              # recipe for NDCG@k), which also halves the fit time against the default
              lambdarank_pair_method="topk", lambdarank_num_pair_per_sample=10,
              # one thread: on a busy 2-core box OpenMP threads spin against each other
              # (a 4.5k-row fit measured 3.5 s with one, 42 s with two)
              n_jobs=1)
LIKED = 4.0  # "rating >= 4" is the binary outcome the AUC measures
SERVED = "all"


def interactions(ratings_path: str | Path, max_users: int | None = None,
                 seed: int = 0) -> pd.DataFrame:
    """The entity dataframe: one row per rating, stamped with the rating time."""
    r = read_ratings(ratings_path)
    if max_users is not None:
        users = np.sort(r["user_id"].unique())
        keep = np.random.default_rng(seed).choice(users, min(max_users, len(users)), replace=False)
        r = r[r["user_id"].isin(keep)]
    return pd.DataFrame({"user_id": r["user_id"], "item_id": r["item_id"],
                         "event_timestamp": pd.to_datetime(r["ts"], unit="s", utc=True),
                         "rating": r["rating"]}).reset_index(drop=True)


def historical_features(store, entity_df: pd.DataFrame, features: FeatureSet) -> pd.DataFrame:
    """Point-in-time feature rows for each interaction, in a stable order."""
    refs = features.item_refs() + features.user_refs()
    with warnings.catch_warnings():
        # Feast's DuckDB store calls an ibis method that warns on every query; nothing a
        # user of this job can act on
        warnings.filterwarnings("ignore", message=r"fetch_arrow_table\(\) is deprecated",
                                category=DeprecationWarning)
        rows = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
    return rows.sort_values(["user_id", "event_timestamp", "item_id"], kind="stable",
                            ignore_index=True)


def time_split(rows: pd.DataFrame, test_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train on interactions before the cutoff, test on those at or after it."""
    cutoff = rows["event_timestamp"].quantile(1 - test_fraction)
    return rows[rows["event_timestamp"] < cutoff], rows[rows["event_timestamp"] >= cutoff]


def rolling_folds(rows: pd.DataFrame, folds: int, fold_fraction: float) -> list[dict]:
    """Consecutive test windows over the newest folds x fold_fraction of interactions (time
    quantiles); each fold trains on everything before its window."""
    if not (folds >= 1 and 0 < fold_fraction and folds * fold_fraction < 1):
        raise ValueError("need folds >= 1 and 0 < folds x fold_fraction < 1")
    ts = rows["event_timestamp"]
    edges = [ts.quantile(1 - (folds - k) * fold_fraction) for k in range(folds)]
    out = []
    for k, start in enumerate(edges):
        end = edges[k + 1] if k + 1 < folds else None
        test = (ts >= start) & (ts < end) if end is not None else ts >= start
        out.append({"fold": k, "train": (ts < start).to_numpy(), "test": test.to_numpy(),
                    "cutoff": start, "end": end})
    return out


def relevance(rating: pd.Series) -> np.ndarray:
    return np.rint(2 * rating.to_numpy()).astype(int)


def fit(train: pd.DataFrame, features: FeatureSet, params: dict) -> xgb.Booster:
    train = train.sort_values("user_id", kind="stable")  # XGBoost wants contiguous queries
    model = xgb.XGBRanker(**params)
    model.fit(features.matrix(train), relevance(train["rating"]), qid=train["user_id"])
    return model.get_booster()


def ndcg_per_user(users: np.ndarray, rel: np.ndarray, scores: np.ndarray,
                  k: int = 10) -> pd.Series:
    """NDCG@k (gain 2^rel - 1) per user; users whose test items all share one rating are
    left out, since every ordering of them is ideal."""
    df = pd.DataFrame({"u": users, "gain": 2.0 ** rel - 1, "s": scores})

    def dcg(order: str) -> pd.Series:
        d = df.sort_values(["u", order], ascending=[True, False], kind="stable")
        pos = d.groupby("u").cumcount().to_numpy()
        disc = np.where(pos < k, 1 / np.log2(pos + 2), 0.0)
        return (d["gain"] * disc).groupby(d["u"]).sum()

    varied = df.groupby("u")["gain"].nunique() > 1
    return (dcg("s") / dcg("gain"))[varied]


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC (ties count half) under each row of `weights` (draws, rows): the probability that
    a positive outscores a negative, pairs weighted by the product of their weights. NaN
    where a draw has no positive or no negative. One sort for every draw."""
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], positive[order]
    w = np.atleast_2d(weights)[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # groups of tied scores
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (wp * (below + 0.5 * wn)).sum(1) / den, np.nan)


def _interval(draws: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]


class Bootstrap:
    """One set of user resamples shared by every metric and variant (so gains are paired):
    `counts[d, u]` is user u's multiplicity in draw d (draw 0 is not special)."""

    def __init__(self, users: np.ndarray, draws: int, seed: int, chunk: int = 100):
        self.users = np.sort(np.unique(users))
        self.index = {u: i for i, u in enumerate(self.users)}
        rng = np.random.default_rng(seed)
        n = len(self.users)
        self.counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n)
                                for _ in range(draws)]).astype(np.float64)
        self.chunk = chunk

    def of(self, users) -> np.ndarray:
        return np.fromiter((self.index[u] for u in users), dtype=np.int64, count=len(users))

    def mean(self, values: np.ndarray, users: np.ndarray) -> np.ndarray:
        """The mean of per-unit values under each draw (units weighted by their user's count)."""
        w = self.counts[:, self.of(users)]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ values) / w.sum(1)

    def auc(self, folds: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, np.ndarray]:
        """AUC averaged over folds weighted by their rows: (point estimate, per draw).
        `folds`: (scores, positive, users) per fold."""
        point, per_draw, sizes = [], [], []
        for scores, positive, users in folds:
            if len(scores) == 0:
                continue
            point.append(weighted_auc(scores, positive, np.ones((1, len(scores))))[0])
            idx = self.of(users)
            per_draw.append(np.concatenate([
                weighted_auc(scores, positive, self.counts[i:i + self.chunk][:, idx])
                for i in range(0, len(self.counts), self.chunk)]))
            sizes.append(len(scores))
        if not sizes:
            return float("nan"), np.full(len(self.counts), np.nan)
        sizes = np.asarray(sizes, dtype=np.float64)
        point, per_draw = np.asarray(point), np.stack(per_draw)  # (folds,), (folds, draws)
        ok = ~np.isnan(point)
        point_mean = float((point[ok] * sizes[ok]).sum() / sizes[ok].sum()) if ok.any() \
            else float("nan")
        w = np.where(np.isnan(per_draw), 0.0, sizes[:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            draws = np.nansum(per_draw * w, axis=0) / w.sum(0)
        return point_mean, draws


def _metric(point: float, draws: np.ndarray) -> dict:
    return {"mean": float(point), "ci95": _interval(draws)}


def ablation_metrics(tests: list[pd.DataFrame], scores: dict[str, list[np.ndarray]],
                     cold: list[np.ndarray], draws: int, seed: int,
                     reference: str = REFERENCE) -> dict:
    """Per variant, overall and on cold-start items: NDCG@10 and AUC with intervals, and
    the paired gains over `reference`. `tests[f]` are fold f's test rows, `scores[v][f]`
    variant v's scores for them, `cold[f]` which of them are on cold-start items."""
    users = np.concatenate([t["user_id"].to_numpy() for t in tests])
    boot = Bootstrap(users, draws, seed)
    subsets = {"overall": [np.ones(len(t), bool) for t in tests], "cold_start": cold}
    out = {v: {} for v in scores}
    for subset, masks in subsets.items():
        ndcg, auc = {}, {}
        for variant, per_fold in scores.items():
            units = []
            for f, (test, s, m) in enumerate(zip(tests, per_fold, masks)):
                t = test[m]
                per_user = ndcg_per_user(t["user_id"].to_numpy(), relevance(t["rating"]), s[m])
                units.append(pd.DataFrame({"fold": f, "user": per_user.index,
                                           "ndcg": per_user.to_numpy()}))
            units = pd.concat(units, ignore_index=True)
            ndcg[variant] = units
            auc[variant] = boot.auc([
                (s[m], (t["rating"].to_numpy() >= LIKED)[m], t["user_id"].to_numpy()[m])
                for t, s, m in zip(tests, per_fold, masks)])
        ref_units = ndcg.get(reference)
        for variant in scores:
            units = ndcg[variant]
            vals, who = units["ndcg"].to_numpy(), units["user"].to_numpy()
            block = {"ndcg@10": _metric(vals.mean() if len(vals) else np.nan,
                                        boot.mean(vals, who)),
                     "auc_liked": _metric(*auc[variant]),
                     "ndcg_units": int(len(units)), "ndcg_users": int(units["user"].nunique()),
                     "interactions": int(sum(m.sum() for m in masks))}
            if ref_units is not None and variant != reference:
                # the same (fold, user) units in the same order in every variant
                diff = vals - ref_units["ndcg"].to_numpy()
                block[f"ndcg@10_vs_{reference}"] = _metric(
                    diff.mean() if len(diff) else np.nan, boot.mean(diff, who))
                point, d = auc[variant]
                ref_point, ref_d = auc[reference]
                block[f"auc_liked_vs_{reference}"] = _metric(point - ref_point, d - ref_d)
            out[variant][subset] = block
    return out


def _has_view(store, name: str) -> bool:
    return any(v.name == name for v in store.list_feature_views())


def train(repo: str | Path, ratings: str | Path, spec_path: str | Path, out: str | Path,
          *, n_buckets: int = 32, share_attributes: list[str] | None = None,
          folds: int = 4, fold_fraction: float = 0.1, cold_min_ratings: int = 5,
          max_users: int | None = None, bootstrap_draws: int = 1000, seed: int = 0,
          params: dict | None = None, log=print) -> dict:
    """Run the whole job; returns the ablation dict also written to out/ablation.json."""
    from feast import FeatureStore

    params = {**PARAMS, **(params or {})}
    spec = load_spec(spec_path)
    store = FeatureStore(repo_path=str(repo))
    has_genres = _has_view(store, ITEM_METADATA)
    full = FeatureSet.from_spec(spec, share_attributes, n_buckets, SERVED,
                                genres=("?",) if has_genres else ())
    entity_df = interactions(ratings, max_users, seed)
    t0 = time.perf_counter()
    rows = historical_features(store, entity_df, full)
    fetch_s = time.perf_counter() - t0
    if has_genres:  # the catalogue's own vocabulary, fixed with the model
        full = full.with_genres(genre_vocabulary(rows[GENRES]))
    log(f"historical features: {len(rows)} interactions in {fetch_s:.1f}s"
        + ("" if has_genres else f"; no {ITEM_METADATA} view: the genres variant has no "
           "genre features"))
    layout = rolling_folds(rows, folds, fold_fraction)
    tests, cold, fold_info = [], [], []
    scores = {v: [] for v in VARIANTS}
    fit_seconds = {v: 0.0 for v in VARIANTS}
    served = None
    for fold in layout:
        train_rows, test_rows = rows[fold["train"]], rows[fold["test"]]
        if train_rows.empty or test_rows.empty:
            raise ValueError(f"fold {fold['fold']} has no training or no test interactions")
        before = train_rows["item_id"].value_counts()
        is_cold = (test_rows["item_id"].map(before).fillna(0) < cold_min_ratings).to_numpy()
        tests.append(test_rows)
        cold.append(is_cold)
        fold_info.append({
            "fold": fold["fold"], "cutoff": str(fold["cutoff"]),
            "end": str(fold["end"]) if fold["end"] is not None else None,
            "train_interactions": int(len(train_rows)),
            "test_interactions": int(len(test_rows)),
            "test_users": int(test_rows["user_id"].nunique()),
            "cold_start_interactions": int(is_cold.sum())})
        for variant in VARIANTS:
            fs = full.with_variant(variant)
            t0 = time.perf_counter()
            booster = fit(train_rows, fs, params)
            fit_seconds[variant] += time.perf_counter() - t0
            scores[variant].append(ranker_model.Ranker(booster, fs, {}).predict(
                fs.matrix(test_rows)))
            if variant == SERVED and fold is layout[-1]:
                served = (booster, fs)
        log(f"  fold {fold['fold'] + 1}/{len(layout)}: train {len(train_rows)}, test "
            f"{len(test_rows)} interactions ({int(is_cold.sum())} on cold-start items), "
            f"{test_rows['user_id'].nunique()} users")
    metrics = ablation_metrics(tests, scores, cold, bootstrap_draws, seed)
    results = {}
    for variant in VARIANTS:
        fs = full.with_variant(variant)
        results[variant] = {"n_features": len(fs.columns), "groups": list(fs.groups),
                            "fit_seconds": round(fit_seconds[variant], 2), **metrics[variant]}
        o, c = metrics[variant]["overall"], metrics[variant]["cold_start"]
        log(f"  {variant:<13} NDCG@10 {o['ndcg@10']['mean']:.4f} "
            f"[{o['ndcg@10']['ci95'][0]:.4f}, {o['ndcg@10']['ci95'][1]:.4f}]  "
            f"AUC {o['auc_liked']['mean']:.4f}  cold NDCG@10 {c['ndcg@10']['mean']:.4f} "
            f"AUC {c['auc_liked']['mean']:.4f}")
    all_tests = pd.concat(tests)
    report = {
        "spec_version": spec.version,
        "protocol": {
            "folds": folds, "fold_fraction": fold_fraction, "reference": REFERENCE,
            "served_variant": SERVED, "bootstrap": "percentile, users resampled, shared draws",
            "cold_start": f"test interactions with items that had fewer than "
                          f"{cold_min_ratings} ratings before the fold's cutoff",
            "cold_min_ratings": cold_min_ratings, "seed": seed},
        "folds": fold_info,
        "cutoff": fold_info[0]["cutoff"],
        "train_interactions": fold_info[-1]["train_interactions"],  # the served model's
        "test_interactions": int(len(all_tests)),
        "test_users": int(all_tests["user_id"].nunique()),
        "test_units": int(sum(f["test_users"] for f in fold_info)),
        "cold_start_interactions": int(sum(c.sum() for c in cold)),
        "genres": list(full.genres),
        "feature_fetch_seconds": round(fetch_s, 2), "bootstrap_draws": bootstrap_draws,
        "params": {k: v for k, v in params.items() if k != "n_jobs"},
        "variants": results,
    }
    out = Path(out)
    booster, fs = served
    report["served_gain_by_group"] = gain_by_group(booster, full)
    report["genre_redundancy"] = genre_redundancy(rows, full, seed)
    ranker_model.save(out, booster, fs, {"name": f"xgb-ranker-{spec.version}", **report})
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "ablation.png")
    return report


def gain_by_group(booster: xgb.Booster, full: FeatureSet) -> dict[str, float]:
    """Each feature group's share of a model's total split gain (XGBoost `total_gain`): what
    the model leans on, beside the ablation's question of what it needs. A group's columns
    are those its variant adds to `genres` (`genres`: what it adds to `baseline`)."""
    def cols(variant: str) -> set[str]:
        return set(full.with_variant(variant).columns)
    owner = dict.fromkeys(cols("baseline"), "stats")
    owner.update(dict.fromkeys(cols(REFERENCE) - cols("baseline"), "genres"))
    for group in ("attributes", "captions", "semantic_ids"):
        owner.update(dict.fromkeys(cols(group) - cols(REFERENCE), group))
    gains = booster.get_score(importance_type="total_gain")
    total = sum(gains.values()) or 1.0
    shares = dict.fromkeys(["stats", "genres", "attributes", "captions", "semantic_ids"], 0.0)
    for column, gain in gains.items():
        shares[owner.get(column, "stats")] += gain / total
    return {g: round(v, 4) for g, v in shares.items()}


def genre_redundancy(rows: pd.DataFrame, full: FeatureSet, seed: int = 0) -> dict:
    """Per single-label or ordinal attribute: how well an item's human genres predict its
    label (5-fold cross-validated accuracy of a logistic regression on the genre multi-hot,
    one row per item as of its last interaction), beside always answering the commonest
    label. An accuracy near 1 means the attribute restates the genres, so it can add little
    over them; near the majority share, it says something the genres do not."""
    if not full.genres or GENRES not in rows.columns:
        return {}
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_score

    items = rows.sort_values("event_timestamp", kind="stable").drop_duplicates("item_id",
                                                                             keep="last")
    hot = np.array([[int(g in set(str(v).split("|"))) for g in full.genres]
                    for v in items[GENRES].fillna("")], dtype=np.float32)
    out = {}
    for name, _ in full.attributes:
        column = S.label(name)
        if full.kind(name) == "multi" or column not in items.columns:
            continue
        known = items[column].notna().to_numpy()
        y = items.loc[known, column].astype(str).to_numpy()
        if len(set(y)) < 2 or len(y) < 10:
            continue
        folds = KFold(5, shuffle=True, random_state=seed)
        accuracy = cross_val_score(LogisticRegression(max_iter=1000), hot[known], y, cv=folds)
        out[name] = {"items": int(known.sum()), "accuracy_from_genres": round(float(
            accuracy.mean()), 4), "majority_share": round(float(
                pd.Series(y).value_counts(normalize=True).iloc[0]), 4)}
    return out


def plot(report: dict, path: Path) -> None:
    """Gains over the reference (paired, 95% intervals), overall and on cold-start items."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = report["protocol"]["reference"]
    variants = [v for v in report["variants"] if v != ref]
    panels = [("overall", "ndcg@10", "NDCG@10"), ("overall", "auc_liked", "AUC (rating >= 4)"),
              ("cold_start", "ndcg@10", "NDCG@10, cold-start items"),
              ("cold_start", "auc_liked", "AUC, cold-start items")]
    colours = {"baseline": "#999999", "attributes": "#4c72b0", "captions": "#dd8452",
               "semantic_ids": "#55a868", "all": "#8172b2"}
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (subset, key, title) in zip(axes.ravel(), panels):
        gains = [report["variants"][v][subset].get(f"{key}_vs_{ref}") for v in variants]
        shown = [(v, g) for v, g in zip(variants, gains) if g and np.isfinite(g["mean"])]
        means = [g["mean"] for _, g in shown]
        errs = np.array([[g["mean"] - g["ci95"][0], g["ci95"][1] - g["mean"]]
                         for _, g in shown]).T if shown else None
        ax.bar([v for v, _ in shown], means, yerr=errs, capsize=4,
               color=[colours.get(v, "#333333") for v, _ in shown])
        ax.axhline(0.0, color="black", linewidth=0.8)
        absolute = report["variants"][ref][subset][key]["mean"]
        ax.set_title(f"{title}: gain over {ref} ({absolute:.3f})", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Ablation, {report['protocol']['folds']} rolling time folds: "
                 f"{report['test_interactions']} test interactions "
                 f"({report['cold_start_interactions']} cold-start), {report['test_users']} "
                 f"users; paired 95% bootstrap intervals over users", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default="feature_repo")
    p.add_argument("--ratings", default="data/movielens/ratings.csv")
    p.add_argument("--spec", default="specs/movielens.yaml")
    p.add_argument("--out", default="artifacts/ranker")
    p.add_argument("--n-buckets", type=int, default=32)
    p.add_argument("--share-attributes", default=None,
                   help="comma-separated attributes whose per-label user shares are features "
                        "(default: every spec attribute; build_features must match)")
    p.add_argument("--folds", type=int, default=4, help="rolling time folds (test windows)")
    p.add_argument("--fold-fraction", type=float, default=0.1,
                   help="share of interactions in each fold's test window")
    p.add_argument("--cold-min-ratings", type=int, default=5,
                   help="an item is cold-start in a fold when it had fewer ratings than this "
                        "before the fold's cutoff")
    p.add_argument("--max-users", type=int, default=0,
                   help="train on a sample of this many users (default 0: all)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-gate-check", action="store_true",
                   help="train without first checking the repo's annotation rows as its "
                        "expectations gate does (a warning says so)")
    p.add_argument("--verbose", action="store_true", help="show the libraries' own logging")
    args = p.parse_args(argv)
    from spark_jobs.session import quiet
    quiet(args.verbose)
    if not (args.folds >= 1 and args.fold_fraction > 0 and args.folds * args.fold_fraction < 1):
        p.error("--folds x --fold-fraction must be in (0, 1)")
    # the rows a full `feast materialize` would check: a table the gate refuses must not
    # feed training either
    if not gate_allows("train_ranker", ["--repo", args.repo], args.skip_gate_check):
        return 2
    report = train(args.repo, args.ratings, args.spec, args.out, n_buckets=args.n_buckets,
                   share_attributes=([a.strip() for a in args.share_attributes.split(",")]
                                     if args.share_attributes else None),
                   folds=args.folds, fold_fraction=args.fold_fraction,
                   cold_min_ratings=args.cold_min_ratings, max_users=args.max_users or None,
                   bootstrap_draws=args.bootstrap, seed=args.seed)
    print(f"{report['protocol']['folds']} folds, {report['test_interactions']} test "
          f"interactions; model ({SERVED}) and ablation written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
