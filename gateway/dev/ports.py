"""Loopback ports for the development stack, the benchmarks and the tests."""

from __future__ import annotations

import socket

__all__ = ["free_port"]

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, and never handed out before by this process.

    The kernel may well pick the same free port twice in a row: a gateway given it for its
    listener and for its metrics listener binds both with ``SO_REUSEPORT`` (the config
    check refuses that now), and its connections were split between HTTPS and plain HTTP
    (a test once failed so: every TLS client that landed on ``/metrics`` was refused)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
