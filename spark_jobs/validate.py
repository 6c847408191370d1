"""Validate a feature table with the expectations gate: the check `feast materialize` runs.

    python -m spark_jobs.validate --repo feature_repo [--table T] [--view item_annotations]
    python -m spark_jobs.validate --spec specs/movielens.yaml --table T [--write-reference]

With --repo, the spec, suites, thresholds and report/quarantine/reference directories are
the gate's own, read from the repo's feature_store.yaml (`batch_engine:`), so this check and
`feast materialize` refuse the same tables; a flag (--max-error-share, ...) overrides one
setting explicitly. Without --table, the rows are read through the repo's offline store,
exactly as a full-window `feast materialize` reads them (needs `feast apply`). A table is
read as Feast serves it: the newest row per item.

Exit status: 0 the table passed, 1 it failed (a summary and the report path are printed),
2 a usage or configuration error (missing table, bad spec, bad suite, bad threshold).
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
from pydantic import ValidationError

from expectations.suites import SuiteError
from expectations.thresholds import Thresholds
from udfs.spec import SpecError, load_spec
from udfs.table import TableError, read_latest

GATE_DIR = Path("feature_repo/data/gate")
THRESHOLD_FLAGS = ("max_error_share", "max_kl_divergence", "max_label_share_shift",
                   "min_rows_for_drift")


class ConfigError(ValueError):
    """The repo's configuration cannot drive the gate."""


def read_table(path: str, spec, view: str, annotations_view: str) -> tuple[pd.DataFrame, str]:
    """(newest rows per item, id column) of an annotation table, or a plain Parquet table
    (file or directory) for other views."""
    if view == annotations_view:
        try:
            return read_latest(path, spec)
        except (OSError, pa.ArrowException) as exc:
            raise TableError(f"cannot read {path} as Parquet: {exc}") from None
    if not Path(path).exists():
        raise TableError(f"table not found: {path}")
    try:
        return pd.read_parquet(path), "item_id"
    except (OSError, pa.ArrowException) as exc:
        raise TableError(f"cannot read {path} as Parquet: {exc}") from None


def repo_gate_config(repo: Path, config_file: Path | None):
    """The gate's `batch_engine:` settings of a Feast repo, and the repo config."""
    from feast.repo_config import load_repo_config

    from expectations.feast_engine import ENGINE_TYPE, GatedComputeEngineConfig

    path = config_file or repo / "feature_store.yaml"
    if not path.exists():
        raise ConfigError(f"no Feast config at {path}")
    try:
        config = load_repo_config(repo, path)
    except Exception as exc:  # FeastConfigError and pydantic errors: the file is wrong
        raise ConfigError(f"{path}: {exc}") from None
    raw = config.batch_engine_config
    if not isinstance(raw, dict) or raw.get("type") != ENGINE_TYPE:
        raise ConfigError(f"{path}: batch_engine is not the expectations gate ({ENGINE_TYPE})")
    return GatedComputeEngineConfig(**raw), config


