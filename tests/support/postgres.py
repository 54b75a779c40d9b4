"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` in a temp dir, on a
free loopback port, as ``redis_server.py`` does for Redis.

Tests never touch a PostgreSQL the machine may run (5432): each session gets its own
cluster, and each test its own database in it (``create_database``). Debian keeps the
binaries in ``/usr/lib/postgresql/<version>/bin`` (not on ``PATH``); they are found
there too. ``initdb`` refuses to run as root, so under root (CI) the cluster runs as the
unprivileged ``postgres`` user (or ``nobody``) through ``runuser``. Without the binaries
the tests skip with a reason, or fail under CI (``.ci/run`` installs ``postgresql``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

from tests.support.binaries import require_binary
from tests.support.gateway_proc import free_port

__all__ = ["PostgresCluster", "postgres_bin_dir"]


def postgres_bin_dir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (skip, or fail under CI, if none)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if versions:
        return Path(versions[-1]).parent
    require_binary("initdb")  # skips, or fails under CI, with the install hint
    raise AssertionError("unreachable")  # pragma: no cover


def _unprivileged_user() -> str | None:
    """Who runs the cluster: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) exists")


class PostgresCluster:
    """Parameters: ``bin_dir`` — where ``initdb``/``pg_ctl`` live (default: found).

    ``start()`` creates the cluster in a fresh temp dir and starts it; ``stop()`` stops
    it and removes the directory. ``url(dbname)`` is a ``postgresql://`` URL (trust
    authentication: the cluster only listens on 127.0.0.1, for the test's lifetime).
    """

    def __init__(self, bin_dir: Path | None = None) -> None:
        self._bin = bin_dir or postgres_bin_dir()
        self._user = _unprivileged_user()
        self._dir: Path | None = None
        self.port: int | None = None

    def _cmd(self, *args: str) -> list[str]:
        if self._user is None:
            return list(args)
        return ["runuser", "-u", self._user, "--", *args]

    def _run(self, *args: str) -> None:
        proc = subprocess.run(
            self._cmd(*args), capture_output=True, text=True, check=False, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {proc.stderr[-800:]}")

    def start(self) -> None:
        # Not under pytest's tmp_path: its parents are 0700 root, which the cluster's
        # user could not enter.
        self._dir = Path(tempfile.mkdtemp(prefix="jg-postgres-"))
        data = self._dir / "data"
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self._dir, entry.pw_uid, entry.pw_gid)
        self._run(
            str(self._bin / "initdb"),
            "-D", str(data),
            "-U", "postgres",
            "--auth=trust",
            "--no-sync",
            "-E", "UTF8",
            "--locale=C",
        )  # fmt: skip
        last = ""
        for _ in range(5):  # the free port may be taken between probing and binding
            port = free_port()
            try:
                self._pg_ctl_start(port)
            except RuntimeError as exc:
                last = f"{exc}\n{self.log()[-800:]}"
                continue
            self.port = port
            return
        self._cleanup()
        raise RuntimeError(f"could not start PostgreSQL: {last}")

    def _pg_ctl_start(self, port: int) -> None:
        assert self._dir is not None
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={port} "
            f"-c unix_socket_directories={self._dir} -c fsync=off "
            "-c max_connections=60"
        )
        self._run(
            str(self._bin / "pg_ctl"),
            "start", "-w", "-t", "60",
            "-D", str(self._dir / "data"),
            "-l", str(self._dir / "postgres.log"),
            "-o", opts,
        )  # fmt: skip

    def stop_server(self) -> None:
        """Stop the server but keep its data and port (see :meth:`start_server`)."""
        assert self._dir is not None
        self._run(
            str(self._bin / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self._dir / "data")
        )

    def start_server(self) -> None:
        """Start the stopped server again, on the same port, with the same data."""
        assert self.port is not None
        self._pg_ctl_start(self.port)

    def log(self) -> str:
        path = self._dir / "postgres.log" if self._dir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def url(self, dbname: str = "postgres") -> str:
        if self.port is None:
            raise RuntimeError("cluster not started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    async def create_database(self) -> str:
        """A fresh, empty database for one test; returns its URL."""
        import asyncpg

        name = "t_" + uuid.uuid4().hex[:12]
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)

    def stop(self) -> None:
        if self._dir is not None and self.port is not None:
            subprocess.run(
                self._cmd(
                    str(self._bin / "pg_ctl"), "stop", "-w", "-m", "fast", "-D",
                    str(self._dir / "data"),
                ),
                capture_output=True,
                check=False,
                timeout=60,
            )  # fmt: skip
        self.port = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PostgresCluster port={self.port}>"
