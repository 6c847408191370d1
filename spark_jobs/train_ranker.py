"""Train the XGBoost ranker on point-in-time Feast features and report an ablation.

    python -m spark_jobs.train_ranker --repo feature_repo --ratings data/movielens/ratings.csv \
        --spec specs/movielens.yaml --out artifacts/ranker

Every interaction (user, item, rating time) is an entity row of
`FeatureStore.get_historical_features`, so each feature is as of the moment of the rating.
The interactions are split by time (the newest `--test-fraction` of them are the test set);
one XGBRanker (rank:ndcg, query = user, relevance = 2 x rating) is trained per ablation
variant: (a) interaction statistics only, (b) + annotation attributes and the user's
share of past ratings on the item's label, (c) + caption-token buckets. NDCG@10 and the
AUC of "rating >= 4" on the test set come with bootstrap 95% intervals over users.
Variant (c) is saved as the serving model; ablation.json and ablation.png go beside it.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.metrics import roc_auc_score

from ranking_service import model as ranker_model
from ranking_service.features import VARIANTS, FeatureSet
from spark_jobs.build_features import read_ratings
from udfs.spec import load_spec

PARAMS = dict(objective="rank:ndcg", n_estimators=200, learning_rate=0.1, max_depth=6,
              min_child_weight=1.0, subsample=0.8, tree_method="hist",
              enable_categorical=True, max_cat_to_onehot=8, random_state=0,
              # one thread: on a busy 2-core box OpenMP threads spin against each other
              # (a 4.5k-row fit measured 3.5 s with one, 42 s with two)
              n_jobs=1)
LIKED = 4.0  # "rating >= 4" is the binary outcome the AUC measures


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
    rows = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
    return rows.sort_values(["user_id", "event_timestamp", "item_id"], kind="stable",
                            ignore_index=True)


def time_split(rows: pd.DataFrame, test_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train on interactions before the cutoff, test on those at or after it."""
    cutoff = rows["event_timestamp"].quantile(1 - test_fraction)
    return rows[rows["event_timestamp"] < cutoff], rows[rows["event_timestamp"] >= cutoff]


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


