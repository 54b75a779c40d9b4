"""Several worker processes on one port (uvicorn's multiprocess supervisor, DESIGN §6).

The parent binds every listener once (``SO_REUSEPORT`` set, so a second replica or a
rolling restart on the same host can bind beside it), then forks the workers onto those
sockets: every worker accepts from the same queue, so a worker that stops never strands
connections queued for it. The parent runs no event loop and does no request work:

* a worker that dies is replaced (with a short back-off if they keep dying);
* SIGTERM/SIGINT are forwarded; each worker drains (unready, stop accepting, a short
  grace for connections without a complete request, in-flight joins finished within
  ``shutdown_timeout_seconds``); the parent stops the kernel listening on the shared
  sockets (``shutdown``: a worker's ``close`` would leave them listening through the
  parent's descriptor); stragglers are killed after the drain time; a second signal
  kills at once;
* SIGHUP is forwarded: each worker re-reads its token files.

Signal handlers only record the signal; the loop acts on it, woken at once through
``signal.set_wakeup_fd``.

Prometheus multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is created fresh by the parent
before anything imports ``prometheus_client`` (the value class is chosen at import), so
``/metrics`` from any worker sums every worker's counters; a dead worker's live gauges
are dropped with ``mark_process_dead``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.http.listener import stop_listening

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
    drain_delay: float = 0.0,
    metrics_dir: Path | None = None,
) -> int:
    """Fork ``workers`` processes running ``worker_main(sockets)``; return the exit code.

    On SIGTERM/SIGINT the workers get SIGTERM at once (they turn unready) and, after
    ``drain_delay`` seconds, the parent stops the kernel listening on every socket — for
    all processes, since they share them (``gateway.http.listener``) — so new connections
    are refused while the workers finish what they accepted. Workers still running
    ``drain_delay + shutdown_timeout + 5`` seconds after the signal are killed.
    """
    children: dict[int, int] = {}  # pid -> slot
    received: list[int] = []  # signals, in order; the handler only records them
    restarts: list[float] = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
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

    def record(sig: int, _frame: object) -> None:
        received.append(sig)

    # The wake-up descriptor makes a signal end the parent's wait at once (select below).
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, record)
    for slot in range(workers):
        spawn(slot)

    stop_signals = 0
    listening = True
    stop_listening_at: float | None = None
    deadline: float | None = None
    exit_code = 0
    while children:
        now = time.monotonic()
        while received:
            got = received.pop(0)
            if got == signal.SIGHUP:
                for pid in children:
                    _kill(pid, signal.SIGHUP)
            elif got in (signal.SIGTERM, signal.SIGINT):
                stop_signals += 1
                if stop_signals == 1:
                    stop_listening_at = now + drain_delay
                    deadline = now + drain_delay + shutdown_timeout + 5.0
                for pid in children:
                    _kill(pid, signal.SIGKILL if stop_signals > 1 else signal.SIGTERM)
        if listening and stop_listening_at is not None and now >= stop_listening_at:
            listening = False
            for sock in sockets:
                stop_listening(sock)
            log.info("listeners stopped; waiting for the workers to drain")
        if deadline is not None and now > deadline:
            log.warning("workers still running after the drain time: killing them")
            for pid in children:
                _kill(pid, signal.SIGKILL)
            deadline = None  # killed: just reap them
        reaped = False
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            reaped = True
            slot = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if metrics_dir is not None and not stop_signals:
                # Not when stopping: the directory is removed anyway, and importing
                # prometheus_client here would cost the drain a few hundred ms.
                _mark_dead(pid)
            if stop_signals:
                exit_code = max(exit_code, code if code > 0 else 0)
                log.info("worker %s (pid %s) exited with %s", slot, pid, code)
                continue
            log.error("worker %s (pid %s) died with %s; replacing it", slot, pid, code)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < _RESTART_WINDOW] + [now]
            if len(restarts) > _MAX_RESTARTS_IN_WINDOW:
                time.sleep(1.0)  # crash loop: do not burn the CPU the live workers need
            spawn(slot)
        if children and not reaped and not received:
            _wait_for_signal(
                wake_r, _next_timeout(stop_listening_at if listening else None, deadline)
            )
    signal.set_wakeup_fd(-1)
    os.close(wake_r)
    os.close(wake_w)
    for sock in sockets:
        sock.close()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return exit_code


def _next_timeout(*moments: float | None) -> float:
    """Seconds until the next timed step (at most 1 s: a lost wake-up costs little)."""
    now = time.monotonic()
    return max(0.0, min([1.0, *(m - now for m in moments if m is not None)]))


def _wait_for_signal(wake_r: int, timeout: float) -> None:
    select.select([wake_r], [], [], timeout)
    with contextlib.suppress(BlockingIOError):
        while os.read(wake_r, 512):
            pass


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone: nothing to signal
        os.kill(pid, sig)


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
