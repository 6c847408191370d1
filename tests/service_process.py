"""Start `python -m ranking_service` on a free 127.0.0.1 port and wait until /health answers;
stop it and get what it wrote to stderr."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def start_service(repo, model, *args: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """(process, base URL); the process leads its own group, so os.killpg stops it all.
    Its stderr goes to a temporary file (`stop_service` returns it), not a pipe that a
    chatty service could fill."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ranking_service", "--repo", str(repo), "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=err)
    proc.stderr_file = err  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            assert proc.poll() is None, _stderr(proc)[-2000:]
            assert time.monotonic() < deadline, "service did not start"
            time.sleep(0.3)


def stop_service(proc: subprocess.Popen) -> str:
    """Stop the service (every worker of it) and return what it wrote to stderr."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return _stderr(proc)


def _stderr(proc: subprocess.Popen) -> str:
    err = getattr(proc, "stderr_file", None)
    if err is None:
        return ""
    err.seek(0)
    return err.read().decode(errors="replace")
