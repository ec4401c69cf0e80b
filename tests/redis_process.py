"""A real redis-server on a free loopback port for tests (Debian's `redis-server`; `make test` installs it)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from .conftest import require_tool

REDIS_EXTRA = "pip install -e '.[redis]'"
REDIS_SERVER = "make redis-server (Debian's redis-server package)"


class RedisProcess:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = require_tool("redis-server", REDIS_SERVER)  # skip, or under CI fail, naming it
        self.workdir.mkdir(parents=True, exist_ok=True)
        # No persistence: a restart is a Redis that lost its data, like a pod without a volume.
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.1)  # start-up only
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
