"""Spark Connect: what changes when the session is a thin client (Databricks serverless and
shared clusters, `spark-submit --remote`, `SparkSession.builder.remote(...)`).

A Connect client has no SparkContext (no accumulators, no defaultParallelism) and its UDFs
run in the *server's* Python workers, which must import this package. `ship` uploads the
package (a zip of udfs/) as a session artifact, so a cluster needs only the dependencies
(pandas, pyarrow, the engine's libraries), then checks that the workers import it.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
_shipped: dict[str, str] = {}  # Connect session id -> the artifact it was given
_checked: set[str] = set()     # Connect session ids whose workers import udfs


class ConnectError(RuntimeError):
    """A Connect session cannot do this, or its workers cannot run the functions."""


def is_connect(spark) -> bool:
    """True for a Spark Connect session (pyspark.sql.connect), False for a classic one."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def require_classic(spark, what: str, why: str) -> None:
    """Refuse a Connect session, in one line naming what the step needs."""
    if is_connect(spark):
        raise ConnectError(f"{what} needs a classic SparkSession ({why}); this is a Spark "
                           "Connect session")


def parallelism(spark) -> int:
    """The cores Spark spreads work over: the SparkContext's default parallelism, or on
    Connect the partitions Spark gives a range (sized by the same default)."""
    if not is_connect(spark):
        return spark.sparkContext.defaultParallelism
    from pyspark.sql import functions as F
    row = (spark.range(0, 1 << 12).select(F.spark_partition_id().alias("p"))
           .agg(F.countDistinct("p").alias("n")).first())
    return max(1, int(row["n"]))


def package_zip() -> tuple[str, bytes]:
    """The udfs package as a zip (importable from sys.path), named by its content."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(PACKAGE.rglob("*.py")):
            info = zipfile.ZipInfo(str(path.relative_to(PACKAGE.parent)), (1980, 1, 1, 0, 0, 0))
            zf.writestr(info, path.read_bytes())
    data = buf.getvalue()
    return f"annofeat-udfs-{hashlib.sha256(data).hexdigest()[:12]}.zip", data


def ship(spark, directory: str | Path | None = None) -> str | None:
    """Make this package importable by a Connect session's Python workers (once per session
    and code version) and check that it is; no-op on a classic session (its workers share
    the driver's environment). Returns the artifact's name."""
    if not is_connect(spark):
        return None
    import tempfile

    name, data = package_zip()
    if _shipped.get(spark.session_id) != name:
        folder = Path(directory or tempfile.mkdtemp(prefix="annofeat-ship-"))
        path = folder / name
        path.write_bytes(data)
        spark.addArtifacts(str(path), pyfile=True)
        _shipped[spark.session_id] = name
    check_workers(spark)
    return name


def check_workers(spark) -> None:
    """Run one tiny UDF on the server: its Python workers must import udfs, or the SQL
    functions would fail later, task by task, with a ModuleNotFoundError."""
    if not is_connect(spark) or spark.session_id in _checked:
        return
    from pyspark.sql.functions import udf

    def probe(_):
        try:
            import udfs.functions  # noqa: F401
            return None
        except Exception as exc:  # the worker's own message, sent back to the driver
            import sys
            return f"{type(exc).__name__}: {exc} (worker Python {sys.executable})"

    try:
        problem = spark.range(1).select(udf(probe, "string")("id").alias("p")).first()["p"]
    except Exception as exc:
        problem = str(exc).strip().splitlines()[0]
    if problem:
        raise ConnectError(
            "the Spark Connect server's Python workers cannot import the udfs package: "
            f"{problem}. Let udfs.register ship it (ship=True, the default), or install "
            "annofeat on the cluster; the workers also need its dependencies (pandas, "
            "pyarrow and the engine's libraries)")
    _checked.add(spark.session_id)
