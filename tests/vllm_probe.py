"""The real vLLM engine as a plugin that reports on itself, and what vLLM leaves in /proc.

`ProbedVLLM` ("tests.vllm_probe:ProbedVLLM") is udfs.engines.vllm.VLLMEngine unchanged, plus:
after building its `vllm.LLM` it writes `engine-<pid>.json` under `record_dir` with the
Python worker's pid, the task's GPU addresses (TaskContext), the worker's
CUDA_VISIBLE_DEVICES, and each VLLM::EngineCore child with the CUDA_VISIBLE_DEVICES read
from its /proc/<pid>/environ (what the process that would open the GPU was started with).
It also records when it was built and how long that took.
With `hold`, its first classify call scores the batch, writes `held-<pid>` and waits for a
`release` file before returning: the task is then mid-annotation (the engine has run, the
batch is not done), so a test can kill the worker or the engine core at that point.

The /proc helpers find vLLM's processes (cmdline "VLLM::EngineCore", "VLLM::Worker", ...) that
carry a marker variable in their environment, so a test sees its own job's processes only,
whatever else runs vLLM on the machine.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from udfs.engines.vllm import VLLMEngine

MARKER = "ANNOFEAT_TEST_JOB"  # environment variable naming the test job a process belongs to


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    """The environment `pid` was started with (/proc/<pid>/environ); {} if it is gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1)
                for item in raw.split(b"\0") if b"=" in item)


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def vllm_processes(job: str) -> dict[int, str]:
    """{pid: cmdline} of live vLLM processes (VLLM::*) started for test job `job`."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            line = cmdline(pid)
            if line.startswith("VLLM::") and alive(pid) and environ(pid).get(MARKER) == job:
                found[pid] = line
    return found


def wait_until(check, timeout: float, interval: float = 0.5):
    """check()'s first truthy value within `timeout` seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def records(record_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(record_dir).glob("engine-*.json"))]


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def _worker_environment(worker=None) -> dict:
    """Run inside vLLM's model worker (collective_rpc): its pid and, live, the variable CUDA
    reads when that process opens the GPU."""
    return {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class ProbedVLLM(VLLMEngine):
    def __init__(self, record_dir: str, hold: bool = False, hold_timeout: float = 600,
                 **options):
        from udfs.worker import task_gpu_addresses

        started = time.time()
        # collective_rpc of a function (below) needs vLLM's pickle fallback: a test probe only
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        super().__init__(**options)
        self.record_dir, self.hold, self.hold_timeout = Path(record_dir), hold, hold_timeout
        self._held = False
        cores = [p for p in _children(os.getpid()) if cmdline(p).startswith("VLLM::EngineCore")]
        record = {
            "pid": os.getpid(), "task_gpu": task_gpu_addresses(),
            "built_at": time.time(), "build_seconds": round(time.time() - started, 1),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cores": [{"pid": p, "cmdline": cmdline(p),
                       "cuda_visible_devices": environ(p).get("CUDA_VISIBLE_DEVICES")}
                      for p in cores],
            # /proc/<pid>/environ of a renamed process (setproctitle, "VLLM::...") may be
            # overwritten by its title; the model worker answers for itself instead
            "model_workers": self.llm.collective_rpc(_worker_environment),
        }
        tmp = self.record_dir / f".engine-{os.getpid()}.json"
        tmp.write_text(json.dumps(record))
        tmp.rename(self.record_dir / f"engine-{os.getpid()}.json")

    def classify(self, texts, attribute):
        out = super().classify(texts, attribute)
        if self.hold and not self._held:
            self._held = True
            (self.record_dir / f"held-{os.getpid()}").write_text(str(len(texts)))
            release = self.record_dir / "release"
            if not wait_until(release.exists, self.hold_timeout):
                raise TimeoutError(f"{release} never appeared")
        return out
