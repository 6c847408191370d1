"""The spec-derived schema and every layer that derives from it. Pure: no Spark session."""
from __future__ import annotations

import pytest
import yaml

from udfs import functions
from udfs.feast_repo import annotation_feature_view, annotation_source
from udfs.schema import AnnotationSchema, SchemaError, id_type_of
from udfs.spec import SpecError, parse_spec
from udfs.table import FeatureTable

from tests.conftest import SPEC_PATH

DATA = yaml.safe_load(SPEC_PATH.read_text())


def spec_from(data: dict):
    return parse_spec(yaml.safe_load(yaml.safe_dump(data)))


def test_columns_follow_the_spec(spec):
    table = AnnotationSchema(spec)
    for name in spec.attributes:
        assert [f"{name}_label", f"{name}_confidence", f"{name}_version"] == \
            [c.name for c in table.part_columns(name)]
    assert table.parts == [*spec.attributes, "caption", "semantic_id"]
    assert table.names[:3] == ["item_id", "event_timestamp", "created_timestamp"]
    assert {c.name for c in table.features} == set(table.names) - set(table.names[:3])
    # the SQL function's return type is the table's annotation columns, nothing else
    udf = [f.strip().split()[0].strip("`") for f in functions.all_type(spec).split(",")]
    assert udf == [c.name for c in table.udf_columns()]
    assert set(udf) <= set(table.names)


def test_fingerprint_is_about_columns_only():
    base = AnnotationSchema(spec_from(DATA)).fingerprint
    reworded = yaml.safe_load(yaml.safe_dump(DATA))
    reworded["attributes"]["vibe"]["labels"]["dark"] = "grim"
    reordered = {**DATA, "attributes": dict(reversed(list(DATA["attributes"].items())))}
    assert AnnotationSchema(spec_from(reworded)).fingerprint == base
    assert AnnotationSchema(spec_from(reordered)).fingerprint == base
    more = yaml.safe_load(yaml.safe_dump(DATA))
    more["attributes"]["pace"] = {"labels": {"slow": "slow", "fast": "fast"}}
    assert AnnotationSchema(spec_from(more)).fingerprint != base
    no_caption = {k: v for k, v in DATA.items() if k != "caption"}
    assert AnnotationSchema(spec_from(no_caption)).fingerprint != base


def test_the_semantic_id_is_a_part_like_the_others(spec):
    table = AnnotationSchema(spec)
    cols = table.part_columns("semantic_id")
    assert [(c.name, c.type) for c in cols] == [
        ("semantic_id", "array<int32>"), ("semantic_id_tokens", "array<int64>"),
        ("semantic_id_version", "string")]
    assert table.value_column("semantic_id") == "semantic_id"
    assert table.spark_type("array<int32>") == "array<int>"
    arrow = table.arrow_schema()
    assert str(arrow.field("semantic_id").type) == "list<item: int32>"
    assert str(arrow.field("semantic_id_tokens").type) == "list<item: int64>"
    assert table.ranker_columns()[-2:] == ["semantic_id", "semantic_id_tokens"]
    # its version is the fitted quantiser's, which the spec alone does not know
    with pytest.raises(SchemaError, match="quantizer_version"):
        table.part_version("semantic_id")
    fitted = AnnotationSchema(spec, quantizer_version="q1")
    assert fitted.part_version("semantic_id") == "q1"
    assert fitted.fingerprint == table.fingerprint  # a value, not a column
    # the columns exist with the section; its settings are values, not columns
    other = yaml.safe_load(yaml.safe_dump(DATA))
    other["semantic_id"] = {"levels": 2, "codes": 16}
    assert AnnotationSchema(spec_from(other)).fingerprint == table.fingerprint
    assert spec_from(other).version != spec.version
    other.pop("semantic_id")
    assert AnnotationSchema(spec_from(other)).fingerprint != table.fingerprint
    assert "semantic_id" not in AnnotationSchema(spec_from(other)).names
    assert spec.restricted(["vibe"]).semantic_id is None
    assert spec.restricted(["semantic_id"]).semantic_id == spec.semantic_id


def test_bad_keys_and_names_are_refused(spec):
    assert id_type_of("int") == id_type_of("bigint") == "int64"
    assert id_type_of("string") == "string"
    with pytest.raises(SchemaError, match="strings or integers"):
        id_type_of("double")
    with pytest.raises(SchemaError, match="name of a feature table column"):
        AnnotationSchema(spec, id_column="model")
    bad = yaml.safe_load(yaml.safe_dump(DATA))
    bad["attributes"]["caption"] = bad["attributes"].pop("audience")
    with pytest.raises(SpecError, match="'caption' names the spec's caption"):
        spec_from(bad)


def test_feast_view_from_spec_and_entity(spec, tmp_path):
    from feast import Entity, ValueType
    from feast.types import Array, Float64, Int32, Int64, String

    sku = Entity(name="book", join_keys=["sku"], value_type=ValueType.STRING)
    view = annotation_feature_view(spec, sku, table=str(tmp_path / "t"), name="books")
    fields = {f.name: f.dtype for f in view.features}
    assert fields["vibe_label"] == String and fields["vibe_confidence"] == Float64
    assert fields["caption_tokens"] == Array(Int64) and "sku" not in fields
    assert fields["semantic_id"] == Array(Int32) and fields["semantic_id_tokens"] == Array(Int64)
    assert set(fields) == {c.name for c in AnnotationSchema(spec, "sku", "string").features}
    layout = AnnotationSchema(spec)
    assert view.batch_source.path == FeatureTable(str(tmp_path / "t")).glob(layout)
    assert view.batch_source.created_timestamp_column == "created_timestamp"
    assert view.tags["spec_version"] == spec.version
    spark_source = annotation_source(str(tmp_path / "t"), spec, offline_store="spark")
    assert spark_source.path == FeatureTable(str(tmp_path / "t")).directory(layout)
    floats = Entity(name="x", join_keys=["x"], value_type=ValueType.DOUBLE)
    with pytest.raises(ValueError, match="ValueType.STRING or"):
        annotation_feature_view(spec, floats, table=str(tmp_path / "t"))
