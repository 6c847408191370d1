"""The feature table's schema, derived from the spec: the one place that names its columns.

Every layer takes its columns from here: the SQL functions' return types, the annotate
job's output, the Feast feature view's fields, the generated expectation suites and the
ranker's feature list. Nothing else keeps a copy of an attribute or label list.

A spec's *parts* are its attributes, its caption and its semantic ID: each is annotated,
versioned and reused on its own, so editing one attribute's definition re-annotates that
attribute alone.

    id column                 the catalogue's key (string or int64, named as in the input)
    event_timestamp           when this row's values became valid (see docs/ARCHITECTURE.md)
    created_timestamp         when the row was written (Feast keeps the newest)
    content_hash              sha256 of the item text the row describes
    <attr>_label, <attr>_confidence, <attr>_version        per single-label attribute
    <attr>_label, <attr>_confidence, <attr>_value, <attr>_version
                                                            per ordinal attribute (the value is
        the expected value of the labels' numbers under the label distribution)
    <attr>_labels, <attr>_scores, <attr>_version            per multi-label attribute: the
        chosen labels (array<string>, spec order) and every label's probability
        (array<double>, aligned with the spec's labels)
    caption, caption_tokens, caption_version                when the spec has a caption
    semantic_id, semantic_id_tokens, semantic_id_version    when the spec has a semantic ID:
        the code path (array<int32>, one code per level), one int64 token per prefix
        (udfs.semantic_ids.prefix_tokens) and the fitted quantiser's version
    model, labelled_by, spec_version, error                 provenance

Types are neutral names ("string", "int64", "double", "timestamp", "array<int64>",
"array<int32>", "array<string>", "array<double>") that map to Spark DDL, Arrow and Feast types; this module imports neither
Spark nor Feast.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property

from udfs.spec import Spec

STRING, INT64, DOUBLE, TIMESTAMP, TOKENS = "string", "int64", "double", "timestamp", "array<int64>"
CODES, LABELS, SCORES = "array<int32>", "array<string>", "array<double>"
ID_TYPES = (STRING, INT64)
CAPTION = "caption"  # the caption's part name; attributes are named by the spec
SEMANTIC_ID = "semantic_id"  # the semantic ID's part name, and its code-path column

EVENT_TIMESTAMP, CREATED_TIMESTAMP = "event_timestamp", "created_timestamp"
CONTENT_HASH, MODEL, LABELLED_BY, SPEC_VERSION, ERROR = (
    "content_hash", "model", "labelled_by", "spec_version", "error")
CAPTION_TOKENS, CAPTION_VERSION = "caption_tokens", "caption_version"
SEMANTIC_ID_TOKENS, SEMANTIC_ID_VERSION = "semantic_id_tokens", "semantic_id_version"

_SPARK = {STRING: "string", INT64: "bigint", DOUBLE: "double", TIMESTAMP: "timestamp",
          TOKENS: "array<bigint>", CODES: "array<int>", LABELS: "array<string>",
          SCORES: "array<double>"}


class SchemaError(ValueError):
    """A spec or key that cannot make a feature table; the message says what to change."""


def label(attribute: str) -> str:
    return f"{attribute}_label"


def confidence(attribute: str) -> str:
    return f"{attribute}_confidence"


def version(part: str) -> str:
    return f"{part}_version"


def labels(attribute: str) -> str:
    """A multi-label attribute's chosen labels."""
    return f"{attribute}_labels"


def scores(attribute: str) -> str:
    """A multi-label attribute's per-label probabilities, in spec order."""
    return f"{attribute}_scores"


def value(attribute: str) -> str:
    """An ordinal attribute's expected value."""
    return f"{attribute}_value"


def share_column(attribute: str, label: str) -> str:
    """The ranker's user feature: the user's past share of items with this label."""
    return f"user_{attribute}_share_" + re.sub(r"\W", "_", label)


def share_columns(spec: Spec) -> list[str]:
    return [share_column(a, lab) for a, attr in spec.attributes.items() for lab in attr.labels]


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    part: str | None = None  # the attribute (or "caption") whose annotation fills it
    feature: bool = True     # served as a Feast feature (keys and timestamps are not)


