"""Feast definitions for the annotation features and the ranker's personalisation features.

Declarations (plus one helper that picks the source class for the offline store). The Parquet tables under data/ are written by spark_jobs/annotate.py
(item_annotations) and spark_jobs/build_features.py (item_stats, user_stats).
Annotation rows are stamped with when the item became available (event_timestamp) and when
they were annotated (created_timestamp): re-annotation never moves a feature back in time, and
Feast keeps the newest annotation.
"""
import logging
import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Array, Float64, Int64, String
from feast.value_type import ValueType

# Where the jobs write the tables, and which offline store reads them: the embedded default
# reads this repo's data/ with DuckDB; production (feature_store.production.yaml) sets
# ANNOFEAT_OFFLINE_STORE=spark and ANNOFEAT_FEATURE_DATA=s3a://bucket/features (or hdfs://...).
# The default is absolute because DuckDB resolves a relative path against the working
# directory, not the repo; so a copied repo needs its own `feast apply`.
DATA = os.environ.get("ANNOFEAT_FEATURE_DATA", str(Path(__file__).resolve().parent / "data"))


class _GlobPathCheck(logging.Filter):
    """`feast apply` checks that a FileSource path exists without expanding globs, and warns
    that ours (`<table>/*.parquet`) do not; DuckDB reads them fine."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Could not validate FileSource path")
                    and "/*.parquet" in record.getMessage())


logging.getLogger("feast.infra.offline_stores.file_source").addFilter(_GlobPathCheck())


def parquet_source(name: str, table: str, **kwargs):
    if os.environ.get("ANNOFEAT_OFFLINE_STORE") == "spark":
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import (
            SparkSource)
        return SparkSource(name=name, path=f"{DATA}/{table}", file_format="parquet", **kwargs)
    # a table is a directory of part files (Spark's layout); DuckDB reads them by glob
    return FileSource(name=name, path=f"{DATA}/{table}/*.parquet", file_format=ParquetFormat(),
                      **kwargs)


item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64,
              description="A catalogue item (a MovieLens movie in the demo).")
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64,
              description="A user of the recommender.")

item_annotations_source = parquet_source(
    "item_annotations_source", "item_annotations",
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
)

item_annotations = FeatureView(
    name="item_annotations",
    entities=[item],
    ttl=timedelta(0),  # annotations describe content; they do not expire
    schema=[
        Field(name="vibe_label", dtype=String),
        Field(name="vibe_confidence", dtype=Float64),
        Field(name="audience_label", dtype=String),
        Field(name="audience_confidence", dtype=Float64),
        Field(name="caption", dtype=String),
        Field(name="caption_tokens", dtype=Array(Int64)),
        Field(name="model", dtype=String),
        Field(name="spec_version", dtype=String),
        Field(name="content_hash", dtype=String),
        Field(name="error", dtype=String),
    ],
    source=item_annotations_source,
    tags={"owner": "annotation", "gate": "expectations"},
)

item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="item_n_ratings", dtype=Int64),
        Field(name="item_mean_rating", dtype=Float64),
    ],
    source=parquet_source("item_stats_source", "item_stats", timestamp_field="event_timestamp"),
)

VIBE_LABELS = ["dark", "light_hearted", "romantic", "thrilling", "thoughtful", "whimsical"]

user_stats = FeatureView(
    name="user_stats",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="user_n_ratings", dtype=Int64),
        Field(name="user_mean_rating", dtype=Float64),
        *[Field(name=f"user_vibe_share_{label}", dtype=Float64) for label in VIBE_LABELS],
    ],
    source=parquet_source("user_stats_source", "user_stats", timestamp_field="event_timestamp"),
)

ranker = FeatureService(
    name="ranker",
    features=[
        item_annotations[["vibe_label", "vibe_confidence", "audience_label",
                          "audience_confidence", "caption_tokens"]],
        item_stats,
        user_stats,
    ],
)
