"""The gate's expectations computed with Spark: the same `Check`s, from aggregations.

On Feast's Spark compute engine the rows to write live in a (persisted) Spark DataFrame on
the executors. Collecting them to the driver for Great Expectations' pandas engine would
make driver memory grow with the catalogue, and GE's own Spark engine runs one job per
metric and, with the COMPLETE result format the report needs, collects every unexpected
value and row index to the driver. So the suites the gate builds (the spec suite and user
suites, as GE 1.x `ExpectationSuite`s) are translated here into Spark aggregations:

    one pass     row count; per row-level expectation the unexpected and non-null counts;
                 per drift check the count of each reference label and of other values;
                 per column mean (multi-label drift) the mean and the non-null count
    per column   `expect_column_values_to_be_unique`: a group-by on that column
    on failure   a few distinct offending values per failing expectation (limit 10), and
                 the quarantine (`quarantine`): written by Spark, never collected

The driver receives counts and at most a handful of values per expectation. Each `Check`
carries what GE's pandas engine reports for the same frame (observed share, unexpected
count, `mostly` semantics, KL divergence with GE's categorical formula, the "could not be
evaluated" error for a missing column), so `GateResult`, the JSON/HTML report and the CLI
message are the same on both engines; tests/test_spark_checks.py compares them.

Supported expectation types are those the gate generates and the usual column checks of a
user suite (`SUPPORTED`); any other type is reported as a failed check that names it,
rather than being skipped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from expectations.result import SAMPLE, Check, GateResult, _plain, _sample
from expectations.suites import (CAPTION_TOKEN_COUNT, OUT_OF_ORDER, REPEATED, SuiteError,
                                 each_label, each_score, has_label, label_count, score_count)
from udfs import schema as S
from udfs.spec import Spec

NOT_NULL = "expect_column_values_to_not_be_null"
NULL = "expect_column_values_to_be_null"
UNIQUE = "expect_column_values_to_be_unique"
IN_SET = "expect_column_values_to_be_in_set"
NOT_IN_SET = "expect_column_values_to_not_be_in_set"
BETWEEN = "expect_column_values_to_be_between"
KL = "expect_column_kl_divergence_to_be_less_than"
ROW_COUNT = "expect_table_row_count_to_be_between"
COLUMN_EXISTS = "expect_column_to_exist"
MEAN = "expect_column_mean_to_be_between"
SUPPORTED = (NOT_NULL, NULL, UNIQUE, IN_SET, NOT_IN_SET, BETWEEN, KL, MEAN, ROW_COUNT,
             COLUMN_EXISTS)
# row-level expectations whose share is taken of all rows (GE: nonnull_count is None)
_OF_ALL_ROWS = (NOT_NULL, NULL)
_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType,
            T.DecimalType)


def with_derived_columns(sdf: DataFrame, spec: Spec | None = None) -> DataFrame:
    """The Spark twin of expectations.suites.with_derived_columns (the same columns, with
    the same values): caption_token_count and, given the spec, the multi-label checks'."""
    extra: dict[str, Column] = {}
    if S.CAPTION_TOKENS in sdf.columns:
        tokens = F.col(S.CAPTION_TOKENS)
        extra[CAPTION_TOKEN_COUNT] = F.when(tokens.isNull(), F.lit(None)).otherwise(
            F.size(tokens))
    for name, attr in (spec.attributes.items() if spec is not None else ()):
        if not attr.multi:
            continue
        if S.labels(name) in sdf.columns:
            labels = F.col(f"`{S.labels(name)}`")
            extra[label_count(name)] = F.when(labels.isNotNull(), F.size(labels))
            extra[each_label(name)] = F.when(labels.isNotNull(), F.coalesce(
                F.get(F.filter(_misplaced(labels, attr.labels), lambda y: y.isNotNull()), 0),
                F.get(labels, 0)))
            for lab in attr.labels:
                extra[has_label(name, lab)] = F.when(labels.isNotNull(),
                                                     _carries(labels, lab).cast("double"))
        if S.scores(name) in sdf.columns:
            scores = F.col(f"`{S.scores(name)}`")
            numbers = F.filter(scores, lambda x: x.isNotNull() & ~F.isnan(x))
            off = F.filter(numbers, lambda x: (x < 0.0) | (x > 1.0))
            extra[score_count(name)] = F.when(scores.isNotNull(), F.size(numbers))
            extra[each_score(name)] = F.when(scores.isNotNull(), F.coalesce(
                F.get(off, 0), F.get(numbers, 0)).cast("double"))
    clash = sorted((set(extra) - {CAPTION_TOKEN_COUNT}) & set(sdf.columns))
    if clash:
        raise SuiteError(f"the table has columns {clash}, which the gate derives itself; "
                         "rename them")
    return sdf.withColumns(extra) if extra else sdf


