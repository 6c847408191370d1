"""Where the feature table lives and how a run commits to it, safely without atomic rename.

    <root>/<fingerprint>/_schema.json                 the directory's columns and id key
    <root>/<fingerprint>/run-<time>-<run id>.parquet  one file per committed run, append-only
    <root>/_staging/<run id>/...                      a run's work in progress (never read)

The table is a history: each run appends one Parquet file holding the rows it annotated
(new items, changed content, changed attribute definitions); rows of earlier runs stay, and
readers take the newest row per item (Feast's rule: latest event_timestamp, then latest
created_timestamp). Object stores have no atomic directory rename, but putting one object
is atomic: a reader lists either the run's whole file or nothing. So a commit is a single
object move from staging into the table directory, after the file is complete and checked.

Every fingerprint (the spec's column names and types, udfs.schema) has its own directory,
so the files a reader globs always share their columns; a spec that adds or drops an
attribute starts a new directory, seeded with the old history (udfs.schema, annotate job).

What a reader sees at each step of a run: staging, checking and consolidating touch only
`_staging/<run id>` (ignored by Spark, not matched by `<fingerprint>/*.parquet`), so readers
see the previous table; the commit move makes the whole new file visible at once; deleting
the staging directory changes nothing visible. A run killed at any step leaves the previous
table whole and its own staging directory behind (reported by later runs, never deleted by
them: it may belong to a writer that is still running).

Paths are local or URIs that pyarrow.fs understands (s3://, gs://, hdfs://; Hadoop's s3a://
is read as s3://), so the commit needs no Spark JVM handle and works under Spark Connect.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.fs as pafs

from udfs.schema import AnnotationSchema

STAGING = "_staging"
SCHEMA_FILE = "_schema.json"
_RUN_FILE = re.compile(r"^run-(\d{8}T\d{12})-([0-9a-f]+)(?:-\w+)?\.parquet$")


class TableError(ValueError):
    """The table cannot be read or written as asked; the message says what to do."""


def _split(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.startswith(("s3a://", "s3n://")):
        uri = "s3://" + uri.split("://", 1)[1]
    return pafs.FileSystem.from_uri(uri)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_file_name(started: datetime, run_id: str, tag: str = "") -> str:
    """Lexical order is commit order: the run's start time, to the microsecond, first."""
    stamp = started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return f"run-{stamp}-{run_id}{'-' + tag if tag else ''}.parquet"


