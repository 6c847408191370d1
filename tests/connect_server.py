"""A real Spark Connect server on a free loopback port (pyspark's own SparkConnectServer,
started as `sbin/start-connect-server.sh --wait` does), for the Connect tests.

Its Python workers run this venv's interpreter *without the project on sys.path*, as a
cluster's would: the udfs package reaches them only as the session artifact that
udfs.register ships, so the tests prove the shipping.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"

# python -m <module> ...: run the module with the project's directory taken off sys.path
HIDE = """import os, runpy, sys
root = os.path.realpath({root!r})
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
args = sys.argv[1:]
while args and args[0].startswith("-") and args[0] != "-m":
    args = args[1:]  # interpreter flags such as -u
if args[:1] != ["-m"]:
    raise SystemExit(f"connect test worker: unexpected arguments {{sys.argv[1:]}}")
sys.argv = [args[1], *args[2:]]
runpy.run_module(args[1], run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_python(folder: Path) -> Path:
    """An interpreter for the server's workers: this venv's, minus the project."""
    (folder / "hide_project.py").write_text(HIDE.format(root=str(ROOT)))
    wrapper = folder / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{folder / "hide_project.py"}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def start(folder: Path, port: int) -> subprocess.Popen:
    import pyspark

    home = Path(pyspark.__file__).parent
    python = worker_python(folder)
    env = {**os.environ, "SPARK_HOME": str(home), "PYSPARK_PYTHON": str(python),
           "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("PYTHONPATH", None)
    conf = {"spark.connect.grpc.binding.address": "127.0.0.1",
            "spark.connect.grpc.binding.port": str(port),
            "spark.ui.enabled": "false", "spark.python.worker.reuse": "true",
            "spark.sql.session.timeZone": "UTC",
            "spark.executorEnv.HF_HUB_OFFLINE": "1",
            "spark.executorEnv.TOKENIZERS_PARALLELISM": "false",
            "spark.log.level": "WARN"}
    cmd = [str(home / "bin" / "spark-submit"), "--class", CLASS, "--master", "local[2]",
           "--name", "annofeat-connect-tests"]
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    log = open(folder / "server.log", "w")
    return subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Connect server exited ({proc.returncode}): "
                               f"{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the Connect server did not listen in {timeout} s: "
                       f"{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def connect_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("connect-server")
    port = free_port()
    proc = start(folder, port)
    try:
        wait_ready(proc, port, folder / "server.log")
        yield f"sc://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
