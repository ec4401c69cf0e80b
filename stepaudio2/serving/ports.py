"""Loopback ports for servers that tests and benchmarks start themselves.

Asking the kernel for port 0 and closing the socket again is racy twice over: the kernel may hand the same port
to the next such call (a server then gets one port for both HTTP and metrics and fails with "already in use"),
and any outgoing connection may take it as its ephemeral source port before the server binds it. So ports come
from below the kernel's ephemeral range, which it never assigns on its own, and no port is handed out twice by
one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000  # clear of the well-known and commonly configured service ports
_handed_out: set[int] = set()
_choice = random.Random()  # its own generator: tests that seed `random` must not make every process pick alike


def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def unused_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, outside the ephemeral range and never returned before by this process."""
    top = _ephemeral_start()
    if top - _LOWEST >= 1000:
        for _ in range(200):
            port = _choice.randrange(_LOWEST, top)
            if port not in _handed_out and _bindable(port, host):
                _handed_out.add(port)
                return port
    while True:  # an unusual range: let the kernel choose, still never twice
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
