"""Annotate an item table with LLM features and write the offline feature table.

    spark-submit spark_jobs/annotate.py --spec specs/movielens.yaml \
        --input items.parquet --output feature_repo/data/item_annotations [--engine embedding]

The query runs over the view `items` (the input plus a `content_hash` column); by default it
calls annotate() for every attribute of the spec and caption() once. Incremental: rows whose
content hash and spec version are already in the output (without error) are reused, not sent to
the engine again. The output is rewritten whole into a temporary directory and swapped in, so a
re-run or a retried task never leaves duplicates or a half-written table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from udfs import register
from udfs.engines import DEFAULT_ENGINE, EngineConfigError, check_config
from udfs.spec import Spec, SpecError, load_spec

log = logging.getLogger("annofeat.annotate")
HASH_SEP = "\u241f"  # a separator that does not occur in ordinary text


class JobError(RuntimeError):
    """A problem with the job's inputs or configuration; the message says what to fix."""


def default_query(spec: Spec, text_columns: list[str]) -> str:
    # annotate_all: one UDF call, so one Python worker and one engine per task
    return f"SELECT *, annotate_all({', '.join(text_columns)}) AS annotations FROM items"


def parse_engine(value: str | None) -> dict:
    """--engine accepts a type name, inline JSON, or a YAML/JSON file."""
    if not value:
        return dict(DEFAULT_ENGINE)
    if value.lstrip().startswith("{"):
        return json.loads(value)
    if Path(value).is_file():
        config = yaml.safe_load(Path(value).read_text())
        if not isinstance(config, dict) or "type" not in config:
            raise JobError(f"engine file {value} must be a mapping with a 'type' key")
        return config
    return {"type": value}


def read_table(spark: SparkSession, path: str) -> DataFrame:
    if path.endswith(".csv"):
        return spark.read.csv(path, header=True, inferSchema=True)
    if path.endswith(".json") or path.endswith(".jsonl"):
        return spark.read.json(path)
    return spark.read.parquet(path)


def _fs(spark: SparkSession, path: str):
    jvm = spark._jvm
    p = jvm.org.apache.hadoop.fs.Path(path)
    return p.getFileSystem(spark._jsc.hadoopConfiguration()), p


def table_exists(spark: SparkSession, path: str) -> bool:
    fs, p = _fs(spark, path)
    return fs.exists(p)


def swap_in(spark: SparkSession, tmp: str, output: str) -> None:
    """Replace `output` by `tmp` with two renames (old table removed last)."""
    fs, out = _fs(spark, output)
    _, new = _fs(spark, tmp)
    old = None
    if fs.exists(out):
        old = out.suffix(f"._old_{uuid.uuid4().hex[:8]}")
        if not fs.rename(out, old):
            raise JobError(f"could not move the old table {output} aside")
    if not fs.rename(new, out):
        if old is not None:
            fs.rename(old, out)
        raise JobError(f"could not move the new table into {output}")
    if old is not None:
        fs.delete(old, True)
    # Leftovers of runs killed before their swap: one writer per table, so they are stale.
    for status in fs.globStatus(out.suffix("._tmp_*")) or []:
        fs.delete(status.getPath(), True)


def flatten(df: DataFrame, spec: Spec, id_column: str) -> DataFrame:
    """Struct columns from the SQL functions become the feature table's flat columns."""
    cols = [F.col(id_column).cast("long").alias("item_id"), F.col("event_timestamp"),
            F.col("content_hash")]
    models, errors = [], []
    for field in df.schema.fields:
        if not isinstance(field.dataType, StructType):
            continue
        names = field.dataType.fieldNames()
        c = F.col(field.name)
        if {"model", "error"} <= set(names) and any(n.endswith("_label") for n in names):
            # annotate_all(): already in table form
            cols += [c[n].alias(n) for n in names if n not in ("model", "error")]
            models.append(c["model"])
            errors.append(c["error"])
            continue
        if {"label", "confidence"} <= set(names):
            cols += [c["label"].alias(f"{field.name}_label"),
                     c["confidence"].alias(f"{field.name}_confidence")]
            models.append(c["model"])
        elif {"caption", "tokens"} <= set(names):
            cols += [c["caption"].alias("caption"), c["tokens"].alias("caption_tokens")]
        else:
            continue
        errors.append(F.when(c["error"].isNotNull(),
                             F.concat(F.lit(field.name + ": "), c["error"])))
    if not models:
        raise JobError("the query returned no annotate() or annotate_all() column; "
                       "nothing to write")
    cols += [F.coalesce(*models).alias("model"),
             F.lit(spec.version).alias("spec_version"),
             (F.concat_ws("; ", *errors) if errors else F.lit(None)).alias("error")]
    out = df.select(*cols)
    # concat_ws gives "" when every part is null: keep "no error" as null.
    return out.withColumn("error", F.when(F.col("error") != "", F.col("error")))


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


