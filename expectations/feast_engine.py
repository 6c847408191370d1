"""The gate as a Feast batch compute engine: validate every view, then write, or write nothing.

    batch_engine:
      type: expectations.feast_engine.GatedComputeEngine
      spec: ../specs/movielens.yaml
      engine: {type: local}            # or {type: spark.engine, spark_conf: {...}}

The gate composes with a Feast batch engine (`engine:`, resolved the way Feast resolves
`batch_engine: {type: ...}`) instead of being one: Feast's local engine for the embedded
default, Feast's Spark compute engine for production. Feast hands all the views of one
`feast materialize` / `materialize-incremental` to `materialize()` at once (the gate says
`supports_batch`). For each view the inner engine's own FeatureBuilder builds its
execution plan (read the window, filter, keep the latest row per entity, write); the gate
runs the plan up to, not including, the write node, and validates that node's input:
exactly the rows that will be written, read once.

- local engine: the rows are the Arrow table in hand; Great Expectations checks them
  (pandas), as it always did on this path.
- Spark engine: the rows are a Spark DataFrame, persisted on the executors' disks (so the
  write reuses the blocks that were checked; the annotation table's run files are
  immutable, so even a recomputed block holds the same rows); the expectations run as
  Spark aggregations (expectations.spark_checks). The driver receives counts and a few
  sample values.

Only when every view passes are the write nodes executed, with the same execution
contexts. Otherwise `GateRefused` propagates before anything is written: Feast rolls back
the views' state without recording a materialization interval, and the CLI exits 1 with
the gate's summary (a report and a quarantine per refused view).

Before a view is read, the gate checks what it can without reading it: that the view was
applied with the gate's spec (tags `spec_version`, `schema`), and that its source has every
declared column (`expectations.sources`). A window with no rows passes (nothing new since
the last materialization) unless the source itself is empty.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click
from feast.infra.common.materialization_job import (MaterializationJob,
                                                    MaterializationJobStatus,
                                                    MaterializationTask)
from feast.infra.compute_engines.base import ComputeEngine
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import (BATCH_ENGINE_CLASS_FOR_TYPE, FeastConfigBaseModel,
                               get_batch_engine_config_from_type)
from pydantic import Field, field_validator

from expectations.result import refuse_shape
from expectations.sources import SourceInfo, SourceUnreadable, declared_columns
from expectations.thresholds import Thresholds
from udfs.spec import load_spec

__all__ = ["ENGINE_TYPE", "GatedComputeEngine", "GatedComputeEngineConfig", "GateRefused",
           "SourceUnreadable", "SpecMismatch", "gate_from_config"]

ENGINE_TYPE = "expectations.feast_engine.GatedComputeEngine"
log = logging.getLogger("annofeat.gate")
# Feast warns on every SparkSource it builds and every Spark offline-store call (dozens per
# `feast materialize`); once is enough to know the Spark store is "alpha" in Feast.
warnings.filterwarnings("once", category=RuntimeWarning,
                        message="The spark (data source API|offline store) is an experimental")
# ibis (Feast's DuckDB offline store) calls a DuckDB method DuckDB deprecates, on every read;
# nothing a user of `feast materialize` can act on.
warnings.filterwarnings("ignore", category=DeprecationWarning,
                        message=r"fetch_arrow_table\(\) is deprecated")
# py4j logs each closed gateway connection at INFO, and the feast CLI shows INFO
logging.getLogger("py4j").setLevel(logging.WARNING)
# Feast's own format for its CLI's log lines (feast/cli/cli.py)
FEAST_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
FEAST_LOG_DATEFMT = "%m/%d/%Y %I:%M:%S %p"


def follow_feast_log_level() -> int | None:
    """Inside the `feast` CLI, make its `--log-level` (default: warning) hold for every logger.

    `feast` imports feast/cli/serve.py for its `serve` commands, and that module calls
    `logging.basicConfig(level=logging.INFO)` at import time: the root logger gets a handler
    in Python's default format (`INFO:annofeat.gate:...`) and the level INFO before the CLI
    reads `--log-level`. The CLI's own basicConfig then does nothing (the root already has a
    handler), and it applies the level only to loggers whose name contains "feast", so every
    other library's INFO lines reach the terminal. Here the root logger gets the level the
    user asked for and the handlers basicConfig made get Feast's format. Outside the CLI
    (FeatureStore.materialize from Python) nothing changes. Returns the level applied."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    root_ctx = ctx.find_root()
    callback = getattr(root_ctx.command, "callback", None)
    if not getattr(callback, "__module__", "").startswith("feast.cli"):
        return None
    level = logging.getLevelName(str(root_ctx.params.get("log_level") or "warning").upper())
    if not isinstance(level, int):
        return None
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:
        fmt = getattr(handler.formatter, "_fmt", None)
        if isinstance(handler, logging.StreamHandler) and fmt in (None, logging.BASIC_FORMAT):
            handler.setFormatter(logging.Formatter(FEAST_LOG_FORMAT, FEAST_LOG_DATEFMT))
    return level


