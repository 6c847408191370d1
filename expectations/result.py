"""What a check found, as the report and the CLI show it: GE-free, so importing it is cheap.

`Check` is one expectation's outcome, `GateResult` a view's verdict. Both engines produce
them (Great Expectations on pandas, expectations.spark_checks on Spark), and so does
`refuse_shape`, which refuses a table that cannot be checked at all (a declared column
missing, no rows) before any suite runs. Kept apart from expectations.gate because Great
Expectations takes seconds to import: the Feast engine decides shape refusals and reads
the rows while it loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from udfs.schema import AnnotationSchema
from udfs.spec import Spec

SAMPLE = 10  # offending values shown per expectation


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
        if self.suite == "shape":  # the table itself is unusable: the message says why
            return f"{target}: {self.error}"
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


def refuse_shape(spec: Spec, key: str, annotations_view: str, view: str, columns,
                 n_rows: int | None, declared: Sequence[str] = ()) -> GateResult | None:
    """A refusal when the table cannot be checked at all: it lacks columns the spec
    declares (annotation view) or the feature view `declared` (any view), or it has no
    rows (n_rows None: unknown yet). None when it can."""
    present = set(columns)
    required, reason = [], ""
    if view == annotations_view:
        required = AnnotationSchema(spec, key).names  # the columns the spec's table has
        reason = "which the spec declares; was it written with this spec?"
    if not [c for c in required if c not in present]:
        required = list(dict.fromkeys(declared))
        reason = "which the feature view declares; does the view match the table?"
    missing = [c for c in required if c not in present]
    if missing:
        return GateResult(view=view, rows=n_rows or 0, checks=[Check(
            suite="shape", expectation="expect_table_columns_to_include", column=None,
            success=False, observed={"missing": missing}, expected={"column_set": required},
            error=f"the table lacks {missing}, {reason}")])
    if n_rows == 0:
        return GateResult(view=view, rows=0, checks=[Check(
            suite="shape", expectation="expect_table_row_count_to_be_between", column=None,
            success=False, observed=0, expected={"min_value": 1},
            error="the table has no rows: nothing to validate or materialize")])
    return None
