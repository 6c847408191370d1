"""Peak resident memory of a benchmark's process tree, sampled in a thread."""
from __future__ import annotations

import threading
import time

import psutil


class RssSampler:
    """Peak RSS of this process and of each descendant (the JVM, Python workers), by pid,
    sampled every `interval` seconds while the `with` block runs. `names` keeps each
    process's latest name: spark-submit starts as a shell script and execs into java."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self.names = interval, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            for p in [me, *me.children(recursive=True)]:
                try:
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.memory_info().rss)
                    self.names[p.pid] = p.name()
                except psutil.Error:
                    pass
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
