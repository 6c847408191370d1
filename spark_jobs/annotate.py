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
from pathlib import Path

import yaml
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from udfs import register
from udfs.engines import DEFAULT_ENGINE
from udfs.spec import Spec, SpecError, load_spec

log = logging.getLogger("annofeat.annotate")
HASH_SEP = "\u241f"  # a separator that does not occur in ordinary text


class JobError(RuntimeError):
    """A problem with the job's inputs or configuration; the message says what to fix."""


def default_query(spec: Spec, text_columns: list[str]) -> str:
    texts = ", ".join(text_columns)
    parts = [f"annotate('{name}', {texts}) AS {name}" for name in spec.attributes]
    if spec.caption is not None:
        parts.append(f"caption({texts}) AS caption")
    return "SELECT *, " + ", ".join(parts) + " FROM items"


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


def flatten(df: DataFrame, spec: Spec, id_column: str) -> DataFrame:
    """Struct columns from annotate()/caption() become the feature table's flat columns."""
    cols = [F.col(id_column).cast("long").alias("item_id"), F.col("event_timestamp"),
            F.col("content_hash")]
    models, errors = [], []
    for field in df.schema.fields:
        if not isinstance(field.dataType, StructType):
            continue
        names = set(field.dataType.fieldNames())
        c = F.col(field.name)
        if {"label", "confidence"} <= names:
            cols += [c["label"].alias(f"{field.name}_label"),
                     c["confidence"].alias(f"{field.name}_confidence")]
            models.append(c["model"])
        elif {"caption", "tokens"} <= names:
            cols += [c["caption"].alias("caption"), c["tokens"].alias("caption_tokens")]
        else:
            continue
        errors.append(F.when(c["error"].isNotNull(),
                             F.concat(F.lit(field.name + ": "), c["error"])))
    if not models:
        raise JobError("the query returned no annotate() column; nothing to write")
    cols += [F.coalesce(*models).alias("model"),
             F.lit(spec.version).alias("spec_version"),
             (F.concat_ws("; ", *errors) if errors else F.lit(None)).alias("error")]
    out = df.select(*cols)
    # concat_ws gives "" when every part is null: keep "no error" as null.
    return out.withColumn("error", F.when(F.col("error") != "", F.col("error")))


def run(spark: SparkSession, spec: Spec, items: DataFrame, output: str,
        engine: dict | None = None, sql: str | None = None, id_column: str = "item_id",
        text_columns: list[str] | None = None, full: bool = False,
        fail_on_error: bool = False) -> dict:
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

    reused = None
    if not full and table_exists(spark, output):
        previous = spark.read.parquet(output)
        reused = (previous.alias("p")
                  .join(hashed.select(F.col(id_column).cast("long").alias("item_id"),
                                      "content_hash", F.col("event_timestamp").alias("_ts")),
                        ["item_id", "content_hash"])
                  .where((F.col("spec_version") == spec.version) & F.col("error").isNull())
                  .withColumn("event_timestamp", F.col("_ts")).drop("_ts"))
        reused = reused.cache()
        todo = hashed.join(reused.select(F.col("item_id").alias(id_column)),
                           id_column, "left_anti")
    else:
        todo = hashed
    n_reused = reused.count() if reused is not None else 0
    n_todo = rows_in - n_reused
    log.info("rows in: %d, reused: %d, to annotate: %d", rows_in, n_reused, n_todo)
    print(f"[annotate] {rows_in} rows in, {n_reused} reused, {n_todo} to annotate", flush=True)

    engine_seconds = spark.sparkContext.accumulator(0.0)
    register(spark, spec, engine=engine, fail_on_error=fail_on_error,
             engine_seconds=engine_seconds)
    todo.createOrReplaceTempView("items")
    query = sql or default_query(spec, text_columns)
    annotated = spark.sql(query)
    if id_column not in annotated.columns:
        raise JobError(f"the query must return the id column {id_column!r}")
    for col in ("event_timestamp", "content_hash"):
        if col not in annotated.columns:
            annotated = annotated.join(todo.select(id_column, col), id_column)
    fresh = flatten(annotated, spec, id_column).withColumn(
        "created_timestamp", F.current_timestamp())
    result = fresh if reused is None else fresh.unionByName(reused.select(*fresh.columns))

    tmp = output.rstrip("/") + f"._tmp_{uuid.uuid4().hex[:8]}"
    write_started = time.time()
    result.write.mode("error").parquet(tmp)
    write_seconds = time.time() - write_started
    written = spark.read.parquet(tmp)
    stats = written.agg(F.count("*").alias("n"),
                        F.sum(F.col("error").isNotNull().cast("int")).alias("errors")).first()
    swap_in(spark, tmp, output)
    if reused is not None:
        reused.unpersist()
    report = {
        "rows_in": rows_in, "rows_annotated": n_todo, "rows_reused": n_reused,
        "rows_written": stats["n"], "rows_with_errors": int(stats["errors"] or 0),
        "seconds": round(time.time() - started, 2),
        "annotate_seconds": round(write_seconds, 2),
        "engine_seconds": round(engine_seconds.value, 2),
        "rows_per_second": round(n_todo / write_seconds, 1) if n_todo else None,
        "spec_version": spec.version, "output": output,
    }
    if stats["n"] != rows_in:
        raise JobError(f"wrote {stats['n']} rows for {rows_in} input rows")
    return report


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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.session import get_spark

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec)
        engine = parse_engine(args.engine)
        from udfs.engines import _BACKENDS
        if engine.get("type") not in _BACKENDS:
            raise JobError(f"unknown engine type {engine.get('type')!r}; "
                           f"choose one of {sorted(_BACKENDS)}")
        sql = Path(args.sql).read_text() if args.sql else None
        if not Path(args.input).exists() and "://" not in args.input:
            raise JobError(f"input table not found: {args.input}")
    except (SpecError, JobError, OSError, json.JSONDecodeError) as exc:
        print(f"annotate: error: {exc}", file=sys.stderr)
        return 2
    spark = get_spark("annofeat-annotate", args.master, {
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(args.batch_size)})
    try:
        report = run(spark, spec, read_table(spark, args.input), args.output, engine=engine,
                     sql=sql, id_column=args.id_column,
                     text_columns=[c.strip() for c in args.text_columns.split(",")],
                     full=args.full, fail_on_error=args.fail_on_error)
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