def _misplaced(labels: Column, allowed) -> Column:
    """Per entry, what makes it break the spec (null where nothing does), in the pandas
    twin's terms (suites._first_misplaced): null or outside the set, repeated, out of order."""
    order = F.array(*[F.lit(lab) for lab in allowed])
    position = F.transform(labels, lambda x: F.array_position(order, x))  # 0: not in the set

    def why(x: Column, i: Column) -> Column:
        return (F.when(x.isNull(), F.lit(""))
                .when(F.get(position, i) == 0, x)
                .when(F.array_position(labels, x) <= i, F.concat(x, F.lit(REPEATED)))
                # get() is null before the first entry, so the first is never out of order
                .when(F.get(position, i) < F.get(position, i - 1),
                      F.concat(x, F.lit(OUT_OF_ORDER))))
    return F.transform(labels, why)


def _carries(labels: Column, label: str) -> Column:
    """Whether the list holds `label` (false, not null, beside null entries)."""
    return F.exists(labels, lambda x: F.coalesce(x == F.lit(label), F.lit(False)))


@dataclass
class _Item:
    """One expectation being evaluated: its identity, and what the passes found."""
    suite: str
    kind: str
    column: str | None
    kwargs: dict  # the expectation's bounds, as GE reports them (no column, no batch_id)
    unexpected: Column | None = None  # row-level: true where the row breaks it
    check: Check | None = None  # set when decided before any pass (errors, unsupported)
    values: list = field(default_factory=list)  # KL: the reference labels


@dataclass
class SparkValidation:
    """The verdict, and what is needed to quarantine the failing rows without a driver copy."""
    result: GateResult
    items: list[_Item]

    def failing_rows(self, sdf: DataFrame, columns: Sequence[str] | None = None
                     ) -> DataFrame | None:
        """The rows of `sdf` (the validated frame) that broke a failing row-level
        expectation, in `columns` (default: all) plus a `failed_expectations` array column
        (the names, as in the pandas quarantine); None when no such check failed (e.g.
        only drift): the batch says it all then. Lazy: Spark writes it, nothing is
        collected."""
        failing = [(item, c) for item, c in zip(self.items, self.result.checks)
                   if not c.success and c.error is None and c.unexpected_count]
        if not failing:
            return None
        frame, flags = sdf, []
        for i, (item, check) in enumerate(failing):
            name = F.lit(f"{check.expectation}({check.column})")
            if item.kind == UNIQUE:
                flag = f"__dup_{i}"
                dups = (sdf.where(F.col(item.column).isNotNull()).groupBy(item.column).count()
                        .where(F.col("count") > 1).select(item.column, F.lit(True).alias(flag)))
                frame = frame.join(dups, on=item.column, how="left")
                flags.append(F.when(F.col(flag).isNotNull(), name))
            else:
                flags.append(F.when(item.unexpected, name))
        broke = F.filter(F.array(*flags), lambda x: x.isNotNull())
        return (frame.withColumn("failed_expectations", broke)
                .where(F.size("failed_expectations") > 0)
                .select(*[F.col(f"`{c}`") for c in (columns or sdf.columns)],
                        "failed_expectations"))


