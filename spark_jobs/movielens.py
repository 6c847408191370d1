"""The shipped MovieLens ml-latest-small data as an item catalogue and interaction log.

Item text is the title plus a `description`: the lead of the film's English Wikipedia article
where one exists (data/movielens-wikipedia-leads/, CC BY-SA 4.0, 6,376 of the 9,742 movies),
null otherwise, so those items are annotated from the title alone; `has_lead` says which. The
human genres are never in the text: they are the ranker's baseline to beat. An
item's event_timestamp is when it became available to users here: its first rating (items
nobody rated get the log's last timestamp), so point-in-time joins never see an annotation
before the item existed. `popularity` is the item's number of ratings (for head/tail routing).

`--metadata-out` also writes the catalogue's own metadata as a Feast table (item_metadata:
item_id, event_timestamp = availability, genres "A|B"): the human genres the ranker's
ablation measures the LLM features against.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "movielens"
LEADS = DATA_DIR.parent / "movielens-wikipedia-leads" / "movielens_wikipedia_leads.csv"


class LeadsError(ValueError):
    """A lead file that cannot be joined to the movies as it is; the message says why."""


def load_leads(path: Path, movie_ids: pd.Series) -> tuple[pd.Series, list[str]]:
    """movieId -> lead text from a `movieId,lead[,wikipedia_url]` CSV, and one-line notes on
    what was left out. Duplicate ids are refused (which lead is meant?); empty leads and ids
    that are not movies are left out and reported, never guessed at."""
    try:
        leads = pd.read_csv(path, dtype={"lead": "string"})
    except (OSError, pd.errors.ParserError) as exc:
        raise LeadsError(f"{path}: cannot read the lead file ({exc})") from exc
    missing = {"movieId", "lead"} - set(leads.columns)
    if missing:
        raise LeadsError(f"{path}: missing columns {sorted(missing)}; it has {list(leads.columns)}")
    ids = pd.to_numeric(leads["movieId"], errors="coerce")
    if ids.isna().any() or (ids % 1 != 0).any():
        bad = leads.loc[ids.isna() | (ids % 1 != 0), "movieId"].astype(str).head(3).tolist()
        raise LeadsError(f"{path}: movieId must be integers, got {bad}")
    leads["movieId"] = ids.astype("int64")
    dup = leads["movieId"][leads["movieId"].duplicated()].unique()
    if len(dup):
        raise LeadsError(f"{path}: {len(dup)} movieId(s) appear more than once "
                         f"(e.g. {', '.join(map(str, dup[:5]))}); keep one lead per movie")
    notes = []
    text = leads["lead"].str.strip()
    empty = text.isna() | (text == "")
    if empty.any():
        notes.append(f"{int(empty.sum())} empty lead(s) left out (those movies keep the title "
                     f"only), e.g. movieId {', '.join(map(str, leads.loc[empty, 'movieId'][:5]))}")
    unknown = ~leads["movieId"].isin(movie_ids)
    if unknown.any():
        notes.append(f"{int(unknown.sum())} lead(s) for movieIds that are not in the catalogue "
                     f"left out, e.g. {', '.join(map(str, leads.loc[unknown, 'movieId'][:5]))}")
    keep = ~empty & ~unknown
    return pd.Series(text[keep].to_numpy(), index=leads.loc[keep, "movieId"].to_numpy()), notes


def load_ratings(data_dir: Path = DATA_DIR) -> pd.DataFrame:
    r = pd.read_csv(data_dir / "ratings.csv")
    return pd.DataFrame({
        "user_id": r["userId"].astype("int64"),
        "item_id": r["movieId"].astype("int64"),
        "rating": r["rating"].astype("float64"),
        "event_timestamp": pd.to_datetime(r["timestamp"], unit="s", utc=True),
    })


def load_items(data_dir: Path = DATA_DIR, leads: Path | None = LEADS,
               notes: list[str] | None = None) -> pd.DataFrame:
    """The catalogue: item_id, title, description (the lead, or null), has_lead, genres,
    popularity, event_timestamp. `leads=None`: titles only (every description null). What
    the lead file left out is appended to `notes` when given."""
    movies = pd.read_csv(data_dir / "movies.csv")
    ratings = load_ratings(data_dir)
    first_seen = ratings.groupby("item_id")["event_timestamp"].min()
    genres = movies["genres"].where(movies["genres"] != "(no genres listed)", None)
    ids = movies["movieId"].astype("int64")
    lead = pd.Series(dtype=object)
    if leads is not None:
        lead, lead_notes = load_leads(Path(leads), ids)
        if notes is not None:
            notes.extend(lead_notes)
    description = ids.map(lead).astype(object)
    items = pd.DataFrame({
        "item_id": ids,
        "title": movies["title"],
        "description": description.where(description.notna(), None),
        "has_lead": description.notna(),
        "genres": genres,
    })
    items["popularity"] = items["item_id"].map(
        ratings["item_id"].value_counts()).fillna(0).astype("int64")
    available = items["item_id"].map(first_seen)
    items["event_timestamp"] = available.fillna(ratings["event_timestamp"].max())
    return items


def item_metadata(items: pd.DataFrame) -> pd.DataFrame:
    """The item_metadata feature table: genres ("|"-joined, null when MovieLens lists none),
    valid from the item's availability, like its annotations."""
    return pd.DataFrame({"item_id": items["item_id"].astype("int64"),
                         "event_timestamp": items["event_timestamp"],
                         "genres": items["genres"]})


def write_metadata(items: pd.DataFrame, directory: Path) -> Path:
    """Replace the Parquet directory (the view's FileSource) with one file."""
    import shutil
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    item_metadata(items).to_parquet(directory / "part-00000.parquet", index=False,
                                    coerce_timestamps="us", allow_truncated_timestamps=True)
    return directory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the MovieLens items table as Parquet.")
    p.add_argument("--out", default="artifacts/demo/items.parquet")
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--leads", default=str(LEADS),
                   help="movieId,lead CSV filling each item's description (default: the shipped "
                        "Wikipedia leads); 'none' for titles only")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--metadata-out", default=None,
                   help="also write the item_metadata feature table (genres) to this directory")
    args = p.parse_args(argv)
    notes: list[str] = []
    try:
        items = load_items(Path(args.data_dir),
                           None if args.leads.lower() == "none" else Path(args.leads), notes)
    except (LeadsError, OSError) as exc:
        print(f"movielens: error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"movielens: note: {note}", file=sys.stderr)
    if args.limit:
        items = items.head(args.limit)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # microseconds: Spark cannot read Parquet nanosecond timestamps
    items.to_parquet(args.out, index=False, coerce_timestamps="us", allow_truncated_timestamps=True)
    print(f"wrote {len(items)} items to {args.out} ({int(items['has_lead'].sum())} with a "
          f"lead, the rest from the title alone)")
    if args.metadata_out:
        write_metadata(items, Path(args.metadata_out))
        print(f"wrote the genres of {len(items)} items to {args.metadata_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
