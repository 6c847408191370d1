"""One place that builds the SparkSession every job uses."""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

# Settings every job relies on: UTC timestamps that Feast and pandas read back unchanged,
# Arrow for the pandas UDFs, and reused Python workers so an engine loads once per worker.
BASE_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.python.worker.reuse": "true",
    "spark.ui.showConsoleProgress": "true",
    "spark.sql.shuffle.partitions": "8",
}


def get_spark(app_name: str, master: str | None = None, conf: dict | None = None) -> SparkSession:
    """A session with BASE_CONF; `master` only when not launched by spark-submit."""
    # Driver and workers must run the interpreter that has this project installed.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    for key, value in {**BASE_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("ANNOFEAT_SPARK_LOG_LEVEL", "WARN"))
    return spark