def validate_spark_frame(sdf: DataFrame, suites: Sequence, *, view: str = "frame",
                         notes: Sequence[str] = (), n_rows: int | None = None
                         ) -> SparkValidation:
    """Run every suite on the whole DataFrame (persist it first: it is scanned a few times).

    `n_rows`, when the caller has counted already, saves nothing but is checked against
    the aggregation's own count."""
    items = [_item(suite.name, e.configuration, sdf) for suite in suites
             for e in suite.expectations]
    aggs: list[Column] = [F.count(F.lit(1)).alias("n")]
    for i, item in enumerate(items):
        if item.check is not None:
            continue
        if item.unexpected is not None:
            aggs.append(F.sum(item.unexpected.cast("long")).alias(f"u{i}"))
        if item.unexpected is not None or item.kind == UNIQUE:
            aggs.append(F.sum((~_is_null(sdf, item.column)).cast("long")).alias(f"nn{i}"))
        elif item.kind == KL:
            c, null = F.col(f"`{item.column}`"), _is_null(sdf, item.column)
            aggs += [F.sum((c == F.lit(v)).cast("long")).alias(f"k{i}_{j}")
                     for j, v in enumerate(item.values)]
            aggs.append(F.sum((~null & ~c.isin(item.values)).cast("long")).alias(f"ko{i}"))
            aggs.append(F.sum((~null).cast("long")).alias(f"nn{i}"))
        elif item.kind == MEAN:
            c, null = F.col(f"`{item.column}`"), _is_null(sdf, item.column)
            aggs.append(F.avg(F.when(~null, c.cast("double"))).alias(f"m{i}"))
            aggs.append(F.sum((~null).cast("long")).alias(f"nn{i}"))
    row = sdf.agg(*aggs).first().asDict()
    n = int(row["n"])
    if n_rows is not None and n != n_rows:
        raise RuntimeError(f"{view}: {n} rows validated, {n_rows} counted before; the frame "
                           "must be persisted so that the rows checked are the rows written")
    checks = [item.check if item.check is not None else _decide(item, i, row, n, sdf)
              for i, item in enumerate(items)]
    for item, check in zip(items, checks):
        item.check = check
    notes = list(notes) + ([] if n else ["no rows to check"])
    if not n:  # GE validates nothing on an empty frame; the gate refuses it earlier
        checks, items = [], []
    return SparkValidation(GateResult(view=view, rows=n, checks=checks, notes=notes), items)


def _item(suite: str, config, sdf: DataFrame) -> _Item:
    kwargs = dict(config.kwargs)
    column = kwargs.pop("column", None)
    kwargs.pop("batch_id", None)
    item = _Item(suite=suite, kind=config.type, column=column, kwargs=kwargs)

    def error(message: str) -> _Item:
        item.check = Check(suite=suite, expectation=item.kind, column=column, success=False,
                           observed=None, expected=kwargs, error=message)
        return item

    if item.kind not in SUPPORTED:
        return error(f"{item.kind} is not supported by the Spark gate (supported: "
                     f"{', '.join(SUPPORTED)}); check this table with the local engine or "
                     "remove the expectation")
    if item.kind == ROW_COUNT:
        return item
    if column not in sdf.columns:
        if item.kind == COLUMN_EXISTS:
            item.check = Check(suite=suite, expectation=item.kind, column=column,
                               success=False, observed=None, expected=kwargs)
            return item
        return error(f'Error: The column "{column}" in BatchData does not exist.')
    if item.kind == COLUMN_EXISTS:
        item.check = Check(suite=suite, expectation=item.kind, column=column, success=True,
                           observed=None, expected=kwargs)
        return item
    c, null = F.col(f"`{column}`"), _is_null(sdf, column)
    kind = sdf.schema[column].dataType
    if item.kind == NOT_NULL:
        item.unexpected = null
    elif item.kind == NULL:
        item.unexpected = ~null
    elif item.kind in (IN_SET, NOT_IN_SET):
        values = list(kwargs.get("value_set") or [])
        if not _comparable(kind, values):
            return error(f"value_set {values[:5]} and column {column} ({kind.simpleString()})"
                         " are of different types")
        inside = c.isin(values) if values else F.lit(False)
        item.unexpected = ~null & (~inside if item.kind == IN_SET else inside)
    elif item.kind == BETWEEN:
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        if low is None and high is None:
            return error("min_value and max_value cannot both be None")
        if not _comparable(kind, [v for v in (low, high) if v is not None]):
            return error("Column values, min_value, and max_value must either be None or of "
                         "the same type.")
        ok = F.lit(True)
        if low is not None:
            ok = ok & ((c > low) if kwargs.get("strict_min") else (c >= low))
        if high is not None:
            ok = ok & ((c < high) if kwargs.get("strict_max") else (c <= high))
        item.unexpected = ~null & ~ok
    elif item.kind == MEAN:
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        if low is None and high is None:
            return error("min_value and max_value cannot both be None")
        if not isinstance(kind, _NUMERIC) and not isinstance(kind, T.BooleanType):
            return error(f"column {column} ({kind.simpleString()}) is not numeric: it has "
                         "no mean")
    elif item.kind == KL:
        partition = kwargs.get("partition_object") or {}
        if "values" not in partition or kwargs.get("bucketize_data") is True:
            return error("only categorical partition objects ({'values', 'weights'}) are "
                         "supported by the Spark gate")
        item.values = list(partition["values"])
        if not _comparable(kind, item.values):
            return error(f"partition values and column {column} are of different types")
    return item


