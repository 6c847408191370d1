"""What the gate learns about a feature view's source before Feast reads it.

Two questions, answered from metadata where the format allows it:

- which columns does the source have? A view whose source lacks a declared column would
  fail inside Feast's read (an ibis or Spark analysis traceback); the gate refuses it first
  with a one-line reason.
- does the source hold any row at all? Asked only when a materialization window is empty:
  an empty window of a non-empty table means "nothing new" and passes, an empty table is
  refused.

Parquet `FileSource`s (the file and DuckDB offline stores; a glob such as the annotation
table's `<table>/<fingerprint>/*.parquet` is expanded here, as DuckDB would) are answered
from Parquet footers with pyarrow; `SparkSource`s with Spark (a schema resolution, and a
`LIMIT 1` count); any other source through its own `get_table_column_names_and_types`.
"""
from __future__ import annotations

import fnmatch
import glob
import posixpath
from typing import Callable

import click

_GLOB = set("*?[")


class SourceUnreadable(click.ClickException):
    """A view's offline data cannot be read (e.g. the table was never written)."""


def _unreadable(view, source, why: str) -> SourceUnreadable:
    where = getattr(source, "path", None) or source.name
    return SourceUnreadable(
        f"feature view {view.name!r}: cannot read its source {where!r} ({why}); has the job "
        "that writes it run? Nothing was written to the online store.")


def declared_columns(view, entities) -> list[str]:
    """The source columns Feast reads for `view`: join keys, features and timestamps,
    named as in the source (field mappings reversed)."""
    from feast.utils import _get_column_names

    keys, features, timestamp, created = _get_column_names(view, entities)
    return list(dict.fromkeys([*keys, timestamp, *([created] if created else []), *features]))


class SourceInfo:
    """Columns and emptiness of one view's batch source; `spark` gives the session for a
    SparkSource (called only when one is needed)."""

    def __init__(self, view, repo_config, spark: Callable[[], object] | None = None) -> None:
        self.view = view
        self.source = view.batch_source
        self.repo_config = repo_config
        self.spark = spark

    def columns(self) -> list[str]:
        kind = type(self.source).__name__
        try:
            if kind == "SparkSource":
                return list(self._spark_frame().columns)
            if kind == "FileSource" and self._parquet():
                fragments = list(self._dataset().get_fragments())
                if not fragments:
                    raise _unreadable(self.view, self.source, "no Parquet files there")
                names = [set(f.physical_schema.names) for f in fragments]
                # a column is there only if every file has it: readers fail on the others
                common = set.intersection(*names)
                return [n for n in fragments[0].physical_schema.names if n in common]
            return [name for name, _ in self.source.get_table_column_names_and_types(
                self.repo_config)]
        except SourceUnreadable:
            raise
        except Exception as exc:  # missing paths: OSError, DataSourceNotFoundException, ...
            raise _unreadable(self.view, self.source, type(exc).__name__) from None

    def has_rows(self) -> bool | None:
        """Whether the source holds at least one row (None: cannot tell cheaply)."""
        kind = type(self.source).__name__
        if kind == "SparkSource":
            return self._spark_frame().limit(1).count() > 0
        if kind == "FileSource" and self._parquet():
            return self._dataset().count_rows() > 0
        return None

    # --- helpers ----------------------------------------------------------------------

    def _parquet(self) -> bool:
        from feast.data_format import ParquetFormat
        return self.source.file_format is None or isinstance(self.source.file_format,
                                                             ParquetFormat)

    def _dataset(self):
        import pyarrow.dataset as ds
        from feast.infra.offline_stores.file_source import FileSource

        uri = FileSource.get_uri_for_file_path(self.repo_config.repo_path, self.source.path)
        fs, path = FileSource.create_filesystem_and_path(uri, self.source.s3_endpoint_override)
        if not _GLOB & set(path):
            return ds.dataset(path, filesystem=fs, format="parquet")
        if fs is None:
            files = sorted(glob.glob(path))
        else:
            import pyarrow.fs as pafs
            parent, pattern = posixpath.split(path)
            files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(parent))
                           if fnmatch.fnmatch(i.base_name, pattern))
        if not files:
            raise _unreadable(self.view, self.source, "no files match")
        return ds.dataset(files, filesystem=fs, format="parquet")

    def _spark_frame(self):
        if self.spark is None:
            raise RuntimeError("a SparkSource needs a Spark session")
        session = self.spark()
        source = self.source
        if source.path and not source.table and not source.query and not getattr(
                source, "table_format", None):
            # read directly: the source's own helper logs a traceback when the path is missing
            return session.read.format(source.file_format or "parquet").load(source.path)
        return session.sql(f"SELECT * FROM {source.get_table_query_string()}")
