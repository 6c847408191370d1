"""What the gate leaves behind: a JSON + HTML report per view, and quarantined Parquet.

The report names every failing expectation with its observed value and its bounds. A
refused batch is kept whole (`batch.parquet`, to fix and replay) and its offending rows
separately (`failing_rows.parquet`, with the expectations each row broke): one Parquet file
each from a pandas check, one Parquet directory each (written by Spark) from a Spark check.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from expectations.result import GateResult


def write_report(result: GateResult, report_dir: Path) -> Path:
    """Write `<view>.json` and `<view>.html` (the latest run of that view); return the JSON."""
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / f"{result.view}.json"
    path.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    path.with_suffix(".html").write_text(render_html(result))
    return path


def render_html(result: GateResult) -> str:
    def cell(value) -> str:
        return f"<td>{html.escape(json.dumps(value, default=str))}</td>"

    rows = "\n".join(
        f'<tr class="{"ok" if c.success else "fail"}"><td>{"pass" if c.success else "FAIL"}</td>'
        f"<td>{html.escape(c.expectation)}</td><td>{html.escape(c.column or '')}</td>"
        + cell(c.observed) + cell(c.expected)
        + cell(list(c.unexpected_values)) + f"<td>{html.escape(c.error or '')}</td></tr>"
        for c in sorted(result.checks, key=lambda c: c.success))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    quarantined = "".join(f"<li>{html.escape(str(p))}</li>" for p in result.quarantine)
    verdict = "PASSED" if result.success else "FAILED"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(result.view)}: {verdict}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
tr.fail {{ background: #fdd; }} tr.ok {{ background: #efe; }}
</style></head><body>
<h1>{html.escape(result.view)}: {verdict}</h1>
<p>{result.rows} rows checked at {result.checked_at.isoformat(timespec="seconds")};
{len(result.failures)} of {len(result.checks)} expectations failed.</p>
<ul>{notes}</ul>
<table><tr><th></th><th>expectation</th><th>column</th><th>observed</th><th>expected</th>
<th>unexpected values (sample)</th><th>error</th></tr>
{rows}
</table>
{f"<h2>Quarantine</h2><ul>{quarantined}</ul>" if quarantined else ""}
</body></html>
"""


def quarantine(df: pd.DataFrame, result: GateResult, directory: Path) -> list[Path]:
    """Keep the refused batch and its offending rows as Parquet; return the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    batch = directory / "batch.parquet"
    df.to_parquet(batch, index=False)
    broke: dict[int, list[str]] = {}
    for check in result.failures:
        for row in check.rows:
            broke.setdefault(row, []).append(f"{check.expectation}({check.column})")
    if not broke:  # only batch-level expectations failed (e.g. drift): the batch says it all
        return [batch]
    positions = sorted(broke)
    rows = df.iloc[positions].assign(failed_expectations=[broke[p] for p in positions])
    failing = directory / "failing_rows.parquet"
    rows.to_parquet(failing, index=False)
    return [batch, failing]


def quarantine_spark(batch: Any, failing: Any | None, directory: Path) -> list[Path]:
    """`quarantine` for Spark DataFrames: Spark writes the refused batch and, when
    row-level expectations failed, the failing rows (with `failed_expectations`) as Parquet
    directories of the same names; no row passes through the driver. On a cluster,
    `directory` must be storage every executor can write (a shared mount).
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "batch.parquet"]
    batch.write.mode("error").parquet(str(paths[0]))
    if failing is not None:
        paths.append(directory / "failing_rows.parquet")
        failing.write.mode("error").parquet(str(paths[1]))
    return paths