def _decide(item: _Item, i: int, row: dict, n: int, sdf: DataFrame) -> Check:
    base = dict(suite=item.suite, expectation=item.kind, column=item.column,
                expected=item.kwargs)
    if item.kind == ROW_COUNT:
        low, high = item.kwargs.get("min_value"), item.kwargs.get("max_value")
        ok = (low is None or n >= low) and (high is None or n <= high)
        return Check(**base, success=ok, observed=n)
    if item.kind == KL:
        counts = [int(row[f"k{i}_{j}"] or 0) for j in range(len(item.values))]
        others, nonnull = int(row[f"ko{i}"] or 0), int(row[f"nn{i}"] or 0)
        holdout = item.kwargs.get("tail_weight_holdout") or 0.0
        tail = _tail(sdf, item) if others and holdout > 0 else (0, 0.0)
        kl = _kl_divergence(counts, item.kwargs["partition_object"]["weights"], nonnull,
                            others, tail, holdout)
        threshold = item.kwargs.get("threshold")
        finite = not (math.isinf(kl) or math.isnan(kl))
        success = True if threshold is None else bool(kl <= threshold)
        return Check(**base, success=success, observed=kl if finite else None)
    if item.kind == MEAN:
        return _mean_check(base, item, row[f"m{i}"], int(row[f"nn{i}"] or 0))
    if item.kind == UNIQUE:
        nonnull = int(row.get(f"nn{i}") or 0)
        dups = (sdf.where(F.col(f"`{item.column}`").isNotNull()).groupBy(item.column).count()
                .where(F.col("count") > 1))
        unexpected = int(dups.agg(F.sum("count")).first()[0] or 0)
        sample = ([r[0] for r in dups.select(item.column).limit(SAMPLE).collect()]
                  if unexpected else [])
        return _row_check(base, item, n, nonnull, unexpected, sample)
    unexpected, nonnull = int(row[f"u{i}"] or 0), int(row[f"nn{i}"] or 0)
    sample = []
    if unexpected:
        sample = [r[0] for r in sdf.where(item.unexpected).select(f"`{item.column}`")
                  .distinct().limit(SAMPLE).collect()]
    return _row_check(base, item, n, nonnull, unexpected, sample)


def _mean_check(base: dict, item: _Item, mean: float | None, nonnull: int) -> Check:
    """GE's expect_column_mean_to_be_between: the mean of the non-null values within the
    bounds (strict_min / strict_max exclude them); no mean without values."""
    if not nonnull or mean is None:
        return Check(**base, success=False, observed=None)
    low, high = item.kwargs.get("min_value"), item.kwargs.get("max_value")
    ok = True
    if low is not None:
        ok = ok and ((mean > low) if item.kwargs.get("strict_min") else (mean >= low))
    if high is not None:
        ok = ok and ((mean < high) if item.kwargs.get("strict_max") else (mean <= high))
    return Check(**base, success=bool(ok), observed=float(mean))


