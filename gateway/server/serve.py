"""Listeners, TLS and the process lifecycle (aiohttp's runner/site split, uvicorn's shutdown).

``GatewayServer`` owns one app: ``start()`` builds dependencies (unless given), sets up
an ``AppRunner`` and one accept loop per listener (``gateway.http.listener``: the
connection cap acts before TLS); ``stop()`` drains: readiness turns unready, the listeners
stop accepting (the kernel refuses new connections), connections without a complete
request get a short grace, in-flight joins finish within ``shutdown_timeout_seconds``,
then resources close in reverse order. ``run(config)`` is the ``serve`` command:
signal handlers only set flags; the main task does the work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from aiohttp import web

from gateway.core.audit import Auditor
from gateway.core.clock import Clock, SystemClock
from gateway.core.config import Config, ConfigError, check_single_use, split_hostport
from gateway.core.metrics import Metrics
from gateway.core.runtime import tune_gc
from gateway.core.tlsutil import server_ssl_context
from gateway.http.app import make_app
from gateway.http.framing import Connections, handler_factory
from gateway.http.keys import RuntimeState
from gateway.http.listener import Listener
from gateway.http.proxy import TrustedProxies
from gateway.http.proxyproto import serve_proxy_protocol
from gateway.join.deps import production_deps
from gateway.join.pipeline import JoinDeps
from gateway.server.supervisor import supervise

__all__ = ["GatewayServer", "bind_socket", "run"]

log = logging.getLogger(__name__)


def bind_socket(address: str, *, reuse_port: bool = False, backlog: int = 1024) -> socket.socket:
    host, port = split_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class BoundListener:
    address: str
    port: int
    proxy_protocol: bool


class GatewayServer:
    """Parameters:

    * config — the frozen config.
    * deps — injected dependencies; ``None`` builds the production ones from config.
    * clock — injected; defaults to the system clock.
    * sockets — pre-bound listening sockets (a supervisor's), one per listener.
    """

    def __init__(
        self,
        config: Config,
        *,
        deps: JoinDeps | None = None,
        clock: Clock | None = None,
        sockets: list[socket.socket] | None = None,
        metrics_socket: socket.socket | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self._deps = deps
        self._clock = clock or SystemClock()
        self._sockets = sockets
        self._metrics_socket = metrics_socket
        self._metrics = metrics or Metrics()
        self.state = RuntimeState()
        self._stack = AsyncExitStack()
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.listeners: list[BoundListener] = []
        self._accepting: list[Listener] = []
        self.connections: Connections | None = None
        self.metrics_port: int | None = None

    @property
    def deps(self) -> JoinDeps:
        assert self._deps is not None, "start() first"
        return self._deps

    @property
    def metrics(self) -> Metrics:
        """This process's metrics (what ``/metrics`` serves)."""
        return self._metrics

    def url(self, index: int = 0) -> str:
        listener = self.listeners[index]
        host, _ = split_hostport(listener.address)
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{listener.port}"

    def server_ssl_context(self) -> ssl.SSLContext:
        tls = self.config.tls
        ctx = server_ssl_context(self.config.path(tls.cert_file), self.config.path(tls.key_file))
        if tls.session_tickets:
            ctx.options &= ~ssl.OP_NO_TICKET
        return ctx

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        if self._deps is None:
            self._deps = await self._stack.enter_async_context(
                production_deps(self.config, clock=self._clock, metrics=self._metrics)
            )
        app = make_app(
            self.config,
            self._deps,
            metrics=self._metrics,
            state=self.state,
            auditor=Auditor(clock=self._clock),
        )
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=self.config.shutdown_timeout_seconds,
            handle_signals=False,
        )
        await runner.setup()
        self._runner = runner
        self._stack.push_async_callback(runner.cleanup)
        ctx = self.server_ssl_context()
        assert runner.server is not None
        limits = self.config.limits
        self.connections = Connections(
            max_connections=limits.max_connections,
            on_refused=self._metrics.connections_refused.labels(reason="over_cap").inc,
        )
        # Our handler renders HTTP framing errors as JSON with a code, times every
        # request's headers and keeps each connection's phase for the drain; the runner's
        # Server stays the connection manager, so runner.cleanup() still drains them all.
        # TCP keep-alive is on every connection all the same: the listeners' sockets
        # carry SO_KEEPALIVE, which accepted connections inherit (listener.py).
        factory = handler_factory(
            runner.server,
            access_log=None,
            tcp_keepalive=False,
            header_timeout=limits.header_read_timeout_seconds,
            keepalive_timeout=limits.keepalive_timeout_seconds,
            connections=self.connections,
        )
        # Sockets we bound ourselves are ours to stop listening on; a supervisor's are
        # shared with the other workers, and the supervisor stops them (see listener.py).
        owns = self._sockets is None
        for i, listener in enumerate(self.config.listeners):
            sock = self._sockets[i] if self._sockets is not None else bind_socket(listener.address)
            accepting: Listener
            if listener.proxy_protocol:
                # The PROXY header is read before TLS, from trusted proxies only.
                accepting = await serve_proxy_protocol(
                    sock,
                    handler_factory=factory,
                    ssl_context=ctx,
                    trusted=TrustedProxies(self.config.proxy.trusted_cidrs),
                    ssl_handshake_timeout=limits.header_read_timeout_seconds,
                    admission=self.connections,
                    owns_socket=owns,
                )
            else:
                accepting = Listener(
                    sock,
                    handler_factory=factory,
                    ssl_context=ctx,
                    ssl_handshake_timeout=limits.header_read_timeout_seconds,
                    admission=self.connections,
                    owns_socket=owns,
                )
                accepting.start()
            # Closed before runner.cleanup() (LIFO): handshakes not done by then are
            # dropped, then the runner drains the connections it has.
            self._stack.push_async_callback(accepting.aclose)
            self._accepting.append(accepting)
            self.listeners.append(
                BoundListener(listener.address, sock.getsockname()[1], listener.proxy_protocol)
            )
        if self.config.metrics.listen:
            await self._start_metrics_listener(app)
        self.state.checks["started"] = True
        log.info(
            "gateway listening on %s", ", ".join(self.url(i) for i in range(len(self.listeners)))
        )

    async def _start_metrics_listener(self, main_app: web.Application) -> None:
        metrics = self._metrics

        async def handler(request: web.Request) -> web.Response:
            return web.Response(
                body=metrics.exposition(),
                headers={"Content-Type": "text/plain; version=0.0.4"},
            )

        mapp = web.Application()
        mapp.router.add_get("/metrics", handler)
        runner = web.AppRunner(mapp, access_log=None, handle_signals=False)
        await runner.setup()
        self._metrics_runner = runner
        self._stack.push_async_callback(runner.cleanup)
        ctx = None
        if self.config.metrics.client_ca_file:
            ctx = self.server_ssl_context()
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(
                cafile=str(self.config.path(self.config.metrics.client_ca_file))
            )
        sock = self._metrics_socket or bind_socket(self.config.metrics.listen)
        await web.SockSite(runner, sock, ssl_context=ctx).start()
        self.metrics_port = sock.getsockname()[1]

    def reload(self) -> bool:
        """SIGHUP: re-read the token files and the challenge keys file. Each holder swaps
        whole or, when its file is bad, keeps its previous version (and says why)."""
        return all([holder.reload() for holder in self.deps.reloadables()])

    async def stop(self) -> None:
        """Drain and close: unready; stop accepting; connections without a complete
        request get ``shutdown_grace_seconds`` to send one (answered 503 shutting_down)
        and are closed; requests already read finish within ``shutdown_timeout_seconds``;
        then resources close in reverse order."""
        self.state.draining = True
        for accepting in self._accepting:
            accepting.stop_accepting()
        if self.connections is not None:
            await self.connections.drain(self.config.shutdown_grace_seconds)
        await self._stack.aclose()

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        urls = [self.url(i) for i in range(len(self.listeners))]
        return f"<GatewayServer {urls} draining={self.state.draining}>"


