"""Feast definitions for the demo: the annotation features and the ranker's interaction features.

Every annotation field comes from the spec (udfs.feast_repo): a new spec needs no edit here.
The Parquet tables under data/ are written by spark_jobs/annotate.py (item_annotations),
spark_jobs/build_features.py (item_stats, user_stats) and spark_jobs/movielens.py
(item_metadata: the catalogue's own genres, each item's row stamped with its availability).

item_metadata is declared when its table exists (or ANNOFEAT_ITEM_METADATA=1; =0 never): a
repo without the catalogue's metadata (the gate's and the service's test repos) serves the
annotations and statistics alone, and the ranker then trains without genre features.

Environment (all optional): ANNOFEAT_SPEC, the spec (default ../specs/movielens.yaml; the
gate's `batch_engine.spec` in feature_store.yaml must name the same file);
ANNOFEAT_FEATURE_DATA, where the jobs write (default: this repo's data/, or e.g.
s3a://bucket/features); ANNOFEAT_OFFLINE_STORE=spark for the Spark offline store
(feature_store.production.yaml), which reads SparkSource tables only.
"""
import logging
import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Float64, Int64, String
from feast.value_type import ValueType

from udfs.feast_repo import annotation_feature_view
from udfs.schema import AnnotationSchema, share_columns
from udfs.spec import load_spec

HERE = Path(__file__).resolve().parent
SPEC = load_spec(os.environ.get("ANNOFEAT_SPEC", HERE.parent / "specs" / "movielens.yaml"))
# Absolute: DuckDB resolves a relative path against the working directory, not the repo.
DATA = os.environ.get("ANNOFEAT_FEATURE_DATA", str(HERE / "data"))
OFFLINE_STORE = os.environ.get("ANNOFEAT_OFFLINE_STORE", "file")
_METADATA = os.environ.get("ANNOFEAT_ITEM_METADATA", "")
WITH_METADATA = _METADATA == "1" or (_METADATA != "0" and "://" not in DATA
                                     and Path(DATA, "item_metadata").is_dir())


class _GlobPathCheck(logging.Filter):
    """`feast apply` checks that a FileSource path exists without expanding globs, and warns
    that ours (`<table>/*.parquet`) do not; DuckDB reads them fine."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Could not validate FileSource path")
                    and "/*.parquet" in record.getMessage())


logging.getLogger("feast.infra.offline_stores.file_source").addFilter(_GlobPathCheck())


def parquet_source(name: str, table: str, **kwargs):
    if OFFLINE_STORE == "spark":
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

item_annotations = annotation_feature_view(
    SPEC, item, table=f"{DATA}/item_annotations", offline_store=OFFLINE_STORE,
    tags={"owner": "annotation", "gate": "expectations"})

item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=timedelta(0),  # no expiry: the newest statistics before the interaction
    schema=[
        Field(name="item_n_ratings", dtype=Int64),
        Field(name="item_mean_rating", dtype=Float64),
    ],
    source=parquet_source("item_stats_source", "item_stats", timestamp_field="event_timestamp"),
)

user_stats = FeatureView(
    name="user_stats",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="user_n_ratings", dtype=Int64),
        Field(name="user_mean_rating", dtype=Float64),
        # per attribute and label: the user's past share of ratings on items with that label
        *[Field(name=c, dtype=Float64) for c in share_columns(SPEC)],
    ],
    source=parquet_source("user_stats_source", "user_stats", timestamp_field="event_timestamp"),
)

item_metadata = FeatureView(
    name="item_metadata",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        # the catalogue's human genres, "|"-joined (MovieLens' own), for the ablation's
        # fair baseline: what LLM features must beat is the metadata a catalogue already has
        Field(name="genres", dtype=String),
    ],
    source=parquet_source("item_metadata_source", "item_metadata",
                          timestamp_field="event_timestamp"),
) if WITH_METADATA else None

ranker = FeatureService(
    name="ranker",
    features=[
        item_annotations[AnnotationSchema(SPEC).ranker_columns()],
        item_stats,
        user_stats,
        *([item_metadata] if item_metadata is not None else []),
    ],
)