@dataclass(frozen=True)
class AnnotationSchema:
    """The feature table for `spec`, keyed by `id_column` of type `id_type`.

    `quantizer_version` is the fitted semantic-ID quantiser's version: the semantic_id part's
    version, which the spec alone does not decide (only the annotate job's planning needs it;
    columns, types and the fingerprint do not depend on it)."""
    spec: Spec
    id_column: str = "item_id"
    id_type: str = INT64
    quantizer_version: str | None = None

    def __post_init__(self) -> None:
        if self.id_type not in ID_TYPES:
            raise SchemaError(f"item ids must be strings or integers, not {self.id_type}")
        if not self.id_column:
            raise SchemaError("the id column needs a name")
        for part in (CAPTION, SEMANTIC_ID):
            if part in self.spec.attributes:
                raise SchemaError(f"an attribute may not be called {part!r} (a part's name)")
        if self.names.count(self.id_column) > 1:
            raise SchemaError(f"the id column {self.id_column!r} has the name of a feature "
                              "table column; rename it in the input")

    @property
    def parts(self) -> list[str]:
        """What is annotated, versioned and reused separately: attributes, then the caption,
        then the semantic ID."""
        return [*self.spec.attributes, *([CAPTION] if self.spec.caption else []),
                *([SEMANTIC_ID] if self.spec.semantic_id else [])]

    def part_version(self, part: str) -> str:
        """The current version of a part: its content hash in the spec; for the semantic ID,
        its fitted quantiser's version."""
        if part == CAPTION:
            return self.spec.caption.version
        if part == SEMANTIC_ID:
            if self.quantizer_version is None:
                raise SchemaError("the semantic_id part's version is its fitted quantiser's: "
                                  "build the schema with quantizer_version=")
            return self.quantizer_version
        return self.spec.attribute(part).version

    def part_columns(self, part: str) -> list[Column]:
        if part == CAPTION:
            return [Column(CAPTION, STRING, part), Column(CAPTION_TOKENS, TOKENS, part),
                    Column(CAPTION_VERSION, STRING, part)]
        if part == SEMANTIC_ID:
            return [Column(SEMANTIC_ID, CODES, part), Column(SEMANTIC_ID_TOKENS, TOKENS, part),
                    Column(SEMANTIC_ID_VERSION, STRING, part)]
        attribute = self.spec.attribute(part)
        if attribute.multi:
            return [Column(labels(part), LABELS, part), Column(scores(part), SCORES, part),
                    Column(version(part), STRING, part)]
        return [Column(label(part), STRING, part), Column(confidence(part), DOUBLE, part),
                *([Column(value(part), DOUBLE, part)] if attribute.ordinal else []),
                Column(version(part), STRING, part)]

    def value_column(self, part: str) -> str:
        """The column that is null exactly when the part's annotation failed."""
        if part in (CAPTION, SEMANTIC_ID):
            return part
        return labels(part) if self.spec.attribute(part).multi else label(part)

    @cached_property
    def columns(self) -> list[Column]:
        """Every column of the table, in order."""
        cols = [Column(self.id_column, self.id_type, feature=False),
                Column(EVENT_TIMESTAMP, TIMESTAMP, feature=False),
                Column(CREATED_TIMESTAMP, TIMESTAMP, feature=False)]
        for part in self.parts:
            cols += self.part_columns(part)
        cols += [Column(MODEL, STRING), Column(LABELLED_BY, STRING), Column(SPEC_VERSION, STRING),
                 Column(CONTENT_HASH, STRING), Column(ERROR, STRING)]
        return cols

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def features(self) -> list[Column]:
        """The columns a Feast feature view serves."""
        return [c for c in self.columns if c.feature]

    def udf_columns(self, parts: list[str] | None = None) -> list[Column]:
        """What annotate_all() returns for `parts` (default: all): their columns, the
        model and the row's error."""
        cols = [c for p in (self.parts if parts is None else parts) for c in self.part_columns(p)]
        return cols + [Column(MODEL, STRING), Column(ERROR, STRING)]

    def ranker_columns(self) -> list[str]:
        """Annotation features a ranker can use: labels and confidences (a multi-label
        attribute's chosen labels and scores, an ordinal one's value too), caption tokens,
        the semantic ID's codes and prefix tokens."""
        cols = [c.name for a in self.spec.attributes for c in self.part_columns(a)
                if c.name != version(a)]
        cols += [CAPTION_TOKENS] if self.spec.caption else []
        return cols + ([SEMANTIC_ID, SEMANTIC_ID_TOKENS] if self.spec.semantic_id else [])

    @property
    def fingerprint(self) -> str:
        """Names and types of the feature columns: a table directory holds one fingerprint,
        so files of one directory always share their columns. Label sets, prompts and
        versions are values, not columns, and do not change it, nor does reordering the
        spec (readers match Parquet columns by name)."""
        payload = sorted([c.name, c.type] for c in self.features)  # spec order is not a column
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:12]

    # --- type mappings -------------------------------------------------------------------

    @staticmethod
    def spark_type(kind: str) -> str:
        return _SPARK[kind]

    def spark_ddl(self, columns: list[Column] | None = None) -> str:
        """A Spark DDL string ("a string, b double, ...")."""
        return ", ".join(f"`{c.name}` {_SPARK[c.type]}" for c in (columns or self.columns))

    def arrow_schema(self, columns: list[Column] | None = None):
        import pyarrow as pa

        kinds = {STRING: pa.string(), INT64: pa.int64(), DOUBLE: pa.float64(),
                 TIMESTAMP: pa.timestamp("us", tz="UTC"), TOKENS: pa.list_(pa.int64()),
                 CODES: pa.list_(pa.int32()), LABELS: pa.list_(pa.string()),
                 SCORES: pa.list_(pa.float64())}
        return pa.schema([(c.name, kinds[c.type]) for c in (columns or self.columns)])

    def feast_fields(self) -> list:
        """feast.Field per feature column."""
        from feast import Field
        from feast.types import Array, Float64, Int32, Int64, String

        kinds = {STRING: String, INT64: Int64, DOUBLE: Float64, TOKENS: Array(Int64),
                 CODES: Array(Int32), LABELS: Array(String), SCORES: Array(Float64)}
        return [Field(name=c.name, dtype=kinds[c.type]) for c in self.features]

    def describe(self) -> dict:
        """What a table directory records about itself (_schema.json)."""
        return {"fingerprint": self.fingerprint, "spec": self.spec.name,
                "id_column": self.id_column, "id_type": self.id_type,
                "columns": [[c.name, c.type] for c in self.columns]}


def id_type_of(spark_type_name: str) -> str:
    """The schema id type for a Spark simpleString ("bigint", "int", "string", ...)."""
    if spark_type_name in ("tinyint", "smallint", "int", "bigint"):
        return INT64
    if spark_type_name == "string":
        return STRING
    raise SchemaError(f"item ids must be strings or integers; the id column is {spark_type_name} "
                      "(cast it in a --sql query or in the input)")
