"""Validate a frame against expectation suites and say, per expectation, what was observed.

`validate_frame` is the generic core: a pandas frame and GE suites in, a `GateResult` out.
`Gate` knows which suites apply to which feature view, writes the report and quarantines
a refused batch; the Feast engine and the validate CLI both go through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from expectations.reference import read_reference, write_reference
from expectations.report import quarantine, write_report
from expectations.suites import spec_suite, user_suites, with_derived_columns
from expectations.thresholds import Thresholds
from udfs.spec import Spec

# COMPLETE: GE lists the index of every unexpected row, which is what quarantine needs
SAMPLE = 10  # offending values shown per expectation
RESULT_FORMAT = {"result_format": "COMPLETE", "partial_unexpected_count": SAMPLE}


@dataclass(frozen=True)
class Check:
    """One expectation's outcome, in terms a person can act on."""
    suite: str
    expectation: str
    column: str | None
    success: bool
    observed: Any  # GE's observed value, else the share of rows that broke the expectation
    expected: dict  # the expectation's bounds: value_set, min/max_value, mostly, threshold ...
    unexpected_count: int | None = None
    unexpected_values: tuple = ()
    error: str | None = None  # why the expectation could not be evaluated (e.g. no such column)
    rows: tuple[int, ...] = field(default=(), repr=False)  # positions of the offending rows

    def describe(self) -> str:
        target = f"{self.expectation}({self.column})" if self.column else self.expectation
        if self.error:
            return f"{target}: could not be evaluated: {self.error}"
        if self.unexpected_count is not None:  # a per-row expectation: observed is a share
            text = f"{target}: {self.unexpected_count} rows ({self.observed:.1%}) unexpected"
        else:
            text = f"{target}: observed {self.observed}"
        if self.unexpected_values:
            text += f" (e.g. {list(self.unexpected_values)[:3]})"
        bounds = {k: v for k, v in self.expected.items() if k != "partition_object"}
        return f"{text}; expected {bounds}"

    def to_dict(self) -> dict:
        return {
            "suite": self.suite, "expectation": self.expectation, "column": self.column,
            "success": self.success, "observed": self.observed, "expected": self.expected,
            "unexpected_count": self.unexpected_count,
            "unexpected_values": list(self.unexpected_values), "error": self.error,
        }


@dataclass
class GateResult:
    view: str
    rows: int
    checks: list[Check]
    notes: list[str] = field(default_factory=list)
    checked_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    report: Path | None = None
    quarantine: list[Path] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(c.success for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.success]

    def summary(self) -> str:
        head = (f"{self.view}: {'PASSED' if self.success else 'FAILED'} "
                f"({len(self.checks) - len(self.failures)}/{len(self.checks)} expectations met, "
                f"{self.rows} rows)")
        lines = [head] + [f"  FAIL {c.describe()}" for c in self.failures]
        lines += [f"  note: {n}" for n in self.notes]
        if self.report:
            lines.append(f"  report: {self.report}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "view": self.view, "success": self.success, "rows": self.rows,
            "checked_at": self.checked_at.isoformat(timespec="seconds"),
            "failures": [c.to_dict() for c in self.failures],
            "checks": [c.to_dict() for c in self.checks],
            "notes": self.notes, "quarantine": [str(p) for p in self.quarantine],
        }


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


def _sample(values: Sequence) -> tuple:
    """Distinct offending values, first seen first (lists are not hashable, so no set)."""
    seen: list = []
    for value in map(_plain, values):
        if value not in seen and len(seen) < SAMPLE:
            seen.append(value)
    return tuple(seen)


def _plain(value: Any) -> Any:
    """A JSON-friendly version of a cell value (numpy scalars, NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and value != value else value


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
            suite, more = spec_suite(self.spec, self.thresholds, reference, n_rows)
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
        suites, notes = self.suites(view, len(df), drift)
        result = validate_frame(with_derived_columns(df), suites, view=view, notes=notes)
        if not result.success:
            stamp = result.checked_at.strftime("%Y%m%dT%H%M%S%fZ")
            result.quarantine = quarantine(df, result, self.quarantine_dir / view / stamp)
        result.report = write_report(result, self.report_dir)
        return result

    def write_reference(self, view: str, df: pd.DataFrame) -> Path:
        return write_reference(self.reference_path(view), df, self.spec)
