"""Suite-wide guard: no log line, in any test, carries a secret.

Every record logged during every test (message and traceback, at every level) is
scanned for access tokens (JWTs) and private keys; a test whose code under test logged
one fails. Joins happen all over the suite — the end-to-end tables, the faults, the
hostile corpus, the demo-sized fleets — so this is the "whole suite's joins with log
capture" check. Gateways run as subprocesses are scanned the same way when they stop
(tests/support/gateway_proc.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

from tests.support.minter import TokenMinter

# A JWT: three base64url parts, the first two JSON objects ("eyJ" is base64 of '{"').
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")
PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z ]+ )?PRIVATE KEY-----")


def find_secrets(text: str) -> list[str]:
    found = [m.group(0)[:24] + "…" for m in JWT.finditer(text)]
    found += [m.group(0) for m in PRIVATE_KEY.finditer(text)]
    return found


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            text = str(record.msg)
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        for secret in find_secrets(text):
            self.leaks.append(f"{record.name}: {secret}")


@pytest.fixture(autouse=True)
def no_secrets_in_logs() -> Iterator[None]:
    root = logging.getLogger()
    collector = _Collector()
    old_level = root.level
    root.addHandler(collector)
    root.setLevel(logging.DEBUG)  # scan what DEBUG would show too
    try:
        yield
    finally:
        root.removeHandler(collector)
        root.setLevel(old_level)
    assert not collector.leaks, f"secrets in log records: {collector.leaks[:5]}"


# --- shared fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def minter() -> TokenMinter:
    """The one access-token minter (tenant ``tests.support.ids.TENANT``, kid ``k1``)."""
    return TokenMinter()
