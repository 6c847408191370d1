"""Annotate an item table with LLM features and append them to the offline feature table.

    spark-submit spark_jobs/annotate.py --spec specs/movielens.yaml \
        --input items.parquet --output feature_repo/data/item_annotations \
        [--id-column item_id] [--text-columns title,description] [--timestamp-column T]

Incremental per part (each attribute, and the caption): a part is annotated again only for
items that are new, whose text changed, whose previous annotation of that part failed, whose
definition of that part changed in the spec, or that another model labelled (the row's
`model` is not what this run's engine for the row's tier, head or tail, is named; so
switching --engine re-annotates, and --keep-other-models keeps the old labels instead);
every other part of the row is carried over. Items with nothing to redo get no new row. A run appends one file to the table's
history and commits it with a single object move (udfs.table), so readers see the previous
table or the new one, never a partial one, and a re-run or a retried task leaves no
duplicates.

Time: a new item's row is valid from its --timestamp-column value (when it became available;
the run's time when the column is not given or null); a re-annotation is valid from the run's
time, so point-in-time training before the change still sees the old values and
`feast materialize-incremental` picks up the new ones (docs/ARCHITECTURE.md).

The query (default: `annotate_all(<text columns>)`, or --sql) runs over the view `items`
(the input's rows that need work, plus `content_hash`). It returns the id column and either
an annotate_all(...) column, or one column per attribute named after it
(`annotate('mood', text) AS mood`), `caption(text) AS caption` and `semantic_id(text) AS
semantic_id`. A WHERE clause is fine: rows it does not select keep their previous annotation,
or stay absent if they have none.

Spark Connect: `spark-submit --remote sc://host:port spark_jobs/annotate.py ...` (or
--remote, or run() with a Connect session) runs the same job; the udfs package is shipped to
the server's Python workers and the engine's work is counted from the functions' output
rows (udfs.connect, docs/ARCHITECTURE.md).

Semantic IDs (a `semantic_id:` section in the spec): before planning, the job takes the
quantiser saved under the table for the spec's settings and the engine's embedding model, or
fits one on a sample of the input's --text-columns (udfs.semantic_fit) and saves it under
`<output>/_quantizers/<version>/`; `--refit-semantic-ids` fits again. The semantic_id part's
version is the quantiser's, so its codes are assigned again exactly when the quantiser
changes. The closing report gives the quantiser and its code usage over the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from udfs import register
from udfs import schema as S
from udfs import semantic_ids
from udfs.engines import (DEFAULT_ENGINE, EngineConfigError, can_tag, check_config,
                          label_models, parse_engine)
from udfs import connect
from udfs.connect import ConnectError
from udfs.functions import METRICS, sum_metrics
from udfs.schema import AnnotationSchema, SchemaError, id_type_of
from udfs.semantic_fit import quantizer_for
from udfs.semantic_ids import QuantizerError
from udfs.spec import Spec, SpecError, load_spec
from udfs.table import FeatureTable, TableError, new_run_id, run_file_name

log = logging.getLogger("annofeat.annotate")
HASH_SEP = "\u241f"  # a separator that does not occur in ordinary text
PREV = "__prev_"     # prefix of the previous row's columns while planning
REASONS = ("full", "new", "content", "definition", "engine", "retry")
KEEP = "__keep"      # staged rows: false for a row staged only for its engine metrics


class JobError(RuntimeError):
    """A problem with the job's inputs or configuration; the message says what to fix."""


def default_query(text_columns: list[str]) -> str:
    # annotate_all: one UDF call, so one Python worker and one engine per task
    cols = ", ".join(f"`{c}`" for c in text_columns)
    return f"SELECT *, annotate_all({cols}) AS annotations FROM items"


def read_table(spark: SparkSession, path: str) -> DataFrame:
    if path.endswith(".csv"):
        return spark.read.csv(path, header=True, inferSchema=True)
    if path.endswith(".json") or path.endswith(".jsonl"):
        return spark.read.json(path)
    return spark.read.parquet(path)


