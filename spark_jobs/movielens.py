"""The shipped MovieLens ml-latest-small data as an item catalogue and interaction log.

Item text is the title plus a "Genres: ..." description (MovieLens has no plot text). An
item's event_timestamp is when it became available to users here: its first rating (items
nobody rated get the log's last timestamp), so point-in-time joins never see an annotation
before the item existed. `popularity` is the item's number of ratings (for head/tail routing).

`--metadata-out` also writes the catalogue's own metadata as a Feast table (item_metadata:
item_id, event_timestamp = availability, genres "A|B"): the human genres the ranker's
ablation measures the LLM features against.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "movielens"


def load_ratings(data_dir: Path = DATA_DIR) -> pd.DataFrame:
    r = pd.read_csv(data_dir / "ratings.csv")
    return pd.DataFrame({
        "user_id": r["userId"].astype("int64"),
        "item_id": r["movieId"].astype("int64"),
        "rating": r["rating"].astype("float64"),
        "event_timestamp": pd.to_datetime(r["timestamp"], unit="s", utc=True),
    })


def load_items(data_dir: Path = DATA_DIR) -> pd.DataFrame:
    movies = pd.read_csv(data_dir / "movies.csv")
    ratings = load_ratings(data_dir)
    first_seen = ratings.groupby("item_id")["event_timestamp"].min()
    genres = movies["genres"].where(movies["genres"] != "(no genres listed)", None)
    items = pd.DataFrame({
        "item_id": movies["movieId"].astype("int64"),
        "title": movies["title"],
        "description": genres.map(lambda g: "Genres: " + g.replace("|", ", ") if g else None),
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
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--metadata-out", default=None,
                   help="also write the item_metadata feature table (genres) to this directory")
    args = p.parse_args(argv)
    items = load_items(Path(args.data_dir))
    if args.limit:
        items = items.head(args.limit)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # microseconds: Spark cannot read Parquet nanosecond timestamps
    items.to_parquet(args.out, index=False, coerce_timestamps="us", allow_truncated_timestamps=True)
    print(f"wrote {len(items)} items to {args.out}")
    if args.metadata_out:
        write_metadata(items, Path(args.metadata_out))
        print(f"wrote the genres of {len(items)} items to {args.metadata_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
