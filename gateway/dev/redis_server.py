"""A private ``redis-server``: loopback, a free port, a temp dir, no persistence.

Used by ``join-gateway dev`` (several gateway workers share their replay store through it)
and by the tests (``tests/support/redis_server.py``). Neither touches a Redis the machine
may run on 6379: each gets its own process. The server can be stopped and started again
*on the same port*, which is how tests check that clients fail fast while Redis is down
and recover, without restarting anything, when it comes back.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from gateway.dev.ports import free_port

__all__ = ["RedisServer", "find_redis_server"]


def find_redis_server() -> str | None:
    """The ``redis-server`` binary on ``PATH`` (Debian: ``/usr/bin``), or None."""
    return shutil.which("redis-server") or (
        "/usr/sbin/redis-server" if Path("/usr/sbin/redis-server").exists() else None
    )


def _ping(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """Parameters:

    * workdir — the server's ``--dir`` and log file location (a pytest ``tmp_path``).
    * binary — path of ``redis-server`` (default: :func:`find_redis_server`).
    * startup_timeout — seconds to wait for the first ``PONG``.
    """

    def __init__(
        self, workdir: Path, *, binary: str | None = None, startup_timeout: float = 10.0
    ) -> None:
        self._workdir = workdir
        found = binary or find_redis_server()
        if found is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self._binary = found
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("redis server was never started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start on a fresh free port, or on the previous port after :meth:`stop`."""
        if self.running:
            raise RuntimeError("redis server already running")
        if self.port is not None:
            self._spawn(self.port)
            return
        # The free port may be taken between probing and binding; try a few.
        last: Exception | None = None
        for _ in range(5):
            port = free_port()
            try:
                self._spawn(port)
            except RuntimeError as exc:
                last = exc
                continue
            self.port = port
            return
        raise RuntimeError(f"could not start redis-server: {last}")

    def _spawn(self, port: int) -> None:
        self._workdir.mkdir(parents=True, exist_ok=True)
        log_file = self._workdir / f"redis-{port}.log"
        args = [
            self._binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self._workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(log_file),
        ]  # fmt: skip
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = log_file.read_text(errors="replace") if log_file.exists() else ""
                raise RuntimeError(f"redis-server exited {proc.returncode}: {log[-500:]}")
            if _ping(port, 0.2):
                self._proc = proc
                return
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise RuntimeError(f"redis-server did not answer PING on port {port}")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 5 s); the port is kept."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
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
        return f"<RedisServer port={self.port} running={self.running}>"
