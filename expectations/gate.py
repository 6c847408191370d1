"""Validate a frame against expectation suites and say, per expectation, what was observed.

`validate_frame` is the generic core: a pandas frame and GE suites in, a `GateResult` out.
`Gate` knows which suites apply to which feature view, writes the report and quarantines
a refused batch; the Feast engine and the validate CLI both go through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from expectations.reference import read_reference, write_reference
from expectations.report import quarantine, write_report
from expectations.result import (SAMPLE, Check, GateResult, _plain,  # noqa: F401 (re-exported)
                                 _sample, refuse_shape)
from expectations.suites import share_suite, spec_suite, user_suites, with_derived_columns
from expectations.thresholds import Thresholds
from udfs.spec import Spec

# COMPLETE: GE lists the index of every unexpected row, which is what quarantine needs
RESULT_FORMAT = {"result_format": "COMPLETE", "partial_unexpected_count": SAMPLE}


def validate_frame(df: pd.DataFrame, suites: Sequence[gx.ExpectationSuite], *,
                   view: str = "frame", notes: Sequence[str] = ()) -> GateResult:
    """Run every suite on the whole frame (one batch) with an ephemeral GE context."""
    df = df.reset_index(drop=True)
    checks: list[Check] = []
    if suites and len(df):
        context = gx.get_context(mode="ephemeral")
        context.config.progress_bars = ProgressBarsConfig(globally=False)
        batch = (context.data_sources.add_pandas("gate").add_dataframe_asset(view)
                 .add_batch_definition_whole_dataframe("whole")
                 .get_batch(batch_parameters={"dataframe": df}))
        for suite in suites:
            outcome = batch.validate(suite, result_format=RESULT_FORMAT)
            checks += [_check(suite.name, r) for r in outcome.results]
    notes = list(notes) + ([] if len(df) else ["no rows to check"])
    return GateResult(view=view, rows=len(df), checks=checks, notes=notes)


def _check(suite: str, r) -> Check:
    config = r.expectation_config
    kwargs = dict(config.kwargs)
    column = kwargs.pop("column", None)
    kwargs.pop("batch_id", None)
    result = r.result or {}
    if "observed_value" in result:
        observed = result["observed_value"]
    elif "unexpected_percent" in result:
        observed = round((result["unexpected_percent"] or 0.0) / 100.0, 6)
    else:
        observed = None
    rows = () if r.success else tuple(int(i) for i in result.get("unexpected_index_list") or ())
    return Check(
        suite=suite, expectation=config.type, column=column, success=bool(r.success),
        observed=observed, expected=kwargs, unexpected_count=result.get("unexpected_count"),
        unexpected_values=_sample(result.get("partial_unexpected_list") or ()),
        error=_exception_message(r.exception_info), rows=rows)


def _exception_message(info: dict | None) -> str | None:
    """GE nests metric exceptions under metric ids; pull out the first message."""
    if not info:
        return None
    if info.get("raised_exception"):
        return info.get("exception_message")
    for value in info.values():
        if isinstance(value, dict) and value.get("exception_message"):
            return value["exception_message"]
    return None


@dataclass(frozen=True)
class Gate:
    """Which suites apply to which feature view, and where reports and quarantine go."""
    spec: Spec
    report_dir: Path
    quarantine_dir: Path
    reference_dir: Path
    suites_dir: Path | None = None  # None: the suites shipped in expectations/suites
    thresholds: Thresholds = field(default_factory=Thresholds)
    annotations_view: str = "item_annotations"  # the view the spec's suite applies to
    key: str = "item_id"  # the annotation table's id column

    def reference_path(self, view: str) -> Path:
        return self.reference_dir / f"{view}.json"

    def suites(self, view: str, n_rows: int,
               drift: bool = True) -> tuple[list[gx.ExpectationSuite], list[str]]:
        suites, notes = [], []
        if view == self.annotations_view:
            reference = read_reference(self.reference_path(view)) if drift else None
            if not drift:
                notes.append("label drift not checked: a new reference is being written")
            elif reference is None:
                notes.append(f"label drift not checked: no reference at {self.reference_path(view)}"
                             " (write one with `python -m spark_jobs.validate --write-reference`)")
            suite, more = spec_suite(self.spec, self.thresholds, reference, n_rows, self.key)
            suites.append(suite)
            notes += more
        suites += user_suites(self.suites_dir, view)
        if not suites:
            notes.append(f"no suite applies to {view!r}")
        return suites, notes

    def check(self, view: str, df: pd.DataFrame, drift: bool = True) -> GateResult:
        """Validate, then write the report; a refused batch is also quarantined.

        drift=False leaves out the drift check (used when the batch becomes the new reference).
        """
        df = df.reset_index(drop=True)
        refused = self.refuse_shape(view, df.columns, len(df))
        if refused is not None:
            result = refused
        else:
            suites, notes = self.suites_for(view, df.columns, len(df), drift)
            result = validate_frame(with_derived_columns(df, self.spec), suites, view=view,
                                    notes=notes)
        if not result.success:
            result.quarantine = quarantine(df, result, self.quarantine_path(result))
        result.report = write_report(result, self.report_dir)
        return result

    def check_spark(self, view: str, sdf, drift: bool = True,
                    n_rows: int | None = None) -> GateResult:
        """`check` for a Spark DataFrame, computed with Spark (expectations.spark_checks):
        the driver receives counts and a few sample values, never the rows. Persist `sdf`
        first: it is scanned a few times, and the rows checked must be the rows written.
        A refused batch is quarantined by Spark (Parquet directories)."""
        from expectations import spark_checks
        from expectations.report import quarantine_spark

        n = sdf.count() if n_rows is None else n_rows
        refused = self.refuse_shape(view, sdf.columns, n)
        failing = None
        if refused is not None:
            result = refused
        else:
            suites, notes = self.suites_for(view, sdf.columns, n, drift)
            derived = spark_checks.with_derived_columns(sdf, self.spec)
            validation = spark_checks.validate_spark_frame(derived, suites, view=view,
                                                           notes=notes, n_rows=n)
            result = validation.result
            if not result.success:
                failing = validation.failing_rows(derived, sdf.columns)
        if not result.success:
            result.quarantine = quarantine_spark(sdf, failing, self.quarantine_path(result))
        result.report = write_report(result, self.report_dir)
        return result

    def suites_for(self, view: str, columns, n_rows: int,
                   drift: bool = True) -> tuple[list[gx.ExpectationSuite], list[str]]:
        """Every suite that applies to a frame of `view` with these columns."""
        suites, notes = self.suites(view, n_rows, drift)
        shares = share_suite(self.spec, columns)
        suites += [shares] if shares is not None and view != self.annotations_view else []
        return suites, notes

    def quarantine_path(self, result: GateResult) -> Path:
        return self.quarantine_dir / result.view / result.checked_at.strftime("%Y%m%dT%H%M%S%fZ")

    def record(self, result: GateResult) -> GateResult:
        """Write the report of a verdict reached without a frame (e.g. a source that lacks
        declared columns, refused before it is read)."""
        result.report = write_report(result, self.report_dir)
        return result

    def refuse_shape(self, view: str, columns, n_rows: int | None,
                     declared: Sequence[str] = ()) -> GateResult | None:
        """expectations.result.refuse_shape for this gate's spec, key and annotation view."""
        return refuse_shape(self.spec, self.key, self.annotations_view, view, columns, n_rows,
                            declared)

    def write_reference(self, view: str, df: pd.DataFrame) -> Path:
        return write_reference(self.reference_path(view), df, self.spec)