@dataclass(frozen=True)
class Routing:
    """Head items go to the main engine, tail items to a cheaper one (e.g. a distilled student).

    Head = popularity >= min_popularity, or the `head_budget` most popular items to annotate.
    """
    engine: dict
    popularity_column: str
    min_popularity: float | None = None
    head_budget: int | None = None

    def split(self, todo: DataFrame, id_column: str) -> tuple[DataFrame, DataFrame]:
        if self.popularity_column not in todo.columns:
            raise JobError(f"routing needs the popularity column {self.popularity_column!r}; "
                           f"the input has {todo.columns}")
        pop = F.coalesce(F.col(self.popularity_column).cast("double"), F.lit(0.0))
        if self.head_budget is not None:
            head = todo.orderBy(pop.desc(), F.col(id_column)).limit(self.head_budget)
            tail = todo.join(head.select(id_column), id_column, "left_anti")
            return head, tail
        threshold = self.min_popularity if self.min_popularity is not None else 0.0
        return todo.where(pop >= threshold), todo.where(pop < threshold)


# --- reading the query's output ---------------------------------------------------------

def annotation_columns(result: DataFrame, table: AnnotationSchema, parts: list[str]) -> list:
    """The query's columns for `parts` in table form, plus `__model`, `__error` and
    `__metrics` (the functions' engine metrics, an array of JSON strings or nulls).

    Accepts an annotate_all() struct (any alias) or, per part, a column named after it
    (annotate('x', ...) AS x, caption(...) AS caption). Raises JobError naming what is
    missing, so a bad query fails before any engine work.
    """
    wanted = [c.name for p in parts for c in table.part_columns(p)]
    for field in result.schema.fields:
        if isinstance(field.dataType, StructType) and \
                set(wanted) | {S.MODEL, S.ERROR} <= set(field.dataType.fieldNames()):
            c = F.col(f"`{field.name}`")
            return ([c[n].alias(n) for n in wanted]
                    + [c[S.MODEL].alias("__model"), c[S.ERROR].alias("__error"),
                       _metrics([field], [c])])
    cols, models, errors, missing, fields = [], [], [], [], []
    for part in parts:
        field = next((f for f in result.schema.fields if f.name == part), None)
        if field is None or not isinstance(field.dataType, StructType):
            missing.append(part)
            continue
        c = F.col(f"`{part}`")
        fields.append((field, c))
        if part == S.CAPTION:
            cols += [c["caption"].alias(S.CAPTION), c["tokens"].alias(S.CAPTION_TOKENS),
                     c["version"].alias(S.CAPTION_VERSION)]
        elif part == S.SEMANTIC_ID:
            cols += [c["codes"].alias(S.SEMANTIC_ID), c["tokens"].alias(S.SEMANTIC_ID_TOKENS),
                     c["version"].alias(S.SEMANTIC_ID_VERSION)]
        elif table.spec.attribute(part).multi:
            cols += [c["labels"].alias(S.labels(part)), c["scores"].alias(S.scores(part)),
                     c["version"].alias(S.version(part))]
            models.append(c["model"])
        else:
            cols += [c["label"].alias(S.label(part)), c["confidence"].alias(S.confidence(part)),
                     *([c["value"].alias(S.value(part))]
                       if table.spec.attribute(part).ordinal else []),
                     c["version"].alias(S.version(part))]
            models.append(c["model"])
        errors.append(F.when(c["error"].isNotNull(), F.concat(F.lit(part + ": "), c["error"])))
    if missing:
        raise JobError(
            f"the query returns no annotation for {missing}: return annotate_all(<text>) or, "
            f"per part, a column named after it (annotate('{missing[0]}', <text>) AS "
            f"{missing[0]}, annotate_multi(...) for a multi-label attribute, "
            f"caption(<text>) AS caption, semantic_id(<text>) AS semantic_id); "
            f"it returns {result.columns}")
    model = F.coalesce(*models) if models else F.lit(None).cast("string")
    error = F.concat_ws("; ", *errors)
    return cols + [model.alias("__model"), F.when(error != "", error).alias("__error"),
                   _metrics([f for f, _ in fields], [c for _, c in fields])]


def _metrics(fields, columns):
    """The `__metrics` fields of the functions' structs (register(metrics=True)) as one
    array column; an empty array for structs without one."""
    found = [c[METRICS] for f, c in zip(fields, columns)
             if METRICS in f.dataType.fieldNames()]
    return (F.array(*found) if found else F.array().cast("array<string>")).alias(METRICS)


# --- planning: what each item needs ------------------------------------------------------

def latest(history: DataFrame, key: str) -> DataFrame:
    """The newest row per item, by Feast's rule (event time, then created time)."""
    w = Window.partitionBy(key).orderBy(F.col(S.EVENT_TIMESTAMP).desc(),
                                        F.col(S.CREATED_TIMESTAMP).desc())
    return history.withColumn("__n", F.row_number().over(w)).where("__n = 1").drop("__n")


