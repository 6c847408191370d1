"""Point-in-time interaction statistics for the ranker: the item_stats and user_stats tables.

For every entity and every distinct second t at which it was rated, one row stamped t + 1s
summarises the ratings with timestamp <= t (and a row stamped at its first rating says "no
ratings yet"). Feast's as-of join at an interaction's own
timestamp T picks the newest row stamped <= T, which covers ratings strictly before T: an
interaction never sees itself (or anything rated in the same second).

The user's label shares count each rating with the label its item had at the rating's time
(the annotation table's history, as of the rating), so a later re-annotation never leaks
into earlier shares.

    python -m spark_jobs.build_features --ratings data/movielens/ratings.csv \
        --annotations feature_repo/data/item_annotations --out feature_repo/data

The annotation table is first checked as the expectations gate checks it (the same suites as
`python -m spark_jobs.validate --spec S --table T`); a table the gate refuses is not used
(exit 2) unless --skip-gate-check says so, loudly.

pandas rather than Spark: a grouped cumulative sum over ~10^5 ratings takes well under a
second in pandas, and the tables are small enough to write as single Parquet files.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from udfs import schema as S
from udfs.schema import share_column
from udfs.spec import SpecError, load_spec
from udfs.table import TableError, read_history


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


def valid_rows(ratings: pd.DataFrame, history: pd.DataFrame) -> np.ndarray:
    """Per rating, the position in `history` (the annotation table's every row) of the row
    valid at the rating's time, -1 where the item has none yet (or none at all).

    The row valid at time T is the item's newest by (event_timestamp, created_timestamp)
    with event_timestamp <= T, Feast's as-of rule. Ratings are whole seconds, so a row
    stamped exactly at a rating's second counts for it, one stamped later in that second
    (12:00:00.4 for a rating at 12:00:00) does not.
    """
    stamped = history["event_timestamp"].notna().to_numpy()  # a row without one: never valid
    order = [c for c in ("event_timestamp", "created_timestamp") if c in history.columns]
    rows = history.loc[stamped, ["item_id", *order]].assign(row=np.flatnonzero(stamped))
    rows = rows.sort_values(order, kind="stable")  # merge_asof takes the last of equal times
    # event_timestamp <= ts (whole seconds) <=> ceil(event_timestamp) <= ts
    since = pd.to_datetime(rows["event_timestamp"], utc=True).dt.ceil("s")
    rows["ts"] = (since - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    left = pd.DataFrame({"item_id": ratings["item_id"].to_numpy(),
                         "ts": ratings["ts"].to_numpy(), "at": np.arange(len(ratings))})
    joined = pd.merge_asof(left.sort_values("ts", kind="stable"), rows[["item_id", "ts", "row"]],
                           on="ts", by="item_id", direction="backward")
    out = np.full(len(ratings), -1, dtype=np.int64)
    out[joined["at"].to_numpy()] = joined["row"].fillna(-1).to_numpy(np.int64)
    return out


def annotations_at(ratings: pd.DataFrame, history: pd.DataFrame,
                   columns: list[str]) -> pd.DataFrame:
    """Per rating (aligned with `ratings`), `columns` of its item's annotation row valid at
    the rating's time (valid_rows); None where no row was valid yet."""
    rows = valid_rows(ratings, history)
    return pd.DataFrame({c: np.append(history[c].to_numpy(dtype=object), None)[rows]
                         for c in columns}, index=ratings.index)  # position -1: the None


def carries(labels: pd.Series, label_set: tuple[str, ...]) -> pd.DataFrame:
    """Per row (aligned with `labels`) and label of `label_set`: 1 when the row's label is
    that label or, for a multi-label attribute, its chosen labels include it; 0 otherwise
    (no annotation, another label, a malformed value)."""
    each = pd.Series(labels.to_numpy(dtype=object)).explode()  # a set: one row per label
    rows = each.index.to_numpy()  # 0..n-1 in order, each once or more: reduce per run
    starts = np.flatnonzero(np.diff(rows, prepend=-1))
    return pd.DataFrame({lab: np.logical_or.reduceat(each.eq(lab).to_numpy(), starts)
                         .astype(np.int64) for lab in label_set}, index=labels.index)


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
    with that label (`labels`: attribute -> each rating's label as of the rating, aligned
    with `ratings`, annotations_at; for a multi-label attribute the chosen labels: an item
    carrying several labels counts towards each, so its shares need not sum to 1).

    Ratings without a label (no annotation valid yet, or it failed) count in the denominator.
    """
    onehot = {}
    for attribute, label_set in label_sets.items():
        flags = carries(labels[attribute], label_set)
        onehot.update({share_column(attribute, lab): flags[lab] for lab in label_set})
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


def label_column(attribute) -> str:
    """The annotation column behind an attribute's shares: its label, or its chosen labels."""
    return S.labels(attribute.name) if attribute.multi else S.label(attribute.name)


def gate_failures(validate_argv: list[str]) -> list[str]:
    """The expectations the gate refuses the annotation table on ([] when it passes), checked
    exactly as `python -m spark_jobs.validate <validate_argv>` checks it (the same spec,
    suites, thresholds and drift reference, the rows read the same way) but leaving no
    report or quarantine behind: that command writes those."""
    from spark_jobs import validate

    args = validate.parse_args(validate_argv)
    gate, _ = validate.build_gate(args)
    view = gate.annotations_view
    if args.table is not None:
        table, key = validate.read_table(args.table, gate.spec, view, view)
    else:
        table, key = validate.offline_rows(args.repo, args.config, view)
    if key != gate.key:
        gate, _ = validate.build_gate(args, key=key)
    with tempfile.TemporaryDirectory() as scratch:
        gate = dataclasses.replace(gate, report_dir=Path(scratch) / "reports",
                                   quarantine_dir=Path(scratch) / "quarantine")
        result = gate.check(view, table)
    return list(dict.fromkeys(f"{c.expectation}({c.column})" if c.column else c.expectation
                              for c in result.failures))


def gate_allows(job: str, validate_argv: list, skip: bool) -> bool:
    """Whether `job` may use the annotation table: the gate passes it (gate_failures), or the
    user skipped the check (said loudly on stderr). Otherwise one line on stderr says which
    expectations failed and where the report is."""
    validate_argv = [str(a) for a in validate_argv]
    command = "python -m spark_jobs.validate " + shlex.join(validate_argv)
    if skip:
        print(f"{job}: WARNING: --skip-gate-check: the annotation table was NOT checked by the "
              f"expectations gate and may hold rows it refuses (check: {command})",
              file=sys.stderr)
        return True
    from pydantic import ValidationError

    from expectations.suites import SuiteError
    from spark_jobs.validate import ConfigError

    try:
        failures = gate_failures(validate_argv)
    except (SpecError, SuiteError, TableError, ValidationError, ConfigError) as exc:
        print(f"{job}: error: cannot check the annotation table as the gate does: {exc} "
              "(--skip-gate-check goes on without the check)", file=sys.stderr)
        return False
    if failures:
        print(f"{job}: error: the expectations gate refuses the annotation table "
              f"({', '.join(failures)}); the report: {command}", file=sys.stderr)
    return not failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratings", required=True, help="MovieLens-style ratings.csv")
    p.add_argument("--annotations", required=True,
                   help="the annotate job's --output (item_annotations)")
    p.add_argument("--out", required=True, help="directory receiving item_stats/ and user_stats/")
    p.add_argument("--spec", default="specs/movielens.yaml")
    p.add_argument("--attributes", default=None,
                   help="comma-separated attributes behind the user shares (default: all)")
    p.add_argument("--skip-gate-check", action="store_true",
                   help="use the annotation table without checking it as the expectations "
                        "gate does (a warning says so)")
    p.add_argument("--verbose", action="store_true", help="show the libraries' own logging")
    args = p.parse_args(argv)
    from spark_jobs.session import quiet
    quiet(args.verbose)
    try:
        spec = load_spec(args.spec)
        names = ([a.strip() for a in args.attributes.split(",") if a.strip()]
                 if args.attributes else list(spec.attributes))
        attributes = [spec.attribute(n) for n in names]
        history, key = read_history(args.annotations, spec)
        if "event_timestamp" not in history.columns:
            raise TableError(f"{args.annotations} has no event_timestamp: when each label "
                             "was valid is unknown")
    except (SpecError, TableError) as exc:
        print(f"build_features: error: {exc} (run spark_jobs.annotate first?)", file=sys.stderr)
        return 2
    if not gate_allows("build_features", ["--spec", args.spec, "--table", args.annotations],
                       args.skip_gate_check):
        return 2
    ratings = read_ratings(args.ratings)
    history = history.rename(columns={key: "item_id"})  # the ratings' name for it
    columns = annotations_at(ratings, history, [label_column(a) for a in attributes])
    labels = {a.name: columns[label_column(a)] for a in attributes}
    out = Path(args.out)
    items = item_stats(ratings)
    users = user_stats(ratings, labels, {a.name: a.labels for a in attributes})
    write_table(items, out / "item_stats")
    write_table(users, out / "user_stats")
    first = attributes[0].name if attributes else None
    share = labels[first].notna().mean() if first else 0.0
    print(f"item_stats: {len(items)} rows; user_stats: {len(users)} rows "
          f"({share:.1%} of ratings on items labelled by {first!r} at the time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
