"""Draw a stratified sample of annotations for human review.

    python -m spark_jobs.review_sample --annotations T --attribute genre --size 200 \
        --out sample.csv [--popularity data/movielens/ratings.csv] [--items items.parquet]

Strata: predicted label x confidence band (tertiles of the table's confidences) x popularity
band (tail < 10 ratings, torso < 50, head; only with --popularity). Each stratum gets at
least --min-per-stratum rows, the rest goes in proportion to stratum size. The CSV has the
annotation columns, stratum, stratum_population, stratum_sample, weight (= population /
sample of the stratum) and an empty `correct` column for the reviewer; quality.sampling.estimate
turns the filled-in sheet into a population accuracy with a 95% interval.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from quality.sampling import confidence_band, popularity_band, stratified_sample
from udfs.table import read_frame


class SampleError(ValueError):
    """Inputs that cannot be sampled; the message says what to fix."""


def rating_counts(ratings: pd.DataFrame) -> pd.Series:
    """Ratings per item id; MovieLens' movieId is accepted for item_id."""
    column = "item_id" if "item_id" in ratings.columns else "movieId"
    if column not in ratings.columns:
        raise SampleError("the popularity table needs an item_id (or movieId) column")
    return ratings.groupby(column).size()


def build_strata(annotations: pd.DataFrame, attribute: str,
                 counts: pd.Series | None) -> tuple[pd.DataFrame, pd.Series]:
    """The rows that can be reviewed (no error) and their stratum keys."""
    label, conf = f"{attribute}_label", f"{attribute}_confidence"
    if f"{attribute}_labels" in annotations.columns:
        raise SampleError(f"{attribute!r} is a multi-label attribute; the review sample "
                          "stratifies single-label and ordinal attributes only")
    missing = [c for c in ("item_id", label, conf) if c not in annotations.columns]
    if missing:
        raise SampleError(f"annotations lack columns {missing}")
    ok = annotations[label].notna() & annotations[conf].notna()
    if "error" in annotations.columns:
        ok &= annotations["error"].isna()
    rows = annotations[ok].reset_index(drop=True)
    if rows.empty:
        raise SampleError("no annotation without error to sample from")
    rows = rows.rename(columns={label: "predicted_label", conf: "confidence"})
    rows["confidence_band"] = confidence_band(rows["confidence"])
    key = rows["predicted_label"].astype(str) + "|" + rows["confidence_band"]
    if counts is not None:
        rows["n_ratings"] = rows["item_id"].map(counts).fillna(0).astype(int)
        rows["popularity_band"] = popularity_band(rows["n_ratings"])
        key = key + "|" + rows["popularity_band"]
    return rows, key


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="review_sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--annotations", required=True, help="annotation table (parquet or csv)")
    p.add_argument("--attribute", required=True)
    p.add_argument("--size", type=int, required=True, help="rows to review")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--popularity", default=None, help="ratings table: one row per rating")
    p.add_argument("--items", default=None,
                   help="item table whose columns (e.g. title) are added for the reviewer")
    p.add_argument("--min-per-stratum", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="show the libraries' own logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spark_jobs.session import quiet
    quiet(args.verbose)
    try:
        counts = rating_counts(read_frame(args.popularity)) if args.popularity else None
        rows, strata = build_strata(read_frame(args.annotations), args.attribute, counts)
        sample = stratified_sample(rows, strata, args.size, args.min_per_stratum, args.seed)
        if args.items:
            items = read_frame(args.items)
            extra = [c for c in items.columns if c not in sample.columns or c == "item_id"]
            sample = sample.merge(items[extra], on="item_id", how="left")
    except (SampleError, ValueError, OSError) as exc:
        print(f"review_sample: error: {exc}", file=sys.stderr)
        return 2
    sample["correct"] = pd.NA
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sample.to_csv(args.out, index=False)
    summary = {"population": int(len(rows)), "strata": int(strata.nunique()),
               "sampled": int(len(sample)), "out": args.out}
    print("[review_sample] " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