def project(history: DataFrame, table: AnnotationSchema) -> DataFrame:
    """Rows of an older table in this schema's columns: absent columns are null (so their
    parts count as never annotated), columns the spec no longer has are dropped."""
    return history.select(*[
        (F.col(c.name) if c.name in history.columns else F.lit(None))
        .cast(table.spark_type(c.type)).alias(c.name) for c in table.columns])


def reason(part: str, table: AnnotationSchema, full: bool, models: dict | None = None):
    """Why `part` must be annotated for a row (null: it can be reused).

    models: {routing tier: the model names whose labels this run's engine for that tier
    reproduces (Engine.same_labels)}; a row labelled by another model has its engine's
    parts redone ("engine"). A tier missing or None (a model only known once built), or a
    row whose model is unknown, is kept.
    The semantic ID is the embedder's, versioned by its quantiser, so no model applies."""
    p = lambda name: F.col(PREV + name)  # noqa: E731
    other_model = F.lit(False)
    for tier, names in (models or {}).items():
        if names:
            if isinstance(names, str):
                names = [names]
            other_model = F.when(p(S.LABELLED_BY) == tier,
                                 ~p(S.MODEL).isin(*names)).otherwise(other_model)
    other_model = F.lit(part != S.SEMANTIC_ID) & p(S.MODEL).isNotNull() & other_model
    return (F.when(F.lit(full), "full")
            .when(p(table.id_column).isNull(), "new")
            .when(~p(S.CONTENT_HASH).eqNullSafe(F.col(S.CONTENT_HASH)), "content")
            .when(~p(S.version(part)).eqNullSafe(F.lit(table.part_version(part))), "definition")
            .when(other_model, "engine")
            .when(p(table.value_column(part)).isNull(), "retry"))


def plan(hashed: DataFrame, previous: DataFrame | None, table: AnnotationSchema,
         full: bool, models: dict | None = None) -> DataFrame:
    """The input with the previous row's columns (PREV-prefixed), a reason per part and
    `__todo`: the comma-joined parts to annotate ("" when nothing). models: see reason."""
    key = table.id_column
    if previous is None:
        prev = hashed.sparkSession.createDataFrame([], table.spark_ddl())
    else:
        prev = previous
    prev = prev.select(*[F.col(c).alias(PREV + c) for c in table.names])
    joined = hashed.join(prev, hashed[key] == prev[PREV + key], "left")
    for part in table.parts:
        joined = joined.withColumn(f"__why_{part}", reason(part, table, full, models))
    todo = F.concat_ws(",", *[F.when(F.col(f"__why_{p}").isNotNull(), F.lit(p))
                              for p in table.parts])
    return joined.withColumn("__todo", todo)


def part_counts(planned: DataFrame, table: AnnotationSchema) -> tuple[dict, dict]:
    """Per part {reason: rows}, and {todo parts: rows}, in one pass over the plan."""
    aggs = [F.sum(F.when(F.col(f"__why_{p}") == r, 1).otherwise(0)).alias(f"{p}|{r}")
            for p in table.parts for r in REASONS]
    row = planned.agg(*aggs).first().asDict()
    by_part = {p: {r: int(row[f"{p}|{r}"] or 0) for r in REASONS if row[f"{p}|{r}"]}
               for p in table.parts}
    groups = {r["__todo"]: r["count"] for r in
              planned.where(F.col("__todo") != "").groupBy("__todo").count().collect()}
    return by_part, groups


