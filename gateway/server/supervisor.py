"""Several worker processes on one port (uvicorn's multiprocess supervisor, DESIGN §6).

The parent binds every listener once (``SO_REUSEPORT`` set, so a second replica or a
rolling restart on the same host can bind beside it), then forks the workers onto those
sockets: every worker accepts from the same queue, so a worker that stops never strands
connections queued for it. The parent runs no event loop and does no request work:

* a worker that dies is replaced (with a short back-off if they keep dying);
* SIGTERM/SIGINT are forwarded; each worker drains (unready, stop accepting, finish
  in-flight joins within ``shutdown_timeout_seconds``); stragglers are killed after that;
  a second signal kills at once;
* SIGHUP is forwarded: each worker re-reads its token files.

Prometheus multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is created fresh by the parent
before anything imports ``prometheus_client`` (the value class is chosen at import), so
``/metrics`` from any worker sums every worker's counters; a dead worker's live gauges
are dropped with ``mark_process_dead``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["prepare_multiprocess_metrics", "supervise"]

log = logging.getLogger(__name__)

_RESTART_WINDOW = 10.0
_MAX_RESTARTS_IN_WINDOW = 10


def prepare_multiprocess_metrics() -> Path:
    """Point prometheus_client at a fresh shared directory. Call before importing it."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before multiprocess mode was set up")
    existing = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if existing:
        path = Path(existing)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="join-gateway-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def supervise(
    *,
    workers: int,
    sockets: list[socket.socket],
    worker_main: Callable[[list[socket.socket]], int],
    shutdown_timeout: float,
    metrics_dir: Path | None = None,
) -> int:
    """Fork ``workers`` processes running ``worker_main(sockets)``; return the exit code."""
    children: dict[int, int] = {}  # pid -> slot
    stopping = False
    signals_seen = 0
    restarts: list[float] = []

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = worker_main(sockets)
            except BaseException:  # the worker must never return into the parent's loop
                log.exception("worker %s crashed", slot)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = slot
        log.info("worker %s started (pid %s)", slot, pid)

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping, signals_seen
        if sig == signal.SIGHUP:
            for pid in children:
                _kill(pid, signal.SIGHUP)
            return
        signals_seen += 1
        stopping = True
        for pid in children:
            _kill(pid, signal.SIGKILL if signals_seen > 1 else signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for slot in range(workers):
        spawn(slot)

    deadline: float | None = None
    exit_code = 0
    while children:
        if stopping and deadline is None:
            deadline = time.monotonic() + shutdown_timeout + 5.0
        if deadline is not None and time.monotonic() > deadline:
            log.warning("workers still running after the drain time: killing them")
            for pid in children:
                _kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 3600  # killed: just reap them
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.1)  # signal handlers run between sleeps
            continue
        slot = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if metrics_dir is not None:
            _mark_dead(pid)
        if stopping:
            exit_code = max(exit_code, code if code > 0 else 0)
            log.info("worker %s (pid %s) exited with %s", slot, pid, code)
            continue
        log.error("worker %s (pid %s) died with %s; replacing it", slot, pid, code)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < _RESTART_WINDOW] + [now]
        if len(restarts) > _MAX_RESTARTS_IN_WINDOW:
            time.sleep(1.0)  # crash loop: do not burn the CPU the live workers need
        spawn(slot)
    for sock in sockets:
        sock.close()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return exit_code


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone: nothing to signal
        os.kill(pid, sig)


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