def offline_rows(repo: Path, config_file: Path | None, view: str) -> tuple[pd.DataFrame, str]:
    """The rows a full-window `feast materialize` would validate and write for `view`."""
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(repo), fs_yaml_file=config_file)
    try:
        fv = store.get_feature_view(view)
    except Exception as exc:  # FeatureViewNotFoundException, missing registry
        raise ConfigError(f"feature view {view!r} is not in the registry ({exc}); "
                          "run `feast apply`, or give --table") from None
    source = fv.batch_source
    provider = store._get_provider()
    job = provider.offline_store.pull_latest_from_table_or_query(
        config=store.config, data_source=source,
        join_key_columns=[c.name for c in fv.entity_columns],
        feature_name_columns=[f.name for f in fv.features],
        timestamp_field=source.timestamp_field,
        created_timestamp_column=source.created_timestamp_column,
        start_date=datetime(1970, 1, 1, tzinfo=timezone.utc),
        end_date=datetime.now(timezone.utc))
    return job.to_df(), fv.entity_columns[0].name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=None,
                   help="Feast repo whose feature_store.yaml configures the gate")
    p.add_argument("--config", type=Path, default=None,
                   help="the repo's Feast config file (default: <repo>/feature_store.yaml)")
    p.add_argument("--spec", default=None, help="attribute spec YAML (default: the gate's)")
    p.add_argument("--table", default=None,
                   help="the annotate job's --output, or a Parquet file or directory")
    p.add_argument("--view", default=None,
                   help="the feature view the table feeds (picks the suites; "
                        "default: the annotations view)")
    p.add_argument("--report-dir", type=Path, default=None)
    p.add_argument("--quarantine-dir", type=Path, default=None)
    p.add_argument("--reference-dir", type=Path, default=None)
    p.add_argument("--suites-dir", type=Path, default=None,
                   help="user suites, <view>.json (default: the gate's, or expectations/suites)")
    p.add_argument("--write-reference", action="store_true",
                   help="if the table passes (drift aside), store its label distribution as "
                        "the reference for later drift checks")
    p.add_argument("--max-error-share", type=float)
    p.add_argument("--max-kl-divergence", type=float)
    p.add_argument("--max-label-share-shift", type=float,
                   help="multi-label attributes: largest change of a label's share")
    p.add_argument("--min-rows-for-drift", type=int)
    p.add_argument("--verbose", action="store_true", help="show the libraries' own logging")
    args = p.parse_args(argv)
    if args.repo is None and (args.spec is None or args.table is None):
        p.error("give --repo, or both --spec and --table")
    return args


def build_gate(args: argparse.Namespace, key: str = "item_id"):
    """The gate of the repo (flags override), or one from flags and defaults."""
    from expectations.feast_engine import GatedComputeEngineConfig, gate_from_config

    flags = {k: getattr(args, k) for k in THRESHOLD_FLAGS if getattr(args, k) is not None}
    if args.repo is not None:
        config, _ = repo_gate_config(args.repo, args.config)
        root = args.repo
    else:
        config, root = GatedComputeEngineConfig(spec=str(Path(args.spec).resolve())), Path.cwd()
        config = config.model_copy(update={
            "report_dir": str(GATE_DIR / "reports"), "quarantine_dir": str(GATE_DIR / "quarantine"),
            "reference_dir": str(GATE_DIR / "reference")})
    overrides = {"spec": str(Path(args.spec).resolve()) if args.spec else None,
                 "report_dir": args.report_dir, "quarantine_dir": args.quarantine_dir,
                 "reference_dir": args.reference_dir, "suites_dir": args.suites_dir}
    config = config.model_copy(update={k: str(Path(v).resolve()) for k, v in overrides.items()
                                       if v is not None})
    thresholds = Thresholds(**{**config.thresholds.model_dump(), **flags})
    return gate_from_config(config, root, key=key, thresholds=thresholds), config


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error
        return int(exc.code or 0)
    from spark_jobs.session import quiet
    quiet(args.verbose)
    try:
        gate, config = build_gate(args)
        view = args.view or gate.annotations_view
        if args.write_reference and view != gate.annotations_view:
            raise SuiteError(f"--write-reference applies to {gate.annotations_view!r}, "
                             f"not {view!r}")
        if args.table is not None:
            table, key = read_table(args.table, gate.spec, view, gate.annotations_view)
        else:
            table, key = offline_rows(args.repo, args.config, view)
        if key != gate.key:
            gate, _ = build_gate(args, key=key)
        result = gate.check(view, table, drift=not args.write_reference)
    except (SpecError, SuiteError, TableError, ValidationError, ConfigError) as exc:
        print(f"validate: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.write_reference:
        if result.success:
            print(f"reference written: {gate.write_reference(view, table)}")
        else:
            print("reference not written: the table failed")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