def _row_check(base: dict, item: _Item, n: int, nonnull: int, unexpected: int,
               sample: list) -> Check:
    """GE's ColumnMapExpectation verdict: the share of all rows (null checks) or of the
    non-null rows (the others); vacuously true with nothing to consider."""
    mostly = item.kwargs.get("mostly", 1.0)
    considered = n if item.kind in _OF_ALL_ROWS else nonnull
    if item.kind in _OF_ALL_ROWS:
        success = n == 0 or (n - unexpected) / n >= mostly
    else:
        success = n == 0 or nonnull == 0 or (nonnull - unexpected) / nonnull >= mostly
    percent = unexpected / considered * 100 if considered else None
    observed = round((percent or 0.0) / 100.0, 6)
    return Check(**base, success=success, observed=observed, unexpected_count=unexpected,
                 unexpected_values=_sample(sorted(sample, key=_order)))


def _order(value: Any):
    """Samples sorted so a report is stable from run to run (nulls first)."""
    return (value is not None, json.dumps(_plain(value), default=str, sort_keys=True))


def _tail(sdf: DataFrame, item: _Item) -> tuple[int, float]:
    """(distinct values outside the partition, sum of c*ln(c) over their counts c): what
    the KL divergence needs of them when a tail weight is held out."""
    c = F.col(f"`{item.column}`")
    grouped = (sdf.where(~_is_null(sdf, item.column) & ~c.isin(item.values))
               .groupBy(c).count())
    r = grouped.agg(F.count(F.lit(1)), F.sum(F.col("count") * F.log(F.col("count")))).first()
    return int(r[0] or 0), float(r[1] or 0.0)


def _kl_divergence(counts: list[int], weights: list[float], nonnull: int, others: int,
                   tail: tuple[int, float], holdout: float) -> float:
    """GE's categorical KL(observed || expected) (scipy.stats.entropy of both, normalised),
    from counts: observed weight c/N per value; expected weights scaled by 1 - holdout
    when values outside the partition occur, each of which then expects holdout/k."""
    if nonnull == 0:
        return math.nan
    distinct_others, clogc = tail
    pk = [c / nonnull for c in counts]
    if others:
        qk = [w * (1 - holdout) for w in weights]
        q_other = holdout / distinct_others if distinct_others else 0.0
        total_q = sum(qk) + q_other * distinct_others
    else:
        qk, q_other, total_q = list(weights), 0.0, sum(weights)
    total_p = sum(pk) + others / nonnull
    if total_q <= 0:
        return math.nan
    kl = 0.0
    for p, q in zip(pk, qk):
        p, q = p / total_p, q / total_q
        if p > 0:
            kl += math.inf if q <= 0 else p * math.log(p / q)
    if others:
        if q_other <= 0:
            return math.inf
        # sum over the other values j of p_j ln(p_j / q), p_j = c_j / (N * total_p)
        scale = nonnull * total_p
        q = q_other / total_q
        kl += (clogc - others * math.log(scale)) / scale - (others / scale) * math.log(q)
    return kl


def _is_null(sdf: DataFrame, column: str) -> Column:
    """Null as pandas sees it: also NaN in a floating-point column."""
    c = F.col(f"`{column}`")
    if isinstance(sdf.schema[column].dataType, (T.FloatType, T.DoubleType)):
        return c.isNull() | F.isnan(c)
    return c.isNull()


def _comparable(kind: T.DataType, values: list) -> bool:
    """Whether Spark can compare the column with these literals without a cast failing."""
    if not values:
        return True
    if isinstance(kind, T.StringType):
        return all(isinstance(v, str) for v in values)
    if isinstance(kind, T.BooleanType):
        return all(isinstance(v, bool) for v in values)
    if isinstance(kind, _NUMERIC):
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return False