@dataclass(frozen=True)
class FeatureTable:
    """The annotation table at `root` (the job's --output)."""
    root: str

    def __post_init__(self) -> None:
        # a local path made absolute here, so a Spark Connect server (whose working
        # directory is its own) writes where this process reads
        root = self.root if "://" in self.root else os.path.abspath(self.root)
        object.__setattr__(self, "root", root.rstrip("/"))

    # --- paths (strings in the caller's scheme, e.g. s3a:// for Spark) -----------------

    def directory(self, schema: AnnotationSchema) -> str:
        return f"{self.root}/{schema.fingerprint}"

    def glob(self, schema: AnnotationSchema) -> str:
        """What a file-based reader (DuckDB, Feast's FileSource) reads."""
        return f"{self.directory(schema)}/*.parquet"

    def staging(self, run_id: str) -> str:
        return f"{self.root}/{STAGING}/{run_id}"

    # --- listing ------------------------------------------------------------------------

    def _fs(self, path: str | None = None) -> tuple[pafs.FileSystem, str]:
        return _split(path or self.root)

    def _list(self, path: str) -> list[pafs.FileInfo]:
        fs, p = self._fs(path)
        info = fs.get_file_info(p)
        if info.type != pafs.FileType.Directory:
            return []
        return fs.get_file_info(pafs.FileSelector(p))

    def run_files(self, schema_or_dir: AnnotationSchema | str) -> list[str]:
        """Committed run files of a directory, oldest first (base names)."""
        directory = (self.directory(schema_or_dir) if isinstance(schema_or_dir, AnnotationSchema)
                     else schema_or_dir)
        return sorted(i.base_name for i in self._list(directory)
                      if i.type == pafs.FileType.File and _RUN_FILE.match(i.base_name))

    def recorded(self, directory: str) -> dict | None:
        """The _schema.json of a directory, or None when it has none yet."""
        fs, p = self._fs(f"{directory}/{SCHEMA_FILE}")
        if fs.get_file_info(p).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(p) as f:
            return json.loads(f.read().decode())

    def directories(self) -> list[tuple[str, str]]:
        """(fingerprint, directory) of every directory holding committed runs, the one with
        the newest commit first."""
        found = []
        for info in self._list(self.root):
            if info.type != pafs.FileType.Directory or info.base_name.startswith(("_", ".")):
                continue
            directory = f"{self.root}/{info.base_name}"
            runs = self.run_files(directory)
            if runs:
                found.append((runs[-1], info.base_name, directory))
        return [(fp, d) for _, fp, d in sorted(found, reverse=True)]

    def exists(self, schema: AnnotationSchema) -> bool:
        return bool(self.run_files(schema))

    def stale_staging(self, own: str | None = None) -> list[str]:
        """Staging directories of other runs: killed runs, or writers still running."""
        return sorted(f"{self.root}/{STAGING}/{i.base_name}"
                      for i in self._list(f"{self.root}/{STAGING}")
                      if i.type == pafs.FileType.Directory and i.base_name != own)

    # --- writing ------------------------------------------------------------------------

    def check_key(self, schema: AnnotationSchema) -> None:
        """Refuse a run whose id column or type differs from what the directory holds."""
        seen = self.recorded(self.directory(schema))
        if seen and (seen["id_column"], seen["id_type"]) != (schema.id_column, schema.id_type):
            raise TableError(
                f"{self.directory(schema)} keys items by {seen['id_column']!r} "
                f"({seen['id_type']}), this input by {schema.id_column!r} ({schema.id_type}); "
                "write to a new --output, or cast the ids to match")

    def commit(self, staged_dir: str, schema: AnnotationSchema, name: str) -> str:
        """Move the one Parquet file Spark wrote under `staged_dir` into the table: the
        single visible step of a run. Returns the committed file's path."""
        fs, sp = self._fs(staged_dir)
        parts = [i.path for i in fs.get_file_info(pafs.FileSelector(sp))
                 if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")]
        if len(parts) != 1:
            raise TableError(f"{staged_dir}: expected one staged Parquet file, found {len(parts)}")
        directory = self.directory(schema)
        self.write_schema(schema)
        dfs, target = self._fs(f"{directory}/{name}")
        if dfs.get_file_info(target).type != pafs.FileType.NotFound:
            raise TableError(f"{directory}/{name} exists already; run ids must be unique")
        fs.move(parts[0], target)  # one object: atomic on local disks and object stores
        return f"{directory}/{name}"

    def write_schema(self, schema: AnnotationSchema) -> None:
        """Record the directory's columns once (before its first run file)."""
        directory = self.directory(schema)
        if self.recorded(directory) is not None:
            return
        fs, p = self._fs(directory)
        fs.create_dir(p, recursive=True)
        tmp = f"{p}/.{SCHEMA_FILE}.{new_run_id()}"
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(schema.describe(), indent=2).encode())
        fs.move(tmp, f"{p}/{SCHEMA_FILE}")

    def clean(self, run_id: str) -> None:
        """Delete this run's staging directory (only ever its own)."""
        fs, p = self._fs(self.staging(run_id))
        if fs.get_file_info(p).type == pafs.FileType.Directory:
            fs.delete_dir(p)
        if isinstance(fs, pafs.LocalFileSystem):
            # a local run that committed nothing leaves no empty directories behind; rmdir
            # refuses a directory another writer has put files in, so this is safe
            for directory in (os.path.dirname(p), os.path.dirname(os.path.dirname(p))):
                try:
                    os.rmdir(directory)
                except OSError:
                    break

    def write_frame(self, df, schema: AnnotationSchema, started: datetime | None = None) -> str:
        """Commit a pandas frame as one run (tests, tools, small tables): the same layout
        and the same single-object commit as the annotate job."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        run_id = new_run_id()
        started = started or datetime.now(timezone.utc)
        table = pa.Table.from_pandas(df[schema.names], schema=schema.arrow_schema(),
                                     preserve_index=False)
        staged = self.staging(run_id)
        fs, sp = self._fs(staged)
        fs.create_dir(sp, recursive=True)
        try:
            pq.write_table(table, f"{sp}/part-0.parquet", filesystem=fs)
            return self.commit(staged, schema, run_file_name(started, run_id))
        finally:
            self.clean(run_id)


def read_latest(root: str, spec=None, key: str | None = None):
    """The table as served, (newest row per item as pandas, id column).

    For an annotate job's output, the directory of the spec's columns is read (the newest
    committed one when no spec is given) and the id column comes from its _schema.json. A
    path holding Parquet files directly (a table not written by the annotate job) is read as
    it is.
    """
    df, key, plain = _read_rows(root, spec, key)
    return (df if plain else latest_rows(df, key)), key


def read_history(root: str, spec=None, key: str | None = None):
    """The whole history, (every committed row of every run as pandas, id column): what a
    point-in-time reader needs (which row was valid when). The same directory and key as
    read_latest; a plain Parquet path is read as it is."""
    df, key, _ = _read_rows(root, spec, key)
    return df, key


def _read_rows(root: str, spec, key: str | None):
    """(every row, id column, whether `root` is plain Parquet rather than the job's layout)."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    table = FeatureTable(root)
    fs, p = _split(root)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise TableError(f"table not found: {root}")
    plain = info.type == pafs.FileType.File or any(
        i.base_name.endswith(".parquet") for i in table._list(root))
    if plain:  # not the annotate job's layout: read as it is
        return pq.read_table(p, filesystem=fs).to_pandas(), key or "item_id", True
    found = dict(table.directories())
    if spec is not None:
        fingerprint = AnnotationSchema(spec).fingerprint
        if fingerprint not in found:
            raise TableError(
                f"{root} has no table with this spec's columns (fingerprint {fingerprint}); "
                f"it holds {sorted(found) or 'no committed runs'}. Run the annotate job with "
                "this spec first.")
    elif not found:
        raise TableError(f"{root} holds no committed annotation runs")
    else:
        fingerprint = next(iter(found))
    directory = found[fingerprint]
    key = (table.recorded(directory) or {}).get("id_column", key or "item_id")
    files = [f"{_split(directory)[1]}/{n}" for n in table.run_files(directory)]
    df = ds.dataset(files, filesystem=fs, format="parquet").to_table().to_pandas()
    return df, key, False


def read_frame(path: str):
    """What the offline tools accept: a CSV file, a Parquet file or directory, or an annotate
    job's output (its newest row per item)."""
    import pandas as pd

    if path.endswith(".csv"):
        if not os.path.exists(path):
            raise TableError(f"table not found: {path}")
        return pd.read_csv(path)
    return read_latest(path)[0]


def latest_rows(df, key: str):
    """Newest row per id by (event_timestamp, created_timestamp), as Feast serves them."""
    order = [c for c in ("event_timestamp", "created_timestamp") if c in df.columns]
    if not order or key not in df.columns:
        return df.reset_index(drop=True)
    return (df.sort_values(order, kind="stable").drop_duplicates(key, keep="last")
            .sort_index().reset_index(drop=True))
