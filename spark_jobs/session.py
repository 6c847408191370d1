"""One place that builds the SparkSession every job uses, and keeps the jobs' output readable."""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings

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
    # Python workers inherit these: offline model loading, no per-worker progress bars
    "spark.executorEnv.HF_HUB_OFFLINE": "1",
    "spark.executorEnv.HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "spark.executorEnv.TOKENIZERS_PARALLELISM": "false",
}


# Libraries that log at INFO on every run (GE per context, Feast per registry read).
NOISY_LOGGERS = ("great_expectations", "py4j", "feast", "urllib3", "numexpr")


def quiet(verbose: bool = False) -> None:
    """A job prints progress, its report and errors; --verbose brings the libraries' own
    logging and warnings back."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)


def submitted_remote() -> str | None:
    """The Connect URL of `spark-submit --remote`, which hands a Python app its settings as
    JSON in PYSPARK_REMOTE_INIT_CONF_<i> rather than setting SPARK_REMOTE."""
    for i in range(int(os.environ.get("PYSPARK_REMOTE_INIT_CONF_LEN", "0"))):
        url = json.loads(os.environ[f"PYSPARK_REMOTE_INIT_CONF_{i}"]).get("spark.remote")
        if url:
            return url
    return None


def get_spark(app_name: str, master: str | None = None, conf: dict | None = None,
              verbose: bool = False, remote: str | None = None) -> SparkSession:
    """A session with BASE_CONF; `master` only when not launched by spark-submit. `remote`
    (or SPARK_REMOTE, or `spark-submit --remote`) makes it a Spark Connect client,
    given only the SQL settings: the server's own settings (workers, their environment)
    are its operator's."""
    remote = remote or os.environ.get("SPARK_REMOTE") or submitted_remote()
    level = "INFO" if verbose else os.environ.get("ANNOFEAT_SPARK_LOG_LEVEL", "WARN")
    if remote:
        builder = SparkSession.builder.remote(remote).appName(app_name)
        for key, value in {**BASE_CONF, **(conf or {})}.items():
            if key.startswith("spark.sql."):
                builder = builder.config(key, value)
        return builder.getOrCreate()
    # Driver and workers must run the interpreter that has this project installed.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    # spark.log.level applies from the context's start, so its INFO start-up lines go too
    # vLLM logs its engine start at INFO, line by line, in every worker
    engine_logs = {"spark.executorEnv.VLLM_LOGGING_LEVEL": os.environ.get(
        "VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")}
    if not verbose:
        engine_logs["spark.executorEnv.PYTHONWARNINGS"] = os.environ.get(
            "PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    for key, value in {**BASE_CONF, **engine_logs, "spark.log.level": level,
                       **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(level)
    return spark