LOCAL = "feast.infra.compute_engines.local.compute.LocalComputeEngine"
SPARK = "feast.infra.compute_engines.spark.compute.SparkComputeEngine"
# the inner engines whose execution plans the gate knows how to split before the write
INNER_ENGINES = {"local": LOCAL, LOCAL: LOCAL, "spark.engine": SPARK, SPARK: SPARK}


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
    engine: dict[str, Any] = Field(default_factory=lambda: {"type": "local"})
    """The Feast batch engine that reads and writes, as its own `batch_engine:` block would
    be written: `{type: local, backend: pandas}` or `{type: spark.engine, spark_conf: ...}`.
    Checked against that engine's own config class."""

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: dict[str, Any]) -> dict[str, Any]:
        kind = value.get("type")
        if kind not in INNER_ENGINES:
            raise ValueError(f"engine.type must be 'local' or 'spark.engine' (the engines whose "
                             f"execution plans the gate runs), not {kind!r}")
        get_batch_engine_config_from_type(kind)(**value)  # the engine's own validation
        return dict(value)


def gate_from_config(config: GatedComputeEngineConfig, root: Path, key: str = "item_id",
                     thresholds: Thresholds | None = None):
    """The Gate a `batch_engine:` config describes, paths resolved against the repo `root`;
    `thresholds` (e.g. from flags) replaces the configured ones. Shared by the engine and
    `spark_jobs.validate --repo`, so both apply the same suites and limits."""
    # Imported here: Great Expectations takes seconds to import, and Feast builds this
    # engine for every `feast apply`, which never validates anything. GE logs at INFO
    # while importing and per context, and the Feast CLI shows INFO: keep it readable.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="great_expectations")
    from expectations.gate import Gate

    def path(value: str) -> Path:
        return (Path(root) / value).resolve()

    return Gate(spec=load_spec(path(config.spec)), report_dir=path(config.report_dir),
                quarantine_dir=path(config.quarantine_dir),
                reference_dir=path(config.reference_dir),
                suites_dir=path(config.suites_dir) if config.suites_dir else None,
                thresholds=thresholds or config.thresholds,
                annotations_view=config.annotations_view, key=key)


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


class SpecMismatch(click.ClickException):
    """The annotation view was applied with another spec than the one the gate checks."""


class GatedMaterializationJob(MaterializationJob):
    def __init__(self, job_id: str, status: MaterializationJobStatus,
                 error: BaseException | None = None) -> None:
        super().__init__()
        self._job_id, self._status, self._error = job_id, status, error

    def status(self) -> MaterializationJobStatus:
        return self._status

    def error(self) -> BaseException | None:
        return self._error

    def should_be_retried(self) -> bool:
        return False

    def job_id(self) -> str:
        return self._job_id

    def url(self) -> str | None:
        return None


@dataclass
class _Staged:
    """One view, read and held, then judged: its plan, context and the rows in hand."""
    task: MaterializationTask
    result: Any = None  # GateResult, once judged (or refused before reading)
    rows: int = 0
    plan: Any = None
    context: Any = None
    value: Any = None  # the write node's input (Arrow table value or persisted Spark frame)
    source: Any = None  # SourceInfo
    columns: list = field(default_factory=list)

    @property
    def job_id(self) -> str:
        t = self.task
        return f"{t.feature_view.name}-{t.start_time}-{t.end_time}"


class _GateLoader:
    """Builds the Gate in a thread: importing Great Expectations takes seconds, during which
    the driver would otherwise only wait for Spark to read the first view."""

    def __init__(self, build) -> None:
        self._gate, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(build,), daemon=True,
                                        name="annofeat-gate-loader")
        self._thread.start()

    def _run(self, build) -> None:
        try:
            self._gate = build()
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._gate


