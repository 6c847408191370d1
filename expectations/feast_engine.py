"""The gate as a Feast batch compute engine: validate every view, then write, or write nothing.

    batch_engine:
      type: expectations.feast_engine.GatedComputeEngine
      spec: ../specs/movielens.yaml

Feast hands all the views of one `feast materialize` to `materialize()` at once (the engine
says `supports_batch`). Each task's rows, the latest per entity in the task's window as the
parent would write them, are validated first; only when every view passes does the local
engine write them. Otherwise `GateRefused` propagates and the CLI exits non-zero with the
online store untouched.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import click

from feast.infra.common.materialization_job import MaterializationJob, MaterializationTask
from feast.infra.compute_engines.local.compute import LocalComputeEngine
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import FeastConfigBaseModel
from pydantic import Field

from expectations.thresholds import Thresholds
from udfs.spec import load_spec

ENGINE_TYPE = "expectations.feast_engine.GatedComputeEngine"


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What reading a missing source raises: the file store an OSError, DuckDB its own."""
    try:
        import duckdb
        return FileNotFoundError, OSError, duckdb.IOException
    except ImportError:
        return FileNotFoundError, OSError


class GatedComputeEngineConfig(FeastConfigBaseModel):
    """`batch_engine:` keys; relative paths are resolved against the feature repo."""
    type: Literal["expectations.feast_engine.GatedComputeEngine"] = ENGINE_TYPE
    spec: str
    """The attribute spec YAML the annotation suite is generated from."""
    report_dir: str = "data/gate/reports"
    quarantine_dir: str = "data/gate/quarantine"
    reference_dir: str = "data/gate/reference"
    suites_dir: str | None = None
    """User suites (`<view>.json`); None: the ones shipped in expectations/suites."""
    annotations_view: str = "item_annotations"
    thresholds: Thresholds = Field(default_factory=Thresholds)
    backend: str | None = None
    """The local engine's DataFrame backend (pandas by default)."""


# click.ClickException: the `feast` CLI (a click app) prints "Error: <message>" and exits 1
# instead of a traceback; Python callers still get an ordinary exception.
class GateRefused(click.ClickException):
    """Raised before anything is written; the message says which views failed and why."""

    def __init__(self, results: list) -> None:
        self.results = results
        lines = ["the expectations gate refused this materialization; "
                 "nothing was written to the online store."]
        lines += [r.summary() for r in results]
        super().__init__("\n".join(lines))


class SourceUnreadable(click.ClickException):
    """A view's offline data cannot be read (e.g. the table was never written)."""


class GatedComputeEngine(LocalComputeEngine):
    def __init__(self, *, repo_config, offline_store, online_store, **options) -> None:
        self.config = GatedComputeEngineConfig(**options)
        super().__init__(backend=self.config.backend, repo_config=repo_config,
                         offline_store=offline_store, online_store=online_store)
        self.root = Path(repo_config.repo_path or ".")

    @property
    def supports_batch(self) -> bool:
        return True  # every view arrives in one call, so all are checked before any is written

    def materialize(self, registry: BaseRegistry,
                    tasks: MaterializationTask | list[MaterializationTask],
                    **kwargs) -> list[MaterializationJob]:
        tasks = [tasks] if isinstance(tasks, MaterializationTask) else list(tasks)
        gate = self.gate()
        results = [gate.check(task.feature_view.name, self.rows(task)) for task in tasks]
        refused = [r for r in results if not r.success]
        if refused:
            raise GateRefused(refused)
        return super().materialize(registry, tasks, **kwargs)

    def gate(self):
        # Imported here: Great Expectations takes seconds to import, and Feast builds this
        # engine for every `feast apply`, which never validates anything. GE logs at INFO
        # while importing and per context, and the Feast CLI shows INFO: keep it readable.
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                module="great_expectations")
        from expectations.gate import Gate

        c = self.config
        return Gate(spec=load_spec(self.path(c.spec)), report_dir=self.path(c.report_dir),
                    quarantine_dir=self.path(c.quarantine_dir),
                    reference_dir=self.path(c.reference_dir),
                    suites_dir=self.path(c.suites_dir) if c.suites_dir else None,
                    thresholds=c.thresholds, annotations_view=c.annotations_view)

    def path(self, value: str) -> Path:
        return (self.root / value).resolve()

    def rows(self, task: MaterializationTask):
        """The rows this task would write: the latest per entity within the task's window."""
        view = task.feature_view
        source = view.batch_source
        try:  # the file store reads in to_df(), DuckDB already in the pull
            job = self.offline_store.pull_latest_from_table_or_query(
                config=self.repo_config, data_source=source,
                join_key_columns=[c.name for c in view.entity_columns],
                feature_name_columns=[f.name for f in view.features],
                timestamp_field=source.timestamp_field,
                created_timestamp_column=source.created_timestamp_column,
                start_date=task.start_time, end_date=task.end_time)
            return job.to_df().rename(columns=source.field_mapping or {})
        except _unreadable_errors() as exc:
            where = getattr(source, "path", None) or source.name
            raise SourceUnreadable(
                f"feature view {view.name!r}: cannot read its source {where!r} "
                f"({type(exc).__name__}); has the job that writes it run? Nothing was written "
                "to the online store.") from None