def table_rows(annotated: DataFrame, rows: DataFrame, table: AnnotationSchema,
               parts: list[str], tier: str, run_ts: datetime) -> DataFrame:
    """Complete table rows: the annotated parts from the query, the other parts carried over
    from the previous row, stamped per the time rule; plus the query's `__metrics` and
    `__keep`, false for a row that changes nothing (it is staged for its metrics only)."""
    key = table.id_column
    # a left join: a row the query invented (an id not in `items`) keeps a null content
    # hash, which _check_staged refuses
    slim = rows.select(F.col(key), S.CONTENT_HASH, "__available",
                       *[PREV + c for c in table.names])
    joined = annotated.join(slim, key, "left")
    prev = lambda name: F.col(PREV + name)  # noqa: E731
    now = F.lit(run_ts).cast("timestamp")
    event = (F.when(prev(key).isNull(), F.coalesce(F.col("__available"), now))
             .otherwise(F.greatest(now, prev(S.EVENT_TIMESTAMP))))
    out = {key: F.col(key), S.EVENT_TIMESTAMP: event, S.CREATED_TIMESTAMP: now}
    for part in table.parts:
        for c in table.part_columns(part):
            out[c.name] = F.col(c.name) if part in parts else prev(c.name)
    out.update({S.MODEL: F.col("__model"), S.LABELLED_BY: F.lit(tier),
                S.SPEC_VERSION: F.lit(table.spec.version), S.CONTENT_HASH: F.col(S.CONTENT_HASH),
                S.ERROR: F.col("__error")})
    # A retry that fails again the same way changes nothing: write no row for it, so a
    # permanently bad item (e.g. empty text) does not grow the history on every run.
    same = prev(key).isNotNull() & prev(S.CONTENT_HASH).eqNullSafe(F.col(S.CONTENT_HASH)) \
        & prev(S.ERROR).eqNullSafe(F.col("__error")) & prev(S.MODEL).eqNullSafe(F.col("__model"))
    for part in parts:
        for c in table.part_columns(part):
            same = same & prev(c.name).eqNullSafe(F.col(c.name))
    return joined.select(*[out[c.name].cast(table.spark_type(c.type)).alias(c.name)
                           for c in table.columns], F.col(METRICS), (~same).alias(KEEP))


# --- the run -----------------------------------------------------------------------------