def bind_all(config: Config) -> tuple[list[socket.socket], socket.socket | None]:
    """Every listening socket of a config, bound once (by the supervisor, before forking)."""
    listeners = [bind_socket(lst.address, reuse_port=True) for lst in config.listeners]
    metrics = bind_socket(config.metrics.listen, reuse_port=True) if config.metrics.listen else None
    return listeners, metrics


async def _serve(
    config: Config,
    sockets: list[socket.socket] | None = None,
    metrics_socket: socket.socket | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_stop() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting now")
            raise SystemExit(1)
        stop.set()

    reload_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)

    server = GatewayServer(config, sockets=sockets, metrics_socket=metrics_socket)
    try:
        await server.start()
    except (OSError, ConfigError, ValueError) as exc:
        log.error("startup failed: %s", exc)
        return 3
    tune_gc()  # started: freeze what exists, collect the young generation less often
    try:
        while not stop.is_set():
            waiter = asyncio.ensure_future(reload_requested.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for t in (waiter, stopper):
                t.cancel()
            if reload_requested.is_set():
                reload_requested.clear()
                server.reload()
    finally:
        # Unready first, so load balancers stop sending before the listeners close.
        server.state.draining = True
        if config.drain_delay_seconds > 0:
            log.info("unready; still serving for %ss", config.drain_delay_seconds)
            await asyncio.sleep(config.drain_delay_seconds)
        log.info("draining (up to %ss)", config.shutdown_timeout_seconds)
        await server.stop()
    return 0


def _run_loop(
    config: Config, sockets: list[socket.socket] | None, msock: socket.socket | None
) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay runnable without
        return asyncio.run(_serve(config, sockets, msock))
    return int(uvloop.run(_serve(config, sockets, msock)))


def run(config: Config, *, metrics_dir: Path | None = None) -> NoReturn:
    """The ``serve`` command: one process, or a supervisor and ``config.workers`` workers.

    Exits the process with the exit code. By then the drain has closed every resource
    explicitly, so the interpreter's teardown — collecting every module's objects, most
    of a second of CPU on a busy host and longer than the drain itself — is skipped.
    """
    code = _run(config, metrics_dir)
    if sys.getprofile() is not None:
        # Under ``python -m cProfile`` (the benchmark's --profile-gateway): its stats are
        # written when SystemExit unwinds to it; os._exit would lose them. (cProfile runs
        # as ``__main__`` there, so "cProfile" is not in sys.modules.)
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(config: Config, metrics_dir: Path | None) -> int:
    if config.workers == 1:
        return _run_loop(config, None, None)
    try:
        check_single_use(config, "workers")  # a Config built in code skips load_config
    except ConfigError as exc:
        log.error("startup failed: %s", exc)
        return 3
    try:
        listeners, msock = bind_all(config)
    except OSError as exc:
        log.error("startup failed: cannot bind: %s", exc)
        return 3
    sockets = listeners + ([msock] if msock else [])

    def worker_main(socks: list[socket.socket]) -> int:
        n = len(config.listeners)
        return _run_loop(config, socks[:n], socks[n] if len(socks) > n else None)

    return supervise(
        workers=config.workers,
        sockets=sockets,
        worker_main=worker_main,
        drain_delay=config.drain_delay_seconds,
        shutdown_timeout=config.shutdown_timeout_seconds + config.shutdown_grace_seconds,
        metrics_dir=metrics_dir,
    )