def _annotate_part(spark: SparkSession, spec: Spec, part: DataFrame, engine: dict | None,
                   query: str, id_column: str, tier: str, fail_on_error: bool,
                   engine_seconds) -> DataFrame:
    register(spark, spec, engine=engine, fail_on_error=fail_on_error,
             engine_seconds=engine_seconds)
    part.createOrReplaceTempView("items")
    annotated = spark.sql(query)
    if id_column not in annotated.columns:
        raise JobError(f"the query must return the id column {id_column!r}")
    for col in ("event_timestamp", "content_hash"):
        if col not in annotated.columns:
            annotated = annotated.join(part.select(id_column, col), id_column)
    return (flatten(annotated, spec, id_column)
            .withColumn("labelled_by", F.lit(tier))
            .withColumn("created_timestamp", F.current_timestamp()))


def run(spark: SparkSession, spec: Spec, items: DataFrame, output: str,
        engine: dict | None = None, sql: str | None = None, id_column: str = "item_id",
        text_columns: list[str] | None = None, full: bool = False,
        fail_on_error: bool = False, routing: Routing | None = None) -> dict:
    """Annotate `items` into the feature table at `output`; returns the closing report."""
    started = time.time()
    text_columns = text_columns or ["title", "description"]
    missing = [c for c in [id_column, "event_timestamp", *text_columns] if c not in items.columns]
    if missing:
        raise JobError(f"input table lacks columns {missing}; it has {items.columns}")
    bad_ids = items.groupBy(id_column).count().where(
        F.col(id_column).isNull() | (F.col("count") > 1)).limit(5).collect()
    if bad_ids:
        raise JobError(f"{id_column} must be unique and non-null; offending ids: "
                       f"{[r[id_column] for r in bad_ids]}")

    hashed = items.withColumn("content_hash", F.sha2(F.concat_ws(
        HASH_SEP, *[F.coalesce(F.col(c).cast("string"), F.lit("")) for c in text_columns]), 256))
    rows_in = hashed.count()
    query = sql or default_query(spec, text_columns)
    engine_seconds = spark.sparkContext.accumulator(0.0)

    def part(frame: DataFrame, cfg: dict | None, tier: str) -> DataFrame:
        return _annotate_part(spark, spec, frame, cfg, query, id_column, tier,
                              fail_on_error, engine_seconds)

    columns = part(hashed.limit(0), engine, "head").columns
    reused = None
    if not full and table_exists(spark, output):
        previous = spark.read.parquet(output)
        if "labelled_by" not in previous.columns:
            previous = previous.withColumn("labelled_by", F.lit("head"))
        if set(columns) <= set(previous.columns):  # else the table predates this schema
            reused = (previous
                      .join(hashed.select(F.col(id_column).cast("long").alias("item_id"),
                                          "content_hash", F.col("event_timestamp").alias("_ts")),
                            ["item_id", "content_hash"])
                      .where((F.col("spec_version") == spec.version) & F.col("error").isNull())
                      .withColumn("event_timestamp", F.col("_ts"))
                      .select(*columns).cache())
    todo = hashed if reused is None else hashed.join(
        reused.select(F.col("item_id").alias(id_column)), id_column, "left_anti")
    n_reused = reused.count() if reused is not None else 0
    n_todo = rows_in - n_reused
    log.info("rows in: %d, reused: %d, to annotate: %d", rows_in, n_reused, n_todo)
    print(f"[annotate] {rows_in} rows in, {n_reused} reused, {n_todo} to annotate", flush=True)

    # Spread the work over every core even when the input is one file (one partition).
    parallelism = spark.sparkContext.defaultParallelism
    if todo.rdd.getNumPartitions() < parallelism:
        todo = todo.repartition(parallelism)
    # Each part is its own Spark job, so a worker switches engines at most once.
    parts = [(todo, engine, "head")]
    if routing is not None:
        head, tail = routing.split(todo, id_column)
        parts = [(head, engine, "head"), (tail, routing.engine, "tail")]
    tmp = output.rstrip("/") + f"._tmp_{uuid.uuid4().hex[:8]}"
    write_started = time.time()
    mode = "error"
    for frame, cfg, tier in parts:
        part(frame, cfg, tier).select(*columns).write.mode(mode).parquet(tmp)
        mode = "append"
    write_seconds = time.time() - write_started
    if reused is not None:
        reused.write.mode(mode).parquet(tmp)
    written = spark.read.parquet(tmp)
    stats = written.agg(
        F.count("*").alias("n"),
        F.sum(F.col("error").isNotNull().cast("int")).alias("errors"),
        F.sum((F.col("labelled_by") == "tail").cast("int")).alias("tail"),
        F.countDistinct("item_id").alias("ids")).first()
    if stats["n"] != rows_in or stats["ids"] != rows_in:
        raise JobError(f"wrote {stats['n']} rows ({stats['ids']} distinct ids) for "
                       f"{rows_in} input rows; the previous table is left in place")
    swap_in(spark, tmp, output)
    if reused is not None:
        reused.unpersist()
    return {
        "rows_in": rows_in, "rows_annotated": n_todo, "rows_reused": n_reused,
        "rows_written": stats["n"], "rows_with_errors": int(stats["errors"] or 0),
        "rows_by_tail_engine": int(stats["tail"] or 0),
        "seconds": round(time.time() - started, 2),
        "annotate_seconds": round(write_seconds, 2),
        "engine_seconds": round(engine_seconds.value, 2),
        "rows_per_second": round(n_todo / write_seconds, 1) if n_todo else None,
        "spec_version": spec.version, "output": output,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="annotate", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="attribute spec YAML")
    p.add_argument("--input", required=True, help="item table: Parquet path, .csv or .json")
    p.add_argument("--output", required=True, help="feature table directory (Parquet)")
    p.add_argument("--engine", default=None,
                   help="engine type, inline JSON config, or a YAML/JSON file (default: embedding)")
    p.add_argument("--sql", default=None, help="file with a query over the view `items`")
    p.add_argument("--id-column", default="item_id")
    p.add_argument("--text-columns", default="title,description",
                   help="comma-separated text columns (default: title,description)")
    p.add_argument("--batch-size", type=int, default=1024,
                   help="rows per Arrow batch handed to the engine")
    p.add_argument("--full", action="store_true", help="re-annotate every row")
    p.add_argument("--fail-on-error", action="store_true",
                   help="fail the job if any row gets an error")
    p.add_argument("--master", default=None, help="Spark master when not using spark-submit")
    p.add_argument("--report", default=None, help="also write the closing report JSON here")
    p.add_argument("--tail-engine", default=None,
                   help="engine for tail items (e.g. a distilled student); enables routing")
    p.add_argument("--popularity-column", default="popularity",
                   help="input column ranking items for head/tail routing")
    p.add_argument("--head-min-popularity", type=float, default=None,
                   help="items at or above this popularity go to the main engine")
    p.add_argument("--head-budget", type=int, default=None,
                   help="at most this many (most popular) items go to the main engine")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.session import get_spark

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec)
        engine = parse_engine(args.engine)
        check_config(engine)
        sql = Path(args.sql).read_text() if args.sql else None
        routing = None
        if args.tail_engine:
            if (args.head_min_popularity is None) == (args.head_budget is None):
                raise JobError("--tail-engine needs exactly one of --head-min-popularity "
                               "and --head-budget")
            routing = Routing(parse_engine(args.tail_engine), args.popularity_column,
                              args.head_min_popularity, args.head_budget)
            check_config(routing.engine)
        if not Path(args.input).exists() and "://" not in args.input:
            raise JobError(f"input table not found: {args.input}")
    except (SpecError, JobError, EngineConfigError, OSError, json.JSONDecodeError) as exc:
        print(f"annotate: error: {exc}", file=sys.stderr)
        return 2
    spark = get_spark("annofeat-annotate", args.master, {
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(args.batch_size)})
    try:
        report = run(spark, spec, read_table(spark, args.input), args.output, engine=engine,
                     sql=sql, id_column=args.id_column,
                     text_columns=[c.strip() for c in args.text_columns.split(",")],
                     full=args.full, fail_on_error=args.fail_on_error, routing=routing)
    except JobError as exc:
        print(f"annotate: error: {exc}", file=sys.stderr)
        return 2
    print("[annotate] report " + json.dumps(report), flush=True)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
