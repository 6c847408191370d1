"""Validate a feature table with the expectations gate: the check `feast materialize` runs.

    python -m spark_jobs.validate --spec specs/movielens.yaml \\
        --table feature_repo/data/item_annotations [--view item_annotations] [--write-reference]

Exit status: 0 the table passed, 1 it failed (a summary and the report path are printed),
2 a usage or configuration error (missing table, bad spec, bad suite, bad threshold).
The default directories are the ones feature_repo/feature_store.yaml configures, so a
reference written here is the one the Feast gate compares against.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
from pydantic import ValidationError

from expectations.gate import Gate
from expectations.suites import SuiteError
from expectations.thresholds import Thresholds
from udfs.spec import SpecError, load_spec

GATE_DIR = Path("feature_repo/data/gate")
THRESHOLD_FLAGS = ("max_error_share", "max_kl_divergence", "min_rows_for_drift")


class TableError(ValueError):
    """The table to validate cannot be read."""


def read_table(path: Path) -> pd.DataFrame:
    """A Parquet file or a directory of them (Spark's output layout)."""
    if not path.exists():
        raise TableError(f"table not found: {path}")
    try:
        return pd.read_parquet(path)
    except (OSError, pa.ArrowException) as exc:
        raise TableError(f"cannot read {path} as Parquet: {exc}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="attribute spec YAML")
    p.add_argument("--table", required=True, help="Parquet file or directory")
    p.add_argument("--view", default="item_annotations",
                   help="the feature view the table feeds (picks the suites)")
    p.add_argument("--report-dir", type=Path, default=GATE_DIR / "reports")
    p.add_argument("--quarantine-dir", type=Path, default=GATE_DIR / "quarantine")
    p.add_argument("--reference-dir", type=Path, default=GATE_DIR / "reference")
    p.add_argument("--suites-dir", type=Path, default=None,
                   help="user suites, <view>.json (default: expectations/suites)")
    p.add_argument("--write-reference", action="store_true",
                   help="if the table passes (drift aside), store its label distribution as "
                        "the reference for later drift checks")
    p.add_argument("--max-error-share", type=float)
    p.add_argument("--max-kl-divergence", type=float)
    p.add_argument("--min-rows-for-drift", type=int)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error
        return int(exc.code or 0)
    try:
        thresholds = Thresholds(**{k: getattr(args, k) for k in THRESHOLD_FLAGS
                                   if getattr(args, k) is not None})
        gate = Gate(spec=load_spec(args.spec), report_dir=args.report_dir,
                    quarantine_dir=args.quarantine_dir, reference_dir=args.reference_dir,
                    suites_dir=args.suites_dir, thresholds=thresholds)
        if args.write_reference and args.view != gate.annotations_view:
            raise SuiteError(f"--write-reference applies to {gate.annotations_view!r}, "
                             f"not {args.view!r}")
        table = read_table(Path(args.table))
        result = gate.check(args.view, table, drift=not args.write_reference)
    except (SpecError, SuiteError, TableError, ValidationError) as exc:
        print(f"validate: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.write_reference:
        if result.success:
            print(f"reference written: {gate.write_reference(args.view, table)}")
        else:
            print("reference not written: the table failed")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
