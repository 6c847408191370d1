"""A real redis-server on a free loopback port, for the Redis online-store tests.

Use it with `from tests.redis_server import redis_server` in a test module (or list
`tests.redis_server` in conftest's pytest_plugins). The Debian `redis-server` binary is
required: `make redis` installs it; without it the fixture fails, it does not skip.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest
import redis


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int

    @property
    def connection_string(self) -> str:
        """The form Feast's Redis online store expects."""
        return f"{self.host}:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir, port: int | None = None) -> tuple[RedisServer, subprocess.Popen]:
    """Start redis-server (no periodic saves) and wait for PING; the caller stops it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; run `make redis` "
                    "(Debian: apt-get install redis-server)")
    log = workdir / "redis.log"
    server = RedisServer("127.0.0.1", port or _free_port())
    proc = subprocess.Popen(
        [binary, "--save", "", "--appendonly", "no", "--port", str(server.port),
         "--bind", server.host, "--dir", str(workdir), "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = server.client()
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not answer PING on port {server.port}:\n"
                            f"{log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
    client.close()
    return server, proc


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server, proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    proc.terminate()
    proc.wait(timeout=15)
