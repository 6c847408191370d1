"""A standalone Spark cluster for tests: one Master and one Worker on 127.0.0.1, from the pip
pyspark package, the Worker advertising two GPUs ("0", "1") through a discovery script (no
real GPU is needed: Spark only schedules the addresses).

`cluster` is a module-scoped fixture: import it into a test module
(`from tests.spark_cluster import cluster`) and each module gets one cluster for its tests.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_home() -> Path:
    import pyspark
    return Path(pyspark.__file__).resolve().parent


def wait_for(what: str, check, timeout: float = 90, procs=()) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process {p.args[1]} exited with {p.returncode}")
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(master URL, discovery script) of a running Master + Worker; killed afterwards."""
    tmp = tmp_path_factory.mktemp("spark_cluster")
    script = tmp / "gpus.sh"
    script.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    script.chmod(0o755)
    props = tmp / "worker.properties"
    props.write_text("spark.worker.resource.gpu.amount 2\n"
                     f"spark.worker.resource.gpu.discoveryScript {script}\n")
    home = spark_home()
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_DAEMON_MEMORY": "256m", "SPARK_LOG_DIR": str(tmp / "logs"),
           "PYSPARK_PYTHON": sys.executable}
    ports = {name: free_port() for name in ("master", "master_ui", "worker", "worker_ui")}
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "wb")
        proc = subprocess.Popen([str(home / "bin" / "spark-class"), *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    def status() -> dict:
        return httpx.get(f"http://127.0.0.1:{ports['master_ui']}/json/", timeout=2).json()

    try:
        master_url = f"spark://127.0.0.1:{ports['master']}"
        start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
              "--port", str(ports["master"]), "--webui-port", str(ports["master_ui"]))
        wait_for("master", lambda: status().get("status") == "ALIVE", procs=procs)
        start("worker", "org.apache.spark.deploy.worker.Worker", master_url,
              "--host", "127.0.0.1", "--port", str(ports["worker"]),
              "--webui-port", str(ports["worker_ui"]), "--cores", "2", "--memory", "2g",
              "--work-dir", str(tmp / "work"), "--properties-file", str(props))
        wait_for("worker", lambda: status().get("aliveworkers") == 1, procs=procs)
        yield master_url, script
    finally:
        for proc in procs:  # executors and Python workers are in the Worker's group
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
