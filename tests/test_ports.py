"""Ports for self-started servers: never the same twice, never from the kernel's ephemeral range (a CI run once
gave one server the same port for HTTP and metrics)."""

from __future__ import annotations

import socket

from stepaudio2.serving.ports import _ephemeral_start, unused_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = [unused_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(p < _ephemeral_start() for p in ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_another_socket_holds_is_skipped(monkeypatch) -> None:
    from stepaudio2.serving import ports

    free = [p for p in range(20000, 20400) if p not in ports._handed_out and ports._bindable(p, "127.0.0.1")]
    with socket.socket() as held:
        held.bind(("127.0.0.1", free[0]))
        held.listen()
        picks = iter([free[0], free[0], free[1]])  # the held port comes up first, twice
        monkeypatch.setattr(ports._choice, "randrange", lambda lo, hi: next(picks))
        assert unused_port() == free[1]