def tuned_model_notes(spec: Spec, engines: list[dict]) -> list[str]:
    """One line per engine whose model directory is a spark_jobs.finetune output (it has a
    card.json) and this spec asks it what it was not trained on: attributes other than the
    card's, or the card's attribute at another version (its definition changed since)."""
    notes = []
    for config in engines:
        card_path = Path(str(config.get("model", ""))) / "card.json"
        try:
            card = json.loads(card_path.read_text())
            tuned, version = card["attribute"], card["attribute_version"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        name = card_path.parent.name
        if tuned in spec.attributes and spec.attribute(tuned).version != version:
            notes.append(f"{name} was fine-tuned on {tuned} version {version}; this spec's "
                         f"{tuned} is version {spec.attribute(tuned).version} (its definition "
                         "changed since): fine-tune again on the new definition")
        others = [a for a in spec.attributes if a != tuned]
        if others:
            notes.append(f"{name} was fine-tuned on {tuned} only; it answers "
                         f"{', '.join(others)} (and any caption) untrained")
    return notes


def _fault(step: str) -> None:
    """Fault injection for the commit-protocol tests: ANNOFEAT_FAULT=<step> kills the driver
    at that step, as a crash or a SIGKILL would (no cleanup runs)."""
    import os
    if os.environ.get("ANNOFEAT_FAULT") == step:
        print(f"[annotate] fault injected at {step}", flush=True)
        os._exit(137)


def available_time(items: DataFrame, column: str | None):
    """When each item became available: the named column as a timestamp (numbers are epoch
    seconds), null where absent (the run's time is used then)."""
    if column is None:
        return F.lit(None).cast("timestamp")
    kind = items.schema[column].dataType.simpleString()
    c = F.col(f"`{column}`")
    if kind in ("tinyint", "smallint", "int", "bigint", "float", "double") \
            or kind.startswith("decimal"):
        return F.timestamp_seconds(c)
    return F.try_to_timestamp(c) if kind == "string" else c.cast("timestamp")


def check_input(items: DataFrame, id_column: str, text_columns: list[str],
                timestamp_column: str | None) -> str:
    """Fail before any engine work on a table the job cannot use; returns the id type."""
    needed = [id_column, *text_columns, *([timestamp_column] if timestamp_column else [])]
    missing = [c for c in needed if c not in items.columns]
    if missing:
        raise JobError(f"input table lacks columns {missing}; it has {items.columns}")
    try:
        id_type = id_type_of(items.schema[id_column].dataType.simpleString())
    except SchemaError as exc:
        raise JobError(str(exc)) from None
    bad_ids = items.groupBy(id_column).count().where(
        F.col(id_column).isNull() | (F.col("count") > 1)).limit(5).collect()
    if bad_ids:
        raise JobError(f"{id_column} must be unique and non-null; offending ids: "
                       f"{[r[id_column] for r in bad_ids]}")
    if timestamp_column and items.schema[timestamp_column].dataType.simpleString() == "string":
        c = F.col(f"`{timestamp_column}`")
        bad = items.where(c.isNotNull() & F.try_to_timestamp(c).isNull()).limit(3).collect()
        if bad:
            raise JobError(f"--timestamp-column {timestamp_column!r} holds values that are not "
                           f"timestamps, e.g. {[r[timestamp_column] for r in bad]}")
    return id_type


def run(spark: SparkSession, spec: Spec, items: DataFrame, output: str,
        engine: dict | None = None, sql: str | None = None, id_column: str = "item_id",
        text_columns: list[str] | None = None, timestamp_column: str | None = None,
        full: bool = False, fail_on_error: bool = False, routing: Routing | None = None,
        refit_semantic_ids: bool = False, embed_engine: dict | None = None,
        keep_other_models: bool = False, progress=print) -> dict:
    """Annotate what `items` needs into the feature table at `output`; returns the report.

    `embed_engine` (default: `engine`) embeds the texts for semantic IDs: needed when the
    annotating engine cannot embed (vllm, transformers, openai, a student).
    A row labelled by another model than this run's engine for its tier (head: `engine`,
    tail: the routing engine) is redone, unless `keep_other_models`."""
    engine = dict(engine or DEFAULT_ENGINE)
    embedder = engine if embed_engine is None else embed_engine  # for every routing tier
    started = time.time()
    run_ts = datetime.now(timezone.utc)  # aware: PySpark reads naive times as local time
    run_id = new_run_id()
    text_columns = text_columns or ["title", "description"]
    id_type = check_input(items, id_column, text_columns, timestamp_column)
    try:
        table = AnnotationSchema(spec, id_column, id_type)
    except SchemaError as exc:
        raise JobError(str(exc)) from None
    store = FeatureTable(output)
    output = store.root  # absolute: a Connect server resolves relative paths in its own cwd
    try:
        store.check_key(table)
    except TableError as exc:
        raise JobError(str(exc)) from None
    query = sql or default_query(text_columns)
    say = lambda msg: progress(f"[annotate] {msg}", flush=True)  # noqa: E731
    for note in tuned_model_notes(spec, [engine] + ([routing.engine] if routing else [])):
        say(f"note: {note}")

    # The query's shape is checked on an empty view before any engine work (the semantic
    # ID, whose quantiser is not fitted yet, in the passes).
    hashed = (items
              .withColumn(S.CONTENT_HASH, F.sha2(F.concat_ws(HASH_SEP, *[
                  F.coalesce(F.col(f"`{c}`").cast("string"), F.lit("")) for c in text_columns]),
                  256))
              .withColumn("__available", available_time(items, timestamp_column)))
    view_columns = [F.col(f"`{c}`") for c in [*items.columns, S.CONTENT_HASH]]
    _query(spark, spec, hashed.limit(0).select(*view_columns), query, engine, fail_on_error,
           table, [p for p in table.parts if p != S.SEMANTIC_ID], embedder=embedder)

    quantizer, sid_info = None, None
    if spec.semantic_id is not None:
        try:
            quantizer, sid_info = quantizer_for(
                items, text_columns, spec, embedder, table_root=output, id_column=id_column,
                refit=refit_semantic_ids, say=say)
        except QuantizerError as exc:
            raise JobError(str(exc)) from None
        table = AnnotationSchema(spec, id_column, id_type, quantizer_version=quantizer.version)

    previous, migrate, migrated_from = _previous(spark, store, table)
    models = None if keep_other_models else _tier_models(engine, routing)
    planned = plan(hashed, None if previous is None else latest(previous, id_column),
                   table, full, models).persist()
    try:
        rows_in = planned.count()
        by_part, groups = part_counts(planned, table)
        n_todo = sum(groups.values())
        say(f"{rows_in} rows in, {rows_in - n_todo} unchanged, {n_todo} to annotate"
            + "".join(f"; {p}: " + ", ".join(f"{n} {r}" for r, n in why.items())
                      for p, why in by_part.items() if why))
        staged, write_seconds = [], 0.0
        for i, (parts_key, n) in enumerate(sorted(groups.items(), key=lambda kv: -kv[1])):
            parts = parts_key.split(",")
            rows = planned.where(F.col("__todo") == parts_key)
            view = rows.select(*view_columns)
            parallelism = connect.parallelism(spark)
            view = view.repartition(parallelism)  # spread even a one-file input over every core
            tiers = [(view, engine, "head")]
            if routing is not None:
                head, tail = routing.split(view, id_column)
                tiers = [(head, engine, "head"), (tail, routing.engine, "tail")]
            for frame, cfg, tier in tiers:
                say(f"pass {i + 1}/{len(groups)} ({tier}): {', '.join(parts)} for "
                    f"{'up to ' if routing else ''}{n} rows")
                annotated = _query(spark, spec, frame, query, cfg, fail_on_error,
                                   table, parts, quantizer, embedder)
                out = table_rows(annotated, rows, table, parts, tier, run_ts)
                path = f"{store.staging(run_id)}/pass-{len(staged)}"
                t0 = time.time()
                out.write.mode("error").parquet(path)
                write_seconds += time.time() - t0
                staged.append(path)
        stats = _check_staged(spark, staged, planned, table, n_todo)
        if stats["n"] < n_todo:
            say(f"{n_todo - stats['n']} rows needing work were not written: not selected by "
                "the query, or retried and failed again the same way; they keep their "
                "previous row (or stay absent)")
        if stats["past"]:
            say(f"{stats['past']} new items are stamped with their availability, the earliest "
                f"{stats['earliest']:%Y-%m-%dT%H:%M:%S}: `feast materialize-incremental` skips "
                "rows stamped before its last run; materialize that window with `feast "
                "materialize`")
        _fault("staged")
        committed = []
        if migrate is not None:
            committed.append(_commit(store, table, migrate, run_id, run_ts, "migrated"))
            _fault("migrated")
        if stats["n"]:
            new = spark.read.parquet(*staged).where(F.col(KEEP))
            committed.append(_commit(store, table, new, run_id, run_ts))
        _fault("committed")
    finally:
        planned.unpersist()
        store.clean(run_id)
    if quantizer is not None:
        sid_info = {**sid_info, "levels": spec.semantic_id.levels,
                    "codes": spec.semantic_id.codes,
                    "usage": code_usage(spark, store, table, quantizer)}
        say(f"semantic IDs {quantizer.version}: "
            f"{semantic_ids.describe_usage(sid_info['usage'])}")
    stale = store.stale_staging(own=run_id)
    if stale:
        say(f"{len(stale)} staging directories of other runs (killed, or still running): "
            f"{stale[:3]}; remove them once no job writes to {output}")
    return {
        "rows_in": rows_in, "rows_annotated": stats["n"], "rows_reused": rows_in - n_todo,
        "rows_not_written": n_todo - stats["n"], "rows_written": stats["n"],
        "rows_with_errors": stats["errors"], "rows_by_tail_engine": stats["tail"],
        "parts": {p: {"annotated": sum(why.values()), "reasons": why,
                      **stats["tokens"].get(p, {})}
                  for p, why in by_part.items()},
        "event_timestamp": (f"column {timestamp_column!r} for new items (run time where null), "
                            "run time for re-annotations" if timestamp_column
                            else "run time (no --timestamp-column)"),
        "run_time": run_ts.isoformat(), "run_id": run_id,
        "rows_stamped_before_run": stats["past"],
        "earliest_event_timestamp": stats["earliest"] and stats["earliest"].isoformat(),
        "committed": committed, "migrated_from": migrated_from,
        "stale_staging": stale,
        "seconds": round(time.time() - started, 2),
        "annotate_seconds": round(write_seconds, 2),
        "engine_seconds": round(stats["engine_seconds"], 2),
        "rows_per_second": round(stats["n"] / write_seconds, 1) if stats["n"] else None,
        "spec_version": spec.version, "schema": table.fingerprint, "output": output,
        "semantic_id": sid_info,
    }


def code_usage(spark, store: FeatureTable, table: AnnotationSchema, quantizer) -> dict:
    """Code usage over the table as served (each item's newest row), for the items whose
    codes come from `quantizer`."""
    if not store.exists(table):
        return semantic_ids.usage([], quantizer.config.codes)
    rows = latest(spark.read.parquet(store.directory(table)), table.id_column)
    codes = (rows.where(F.col(S.SEMANTIC_ID_VERSION) == quantizer.version)
             .where(F.col(S.SEMANTIC_ID).isNotNull()).select(S.SEMANTIC_ID).toPandas())
    return semantic_ids.usage(codes[S.SEMANTIC_ID].tolist(), quantizer.config.codes)


def _query(spark, spec, frame, query, engine, fail_on_error,
           table: AnnotationSchema, parts: list[str], quantizer=None,
           embedder: dict | None = None) -> DataFrame:
    """Run the query over `frame` as the view `items` with the SQL functions bound to the
    spec's `parts`; returns the id column and the parts' columns in table form."""
    register(spark, spec.restricted(parts), engine=engine, fail_on_error=fail_on_error,
             quantizer=quantizer, embed_engine=embedder, metrics=True)
    frame.createOrReplaceTempView("items")
    try:
        result = spark.sql(query)
    except Exception as exc:  # AnalysisException, ParseException: the user's query is wrong
        raise JobError(f"the query does not run over the view `items`: "
                       f"{str(exc).splitlines()[0]}") from None
    if table.id_column not in result.columns:
        raise JobError(f"the query must return the id column {table.id_column!r}; "
                       f"it returns {result.columns}")
    return result.select(F.col(f"`{table.id_column}`"), *annotation_columns(result, table, parts))


def _tier_models(engine: dict, routing: Routing | None) -> dict:
    """{tier: the model names whose labels its engine reproduces, its own first}; without
    routing every row, whatever tier labelled it before, goes to the main engine."""
    try:
        head = label_models(engine)
        return {"head": head, "tail": label_models(routing.engine) if routing else head}
    except EngineConfigError as exc:
        raise JobError(str(exc)) from None


def _previous(spark, store: FeatureTable, table: AnnotationSchema):
    """(history in this schema, history to migrate into this schema's new directory, the
    directory it comes from)."""
    if store.exists(table):
        return spark.read.parquet(store.directory(table)), None, None
    dirs = store.directories()
    if not dirs:
        return None, None, None
    _, directory = dirs[0]
    seen = store.recorded(directory) or {}
    if seen.get("id_column", table.id_column) != table.id_column:
        raise JobError(f"{directory} keys items by {seen['id_column']!r}, this input by "
                       f"{table.id_column!r}; write to a new --output")
    history = project(spark.read.parquet(directory), table)
    return history, history, directory


def _check_staged(spark, staged: list[str], planned: DataFrame, table: AnnotationSchema,
                  n_todo: int) -> dict:
    """Refuse (before anything is visible) a query that duplicated or invented rows."""
    if not staged:
        return {"n": 0, "errors": 0, "tail": 0, "past": 0, "earliest": None,
                "engine_seconds": 0.0, "tokens": {}}
    key = table.id_column
    staged_rows = spark.read.parquet(*staged)
    seconds, tokens = sum_metrics(
        r[0] for r in staged_rows.select(F.explode(METRICS)).where(F.col("col").isNotNull())
        .collect())
    new = staged_rows.where(F.col(KEEP))
    row = new.agg(F.count("*").alias("n"), F.countDistinct(key).alias("ids"),
                  F.sum(F.col(S.ERROR).isNotNull().cast("int")).alias("errors"),
                  F.sum((F.col(S.LABELLED_BY) == "tail").cast("int")).alias("tail"),
                  F.sum(F.col(S.CONTENT_HASH).isNull().cast("int")).alias("unknown"),
                  F.sum((F.col(S.EVENT_TIMESTAMP) < F.col(S.CREATED_TIMESTAMP)).cast("int"))
                  .alias("past"), F.min(S.EVENT_TIMESTAMP).alias("earliest")).first()
    if row["unknown"]:
        raise JobError(f"the query returned {row['unknown']} rows whose {key} is not in the "
                       "view `items`; nothing was committed")
    if row["n"] != row["ids"]:
        raise JobError(f"the query returned {row['n']} rows for {row['ids']} distinct ids "
                       f"(a join that repeats rows?); nothing was committed")
    if row["n"] > n_todo:
        raise JobError(f"the query returned {row['n']} rows for the {n_todo} items that "
                       "needed work; nothing was committed")
    return {"n": int(row["n"]), "errors": int(row["errors"] or 0), "tail": int(row["tail"] or 0),
            "past": int(row["past"] or 0), "earliest": row["earliest"],
            "engine_seconds": seconds, "tokens": tokens}


def _commit(store: FeatureTable, table: AnnotationSchema, rows: DataFrame, run_id: str,
            run_ts: datetime, tag: str = "") -> str:
    """Consolidate `rows` into one staged file, then move it into the table (atomic)."""
    staged = f"{store.staging(run_id)}/{tag or 'final'}"
    rows.select(*table.names).coalesce(1).write.mode("error").parquet(staged)
    _fault(f"consolidated{'-' + tag if tag else ''}")
    return store.commit(staged, table, run_file_name(run_ts, run_id, tag))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="annotate", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="attribute spec YAML")
    p.add_argument("--input", required=True, help="item table: Parquet path, .csv or .json")
    p.add_argument("--output", required=True, help="feature table directory (local or URI)")
    p.add_argument("--engine", default=None,
                   help="engine type, inline JSON config, or a YAML/JSON file (default: embedding)")
    p.add_argument("--sql", default=None, help="file with a query over the view `items`")
    p.add_argument("--id-column", default="item_id", help="unique item id (string or integer)")
    p.add_argument("--text-columns", default="title,description",
                   help="comma-separated text columns (default: title,description)")
    p.add_argument("--timestamp-column", default=None,
                   help="when each item became available (timestamp, date, or epoch seconds); "
                        "default: new items are stamped with the run's time")
    p.add_argument("--batch-size", type=int, default=1024,
                   help="rows per Arrow batch handed to the engine")
    p.add_argument("--full", action="store_true", help="re-annotate every part of every row")
    p.add_argument("--keep-other-models", action="store_true",
                   help="keep parts another model labelled (by default a row labelled by a "
                        "model other than this run's engine for its tier is redone)")
    p.add_argument("--refit-semantic-ids", action="store_true",
                   help="fit the semantic-ID quantiser again on the current input (a new "
                        "quantiser re-assigns every item's codes; the same sample gives the "
                        "same quantiser)")
    p.add_argument("--embed-engine", default=None,
                   help="engine whose embeddings give the semantic IDs (default: --engine); "
                        "e.g. embedding beside a generative engine that cannot embed")
    p.add_argument("--fail-on-error", action="store_true",
                   help="fail the job if any row gets an error")
    p.add_argument("--master", default=None, help="Spark master when not using spark-submit")
    p.add_argument("--remote", default=None,
                   help="Spark Connect server, e.g. sc://host:15002 (spark-submit --remote "
                        "sets it too); the project's code is shipped to its Python workers")
    p.add_argument("--report", default=None, help="also write the closing report JSON here")
    p.add_argument("--tail-engine", default=None,
                   help="engine for tail items (e.g. a distilled student); enables routing")
    p.add_argument("--popularity-column", default="popularity",
                   help="input column ranking items for head/tail routing")
    p.add_argument("--head-min-popularity", type=float, default=None,
                   help="items at or above this popularity go to the main engine")
    p.add_argument("--head-budget", type=int, default=None,
                   help="at most this many (most popular) items go to the main engine")
    p.add_argument("--verbose", action="store_true",
                   help="show Spark's and the libraries' own logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.session import get_spark, quiet

    args = parse_args(argv)
    quiet(args.verbose)
    try:
        spec = load_spec(args.spec)
        engine = parse_engine(args.engine)
        check_config(engine)
        embed_engine = parse_engine(args.embed_engine) if args.embed_engine else None
        if embed_engine is not None:
            check_config(embed_engine)
        sql = Path(args.sql).read_text() if args.sql else None
        routing = None
        if args.tail_engine:
            if (args.head_min_popularity is None) == (args.head_budget is None):
                raise JobError("--tail-engine needs exactly one of --head-min-popularity "
                               "and --head-budget")
            routing = Routing(parse_engine(args.tail_engine), args.popularity_column,
                              args.head_min_popularity, args.head_budget)
            check_config(routing.engine)
        multi = [a for a, attr in spec.attributes.items() if attr.multi]
        for config in [engine, *([routing.engine] if routing else [])]:
            if multi and not can_tag(config):
                raise JobError(f"engine {config.get('type')!r} cannot score multi-label "
                               f"attributes ({', '.join(multi)}); use the embedding, "
                               "transformers, vllm or openai engine for them")
        if not Path(args.input).exists() and "://" not in args.input:
            raise JobError(f"input table not found: {args.input}")
        text_columns = [c.strip() for c in args.text_columns.split(",") if c.strip()]
        if not text_columns:
            raise JobError("--text-columns names no column")
    except (SpecError, JobError, EngineConfigError, OSError, ValueError) as exc:
        print(f"annotate: error: {exc}", file=sys.stderr)
        return 2
    spark = get_spark("annofeat-annotate", args.master, {
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(args.batch_size)},
        verbose=args.verbose, remote=args.remote)
    try:
        source = args.input if "://" in args.input else str(Path(args.input).resolve())
        report = run(spark, spec, read_table(spark, source), args.output, engine=engine,
                     sql=sql, id_column=args.id_column, text_columns=text_columns,
                     timestamp_column=args.timestamp_column, full=args.full,
                     fail_on_error=args.fail_on_error, routing=routing,
                     refit_semantic_ids=args.refit_semantic_ids, embed_engine=embed_engine,
                     keep_other_models=args.keep_other_models)
    except (JobError, TableError, ConnectError) as exc:
        print(f"annotate: error: {exc}", file=sys.stderr)
        return 2
    print("[annotate] report " + json.dumps(report), flush=True)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