class GatedComputeEngine(ComputeEngine):
    def __init__(self, *, repo_config, offline_store, online_store, **options) -> None:
        super().__init__(repo_config=repo_config, offline_store=offline_store,
                         online_store=online_store)
        follow_feast_log_level()
        self.config = GatedComputeEngineConfig(**options)
        self.root = Path(repo_config.repo_path or ".")
        self.inner = _inner_engine(repo_config, offline_store, online_store, self.config.engine)
        kind = INNER_ENGINES[self.config.engine["type"]]
        self.runner = (_SparkRunner(self.inner, self.config.engine) if kind == SPARK
                       else _LocalRunner(self.inner))

    @property
    def supports_batch(self) -> bool:
        return True  # every view arrives in one call, so all are checked before any is written

    def update(self, project, views_to_delete, views_to_keep, entities_to_delete,
               entities_to_keep) -> None:
        self.inner.update(project, views_to_delete, views_to_keep, entities_to_delete,
                          entities_to_keep)

    def teardown_infra(self, project, fvs, entities) -> None:
        self.inner.teardown_infra(project, fvs, entities)

    def get_historical_features(self, registry, task):
        return self.inner.get_historical_features(registry, task)

    def materialize(self, registry: BaseRegistry,
                    tasks: MaterializationTask | list[MaterializationTask],
                    **kwargs) -> list[MaterializationJob]:
        tasks = [tasks] if isinstance(tasks, MaterializationTask) else list(tasks)
        keys = [c.name for t in tasks if t.feature_view.name == self.config.annotations_view
                for c in t.feature_view.entity_columns]
        key = keys[0] if keys else "item_id"
        spec = load_spec((self.root / self.config.spec).resolve())
        for task in tasks:
            self._check_applied_spec(spec, task.feature_view)
        loading = _GateLoader(lambda: gate_from_config(self.config, self.root, key=key))
        staged: list[_Staged] = []
        try:
            for task in tasks:  # read every view (or refuse it unread) ...
                staged.append(self._read(spec, key, registry, task))
            gate = loading.result()
            for s in staged:  # ... judge every view ...
                self._judge(gate, s)
            for s in staged:  # the verdicts, whatever --log-level says
                click.echo(f"gate: {s.result.summary().splitlines()[0]}")
            refused = [s.result for s in staged if not s.result.success]
            if refused:
                raise GateRefused(refused)
            return [self._write(s) for s in staged]  # ... then write them all
        finally:
            for s in staged:
                if s.value is not None:
                    self.runner.release(s.value)

    # --- one view -----------------------------------------------------------------------

    def _check_applied_spec(self, spec, view) -> None:
        """The annotation view records the spec it was applied with (udfs.feast_repo); a gate
        checking another spec would validate the wrong columns and labels."""
        if view.name != self.config.annotations_view:
            return
        from udfs.schema import AnnotationSchema

        tags = view.tags or {}
        want = {"spec_version": spec.version, "schema": AnnotationSchema(spec).fingerprint}
        have = {k: tags[k] for k in want if k in tags}
        if any(have[k] != want[k] for k in have):
            raise SpecMismatch(
                f"feature view {view.name!r} was applied with spec {tags.get('spec', '?')!r} "
                f"(version {have.get('spec_version', '?')}, columns {have.get('schema', '?')}), "
                f"but the gate checks spec {spec.name!r} (version {want['spec_version']}, "
                f"columns {want['schema']}): run `feast apply` after changing the spec, or "
                "point batch_engine.spec at the spec the definitions use. Nothing was written "
                "to the online store.")

    def _read(self, spec, key: str, registry: BaseRegistry,
              task: MaterializationTask) -> _Staged:
        """Run the view's plan up to its write node and hold the rows it would write; or
        refuse the view unread when its source lacks a declared column."""
        view = task.feature_view
        entities = [registry.get_entity(name, task.project) for name in view.entities]
        source = SourceInfo(view, self.repo_config, spark=self.runner.session)
        columns = source.columns()
        refused = refuse_shape(spec, key, self.config.annotations_view, view.name, columns,
                               None, declared_columns(view, entities))
        if refused is not None:  # Feast's read would fail on it: refuse before reading
            return _Staged(task, refused, source=source, columns=columns)

        started = time.perf_counter()
        context = self.inner.get_execution_context(registry, task)
        plan = self.runner.plan(registry, task, context)
        *upstream, write = plan.nodes
        if len(write.inputs) != 1 or write.outputs:
            raise RuntimeError(f"{view.name}: unexpected execution plan (the last node, "
                               f"{write.name!r}, is not the single-input write node)")
        context.node_outputs = {}
        for node in upstream:  # everything but the write: read, filter, latest per entity
            context.node_outputs[node.name] = node.execute(context)
        feed = write.inputs[0].name
        value, n = self.runner.hold(context.node_outputs[feed])
        context.node_outputs[feed] = value
        log.info("%s: %d rows to write, read in %.1f s", view.name, n,
                 time.perf_counter() - started)
        return _Staged(task, None, n, plan, context, value, source, columns)

    def _judge(self, gate, staged: _Staged) -> None:
        from expectations.result import GateResult

        view, task = staged.task.feature_view.name, staged.task
        started = time.perf_counter()
        if staged.result is not None:  # refused unread
            gate.record(staged.result)
        elif staged.rows:
            staged.result = self.runner.check(gate, view, staged.value, staged.rows)
        elif staged.source.has_rows() is False:
            staged.result = gate.record(gate.refuse_shape(view, staged.columns, 0))
        else:  # e.g. materialize-incremental with nothing new since the last run
            staged.result = gate.record(GateResult(view=view, rows=0, checks=[], notes=[
                f"no rows in the window {task.start_time} .. {task.end_time}: nothing new to "
                "write (the table itself has rows)"]))
        log.info("%s: checked in %.1f s: %s", view, time.perf_counter() - started,
                 "passed" if staged.result.success else "refused")

    def _write(self, staged: _Staged) -> MaterializationJob:
        if not staged.rows:
            return GatedMaterializationJob(staged.job_id, MaterializationJobStatus.SUCCEEDED)
        write = staged.plan.nodes[-1]
        started = time.perf_counter()
        try:
            write.execute(staged.context)
        except Exception as exc:  # as Feast's engines do: the job reports it, Feast raises it
            return GatedMaterializationJob(staged.job_id, MaterializationJobStatus.ERROR, exc)
        log.info("%s: %d rows written in %.1f s", staged.task.feature_view.name, staged.rows,
                 time.perf_counter() - started)
        return GatedMaterializationJob(staged.job_id, MaterializationJobStatus.SUCCEEDED)