def bootstrap(values_fn: Callable[[np.ndarray], float], n_users: int, draws: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of a statistic over users resampled with replacement;
    `values_fn(weights)` gets each user's multiplicity in one resample."""
    rng = np.random.default_rng(seed)
    stats = [values_fn(np.bincount(rng.integers(0, n_users, n_users), minlength=n_users))
             for _ in range(draws)]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def evaluate(test: pd.DataFrame, scores: np.ndarray, baseline_ndcg: pd.Series | None,
             draws: int, seed: int) -> tuple[dict, pd.Series]:
    """Test metrics of one variant's scores, and its per-user NDCG for paired deltas."""
    users = test["user_id"].to_numpy()
    ndcg = ndcg_per_user(users, relevance(test["rating"]), scores)
    vals = ndcg.to_numpy()
    out = {"ndcg@10": {"mean": float(vals.mean()),
                       "ci95": bootstrap(lambda w: np.average(vals, weights=w), len(vals),
                                         draws, seed)},
           "ndcg_users": len(vals)}
    if baseline_ndcg is not None:  # paired: the same users in every resample
        diff = vals - baseline_ndcg.reindex(ndcg.index).to_numpy()
        out["ndcg@10_vs_baseline"] = {
            "mean": float(diff.mean()),
            "ci95": bootstrap(lambda w: np.average(diff, weights=w), len(diff), draws, seed)}
    liked = (test["rating"] >= LIKED).to_numpy()
    if 0 < liked.sum() < len(liked):
        codes, uniq = pd.factorize(users)
        out["auc_liked"] = {
            "mean": float(roc_auc_score(liked, scores)),
            # a weighted AUC over all test rows costs ~10 ms: a quarter of the draws
            "ci95": bootstrap(lambda w: roc_auc_score(liked, scores, sample_weight=w[codes]),
                              len(uniq), max(draws // 4, 50), seed)}
    return out, ndcg


def train(repo: str | Path, ratings: str | Path, spec_path: str | Path, out: str | Path,
          *, n_buckets: int = 32, share_attribute: str = "vibe", test_fraction: float = 0.2,
          max_users: int | None = None, bootstrap_draws: int = 1000, seed: int = 0,
          params: dict | None = None, log=print) -> dict:
    """Run the whole job; returns the ablation dict also written to out/ablation.json."""
    from feast import FeatureStore

    params = {**PARAMS, **(params or {})}
    spec = load_spec(spec_path)
    full = FeatureSet.from_spec(spec, share_attribute, n_buckets, "captions")
    entity_df = interactions(ratings, max_users, seed)
    t0 = time.perf_counter()
    rows = historical_features(FeatureStore(repo_path=str(repo)), entity_df, full)
    fetch_s = time.perf_counter() - t0
    log(f"historical features: {len(rows)} interactions in {fetch_s:.1f}s")
    train_rows, test_rows = time_split(rows, test_fraction)
    if train_rows.empty or test_rows.empty:
        raise ValueError("the time split left no training or no test interactions")
    results, baseline = {}, None
    for variant in VARIANTS:
        fs = full.with_variant(variant)
        t0 = time.perf_counter()
        booster = fit(train_rows, fs, params)
        fit_s = time.perf_counter() - t0
        scores = ranker_model.Ranker(booster, fs, {}).predict(fs.matrix(test_rows))
        metrics, ndcg = evaluate(test_rows, scores, baseline, bootstrap_draws, seed)
        baseline = ndcg if baseline is None else baseline
        results[variant] = {"n_features": len(fs.columns), "fit_seconds": round(fit_s, 2),
                            **metrics}
        log(f"  {variant:<10} NDCG@10 {metrics['ndcg@10']['mean']:.4f} "
            f"[{metrics['ndcg@10']['ci95'][0]:.4f}, {metrics['ndcg@10']['ci95'][1]:.4f}]"
            + (f"  AUC {metrics['auc_liked']['mean']:.4f}" if "auc_liked" in metrics else ""))
    report = {
        "spec_version": spec.version, "test_fraction": test_fraction,
        "cutoff": str(test_rows["event_timestamp"].min()),
        "train_interactions": len(train_rows), "test_interactions": len(test_rows),
        "train_users": int(train_rows["user_id"].nunique()),
        "test_users": int(test_rows["user_id"].nunique()),
        "feature_fetch_seconds": round(fetch_s, 2), "bootstrap_draws": bootstrap_draws,
        "params": {k: v for k, v in params.items() if k != "n_jobs"},
        "variants": results,
    }
    out = Path(out)  # the loop ends on the full variant (c): that model is served
    ranker_model.save(out, booster, fs, {"name": f"xgb-ranker-{spec.version}", **report})
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "ablation.png")
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"baseline": "(a) stats", "attributes": "(b) + attributes",
             "captions": "(c) + captions"}
    metrics = [("ndcg@10", "NDCG@10"), ("auc_liked", "AUC (rating >= 4)")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (key, title) in zip(axes, metrics):
        rows = [(names[v], r[key]) for v, r in report["variants"].items() if key in r]
        means = [m["mean"] for _, m in rows]
        errs = np.array([[m["mean"] - m["ci95"][0], m["ci95"][1] - m["mean"]] for _, m in rows]).T
        ax.bar([n for n, _ in rows], means, yerr=errs if rows else None, capsize=4,
               color=["#999999", "#4c72b0", "#dd8452"][:len(rows)])
        if means:
            lo = min(m["ci95"][0] for _, m in rows)
            ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(m["ci95"][1] for _, m in rows) + 0.02))
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Ablation on the time split: {report['test_interactions']} test "
                 f"interactions, 95% bootstrap CI over users", fontsize=9)
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
    p.add_argument("--share-attribute", default="vibe")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--max-users", type=int, default=0,
                   help="train on a sample of this many users (default 0: all)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        p.error("--test-fraction must be in (0, 1)")
    report = train(args.repo, args.ratings, args.spec, args.out, n_buckets=args.n_buckets,
                   share_attribute=args.share_attribute, test_fraction=args.test_fraction,
                   max_users=args.max_users or None, bootstrap_draws=args.bootstrap, seed=args.seed)
    print(f"train {report['train_interactions']} / test {report['test_interactions']} "
          f"interactions; model and ablation written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
