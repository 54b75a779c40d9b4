"""A real ``redis-server`` for tests (the class lives in ``gateway/dev/redis_server.py``,
shared with ``join-gateway dev``): without the binary a test skips with a reason, or fails
under CI (``.ci/run`` installs it)."""

from __future__ import annotations

from pathlib import Path

from gateway.dev.redis_server import RedisServer as _DevRedisServer
from tests.support.binaries import require_binary

__all__ = ["RedisServer", "redis_binary_or_skip"]


def redis_binary_or_skip() -> str:
    # A skip on a developer's machine without redis-server; a failure under CI.
    return require_binary("redis-server")


class RedisServer(_DevRedisServer):
    def __init__(
        self, workdir: Path, *, binary: str | None = None, startup_timeout: float = 10.0
    ) -> None:
        super().__init__(
            workdir, binary=binary or redis_binary_or_skip(), startup_timeout=startup_timeout
        )
