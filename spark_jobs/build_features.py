"""Point-in-time interaction statistics for the ranker: the item_stats and user_stats tables.

For every entity and every distinct second t at which it was rated, one row stamped t + 1s
summarises the ratings with timestamp <= t (and a row stamped at its first rating says "no
ratings yet"). Feast's as-of join at an interaction's own
timestamp T picks the newest row stamped <= T, which covers ratings strictly before T: an
interaction never sees itself (or anything rated in the same second).

    python -m spark_jobs.build_features --ratings data/movielens/ratings.csv \
        --annotations feature_repo/data/item_annotations --out feature_repo/data

pandas rather than Spark: a grouped cumulative sum over ~10^5 ratings takes well under a
second in pandas, and the tables are small enough to write as single Parquet files.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from udfs import schema as S
from udfs.schema import share_column
from udfs.spec import SpecError, load_spec
from udfs.table import TableError, read_latest


def read_ratings(path: str | Path) -> pd.DataFrame:
    """MovieLens ratings.csv -> user_id, item_id, rating, ts (int seconds, UTC)."""
    r = pd.read_csv(path)
    missing = {"userId", "movieId", "rating", "timestamp"} - set(r.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return pd.DataFrame({"user_id": r["userId"].astype("int64"),
                         "item_id": r["movieId"].astype("int64"),
                         "rating": r["rating"].astype("float64"),
                         "ts": r["timestamp"].astype("int64")})


def latest_labels(annotations: pd.DataFrame, attribute: str, multi: bool = False) -> pd.Series:
    """item_id -> the label of the item's newest annotation row (None where it failed); for
    a multi-label attribute (`multi`) its chosen labels (a list or array; None where it
    failed)."""
    order = [c for c in ("event_timestamp", "created_timestamp") if c in annotations.columns]
    newest = annotations.sort_values(order, kind="stable").drop_duplicates("item_id", keep="last")
    return newest.set_index("item_id")[S.labels(attribute) if multi else S.label(attribute)]


def carries(labels: pd.Series, label: str) -> pd.Series:
    """Per item: 1 when the item's label is `label` or, for a multi-label attribute, its
    chosen labels include it; 0 otherwise (no annotation, another label, a malformed value)."""
    def has(value) -> bool:
        if isinstance(value, str):
            return value == label
        if isinstance(value, (list, tuple, np.ndarray)):
            return any(isinstance(v, str) and v == label for v in value)
        return False
    return pd.Series([int(has(v)) for v in labels], index=labels.index, dtype="int64")


def _running(df: pd.DataFrame, key: str, values: list[str]) -> pd.DataFrame:
    """Cumulative sums of `values` per key over distinct seconds, stamped one second later,
    after an all-zero row stamped at the key's first second.

    The zero row is what an entity's first interactions join to. Without it, Feast's file
    offline store drops those entity rows altogether: it keeps only joined rows stamped at
    or before the entity timestamp, and an entity whose rows all lie later has none.
    """
    per_second = df.groupby([key, "ts"], sort=True)[values].sum()
    cum = per_second.groupby(level=0).cumsum().reset_index()
    cum["ts"] += 1
    zero = df.groupby(key, as_index=False)["ts"].min().assign(**{v: 0 for v in values})
    cum = pd.concat([zero, cum], ignore_index=True).sort_values([key, "ts"], kind="stable")
    cum.insert(1, "event_timestamp", pd.to_datetime(cum.pop("ts"), unit="s", utc=True))
    return cum.reset_index(drop=True)


def item_stats(ratings: pd.DataFrame) -> pd.DataFrame:
    cum = _running(ratings.assign(n=1), "item_id", ["n", "rating"])
    return pd.DataFrame({"item_id": cum["item_id"], "event_timestamp": cum["event_timestamp"],
                         "item_n_ratings": cum["n"].astype("int64"),
                         "item_mean_rating": cum["rating"] / cum["n"]})


def user_stats(ratings: pd.DataFrame, labels: dict[str, pd.Series],
               label_sets: dict[str, tuple[str, ...]]) -> pd.DataFrame:
    """Counts, mean rating and, per attribute and label, the share of past ratings on items
    with that label (`labels`: attribute -> item_id -> label, or for a multi-label attribute
    item_id -> its chosen labels, latest_labels(multi=True); an item carrying several
    labels counts towards each, so a multi-label attribute's shares need not sum to 1).

    Items without a label (unannotated, or the annotation failed) count in the denominator.
    """
    onehot = {}
    for attribute, label_set in label_sets.items():
        per_item = labels[attribute]
        for lab in label_set:
            onehot[share_column(attribute, lab)] = ratings["item_id"].map(
                carries(per_item, lab)).fillna(0).astype("int64")
    cum = _running(ratings.assign(n=1, **onehot), "user_id", ["n", "rating", *onehot])
    out = pd.DataFrame({"user_id": cum["user_id"], "event_timestamp": cum["event_timestamp"],
                        "user_n_ratings": cum["n"].astype("int64"),
                        "user_mean_rating": cum["rating"] / cum["n"]})
    for col in onehot:
        out[col] = cum[col] / cum["n"]
    return out


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Replace the Parquet directory at `path` (the FileSource path) with one file."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    df.to_parquet(path / "part-00000.parquet", index=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratings", required=True, help="MovieLens-style ratings.csv")
    p.add_argument("--annotations", required=True,
                   help="the annotate job's --output (item_annotations)")
    p.add_argument("--out", required=True, help="directory receiving item_stats/ and user_stats/")
    p.add_argument("--spec", default="specs/movielens.yaml")
    p.add_argument("--attributes", default=None,
                   help="comma-separated attributes behind the user shares (default: all)")
    p.add_argument("--verbose", action="store_true", help="show the libraries' own logging")
    args = p.parse_args(argv)
    from spark_jobs.session import quiet
    quiet(args.verbose)
    try:
        spec = load_spec(args.spec)
        names = ([a.strip() for a in args.attributes.split(",") if a.strip()]
                 if args.attributes else list(spec.attributes))
        attributes = [spec.attribute(n) for n in names]
        annotations, key = read_latest(args.annotations, spec)
    except (SpecError, TableError) as exc:
        print(f"build_features: error: {exc} (run spark_jobs.annotate first?)", file=sys.stderr)
        return 2
    ratings = read_ratings(args.ratings)
    annotations = annotations.rename(columns={key: "item_id"})  # the ratings' name for it
    labels = {a.name: latest_labels(annotations, a.name, a.multi) for a in attributes}
    out = Path(args.out)
    items = item_stats(ratings)
    users = user_stats(ratings, labels, {a.name: a.labels for a in attributes})
    write_table(items, out / "item_stats")
    write_table(users, out / "user_stats")
    first = attributes[0].name if attributes else None
    share = ratings["item_id"].map(labels[first]).notna().mean() if first else 0.0
    print(f"item_stats: {len(items)} rows; user_stats: {len(users)} rows "
          f"({share:.1%} of ratings on items labelled by {first!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
