"""Feast declarations derived from a spec, for any feature repo's definitions.py.

    from udfs.feast_repo import annotation_feature_view
    item = Entity(name="item", join_keys=["sku"], value_type=ValueType.STRING)
    item_annotations = annotation_feature_view("specs/catalogue.yaml", item,
                                               table="s3a://bucket/features/item_annotations")

The view's fields, the source's path (the table directory for the spec's columns, see
udfs.table) and the key's type all come from the spec and the entity: a new spec needs no
edit here, and nothing copies a label list.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from udfs import schema as S
from udfs.schema import AnnotationSchema
from udfs.spec import Spec, load_spec
from udfs.table import FeatureTable

OFFLINE_STORES = ("file", "duckdb", "spark")


def _spec(spec: Spec | str | Path) -> Spec:
    return spec if isinstance(spec, Spec) else load_spec(spec)


def entity_schema(spec: Spec | str | Path, entity) -> AnnotationSchema:
    """The table schema for a spec keyed by a Feast entity (a string or integer key)."""
    from feast.value_type import ValueType

    kinds = {ValueType.STRING: S.STRING, ValueType.INT64: S.INT64, ValueType.INT32: S.INT64}
    if entity.value_type not in kinds:
        raise ValueError(f"entity {entity.name!r}: set value_type to ValueType.STRING or "
                         f"ValueType.INT64 (it is {entity.value_type})")
    return AnnotationSchema(_spec(spec), entity.join_key, kinds[entity.value_type])


def annotation_source(table: str, spec: Spec | str | Path, *, offline_store: str = "file",
                      name: str = "item_annotations_source"):
    """The data source reading the annotate job's table at `table` (its --output) for this
    spec's columns: a FileSource over the directory's Parquet files (file and DuckDB
    offline stores), or a SparkSource over the directory (Spark offline store)."""
    if offline_store not in OFFLINE_STORES:
        raise ValueError(f"offline_store must be one of {OFFLINE_STORES}")
    layout = AnnotationSchema(_spec(spec))  # the directory depends on feature columns only
    kwargs = dict(name=name, timestamp_field=S.EVENT_TIMESTAMP,
                  created_timestamp_column=S.CREATED_TIMESTAMP)
    if offline_store == "spark":
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import (
            SparkSource)
        return SparkSource(path=FeatureTable(table).directory(layout), file_format="parquet",
                           **kwargs)
    from feast import FileSource
    from feast.data_format import ParquetFormat
    return FileSource(path=FeatureTable(table).glob(layout), file_format=ParquetFormat(), **kwargs)


def annotation_feature_view(spec: Spec | str | Path, entity, source=None, *,
                            table: str | None = None, offline_store: str = "file",
                            name: str = "item_annotations", ttl: timedelta = timedelta(0),
                            online: bool = True, tags: dict | None = None):
    """A FeatureView serving every feature column of the spec's table (labels, confidences,
    a multi-label attribute's label and score lists as Array(String) and Array(Float64),
    versions, caption and tokens, provenance), keyed by `entity`.

    Give `source`, or `table` (the annotate job's --output) to build one with
    `annotation_source`. ttl=0: annotations describe content and do not expire."""
    from feast import FeatureView

    if (source is None) == (table is None):
        raise ValueError("give exactly one of source= and table=")
    layout = entity_schema(spec, entity)
    if source is None:
        source = annotation_source(table, layout.spec, offline_store=offline_store,
                                   name=f"{name}_source")
    return FeatureView(name=name, entities=[entity], ttl=ttl, schema=layout.feast_fields(),
                       source=source, online=online,
                       tags={"spec": layout.spec.name, "spec_version": layout.spec.version,
                             "schema": layout.fingerprint, **(tags or {})})