def _inner_engine(repo_config, offline_store, online_store, engine: dict) -> ComputeEngine:
    """The configured Feast engine, built as Feast's provider builds a batch engine. It gets
    a copy of the repo config whose `batch_engine` is its own block, since Feast's engines
    read their settings (e.g. spark_conf) from there, and so do the executors that write."""
    from feast import importer

    path = BATCH_ENGINE_CLASS_FOR_TYPE.get(engine["type"], engine["type"])
    module, name = path.rsplit(".", 1)
    engine_class = importer.import_class(module, name)
    inner_config = repo_config.model_copy()
    inner_config.batch_engine_config = dict(engine)
    inner_config._batch_engine = None
    return engine_class(repo_config=inner_config, offline_store=offline_store,
                        online_store=online_store, **engine)


def spark_session(repo_config, engine_conf: dict | None = None):
    """The active session (the Spark offline store's, or a caller's), else one built from
    the offline store's spark_conf overlaid with the engine's."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return _classic(active)
    conf = dict(getattr(repo_config.offline_store, "spark_conf", None) or {})
    conf.update(engine_conf or {})
    if conf.get("spark.master", "local").startswith("local"):
        # local mode: the Python workers that write must run this interpreter (it has feast)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return _classic(SparkSession.builder.config(
        conf=SparkConf().setAll(list(conf.items()))).getOrCreate())


def _classic(session):
    from udfs.connect import require_classic
    require_classic(session, "the gate's Spark path (Feast's Spark offline store and compute "
                    "engine)", "Feast drives Spark through the SparkContext")
    return session


class _LocalRunner:
    """Feast's local engine: the rows to write are an Arrow table in the driver already."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def session(self):  # a SparkSource read by the local engine (Spark offline store)
        return spark_session(self.engine.repo_config)

    def plan(self, registry, task, context):
        from feast.infra.compute_engines.local.feature_builder import LocalFeatureBuilder
        # the engine's backend (pandas unless configured), as its own _materialize_one picks
        return LocalFeatureBuilder(registry, task,
                                   backend=self.engine._get_backend(context)).build()

    def hold(self, value):
        return value, value.data.num_rows

    def check(self, gate, view: str, value, n: int):
        return gate.check(view, value.data.to_pandas())

    def release(self, value) -> None:
        pass


class _SparkRunner:
    """Feast's Spark compute engine: the rows to write stay a Spark DataFrame, persisted
    on the executors and checked with Spark aggregations.

    DISK_ONLY: the frame is scanned three or four times (count, the checks, the write), and
    serialized blocks on the executors' local disks (in the OS page cache, mostly) are cheap
    to re-read, while the executors' heaps stay free for the write. MEMORY_AND_DISK made a
    1 GB local-mode JVM run out of heap caching 2M annotation rows, and where it did not,
    blocks moving between memory and disk made the write slower than the whole ungated run
    (bench/materialize_scale.py)."""

    def __init__(self, engine, config: dict) -> None:
        self.engine = engine
        self.config = config

    def session(self):
        return spark_session(self.engine.repo_config, self.config.get("spark_conf"))

    def plan(self, registry, task, context):
        from feast.infra.compute_engines.spark.feature_builder import SparkFeatureBuilder
        return SparkFeatureBuilder(registry=registry, spark_session=self.session(),
                                   task=task).build()

    def hold(self, value):
        from feast.infra.compute_engines.dag.value import DAGValue
        from pyspark import StorageLevel

        frame = value.data.persist(StorageLevel.DISK_ONLY)
        return DAGValue(data=frame, format=value.format, metadata=value.metadata), frame.count()

    def check(self, gate, view: str, value, n: int):
        return gate.check_spark(view, value.data, n_rows=n)

    def release(self, value) -> None:
        value.data.unpersist()
