"""AuthClient and CircuitBreaker: retries only where safe, a breaker that fails fast.

The upstream here is a scripted aiohttp server behind real mTLS on 127.0.0.1, optionally
behind a TCP proxy that counts accepted connections — so "no connection was attempted"
is observed on the server side, not inferred from the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.core.clock import FixedClock
from gateway.core.config import Config, UpstreamConfig
from gateway.core.errors import Code, GatewayError, Overloaded, UpstreamFailed
from gateway.core.metrics import Metrics
from gateway.core.tlsutil import (
    client_ssl_context,
    generate_ca,
    issue_cert,
    write_pem_files,
)
from gateway.join.deps import auth_client
from gateway.join.forward import AuthClient, BreakerState, CircuitBreaker
from gateway.protocol import HostParams, JoinBlock, RegisterResult, Registration
from tests.support.mtls_site import serve_mtls

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

REG = Registration(
    idempotency_key="Y2hhbGxlbmdlLWNoYWxsZW5nZS0xMjM0",
    token_name="azure-token",
    role="Node",
    client_address="203.0.113.7",
    join=JoinBlock(
        method="azure",
        tenant="44444444-4444-4444-4444-444444444444",
        subscription="11111111-1111-1111-1111-111111111111",
        resource_group="group1",
        vm_id="22222222-2222-2222-2222-222222222222",
        resource_id="/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/"
        "group1/providers/Microsoft.Compute/virtualMachines/web-1",
    ),
    host=HostParams(
        node_name="web-1",
        role="Node",
        public_ssh_key="ssh-ed25519 AAAA",
        public_tls_key="-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n",
        additional_principals=("10.1.2.3",),
        dns_names=("web-1.internal",),
    ),
)

OK_BODY: dict[str, Any] = {
    "host_id": "5f1e0f5c-6d5b-4d0b-9b1e-000000000001",
    "certs": {
        "ssh": "ssh-ed25519-cert-v01@openssh.com AAAA",
        "tls": "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
        "tls_ca_certs": ["-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n"],
        "ssh_ca_keys": ["ssh-ed25519 AAAACA"],
    },
}


# --- wire shapes -----------------------------------------------------------------------


def test_registration_to_json_is_the_wire_body() -> None:
    body = REG.to_json()
    assert set(body) == {
        "idempotency_key",
        "token_name",
        "role",
        "client_address",
        "join",
        "host",
    }
    assert body["join"] == {
        "method": "azure",
        "tenant": REG.join.tenant,
        "subscription": REG.join.subscription,
        "resource_group": "group1",
        "vm_id": REG.join.vm_id,
        "resource_id": REG.join.resource_id,
    }
    assert body["host"]["additional_principals"] == ["10.1.2.3"]
    assert body["host"]["dns_names"] == ["web-1.internal"]
    json.dumps(body)  # serialisable as is


def test_register_result_round_trips_the_certs_shape() -> None:
    result = RegisterResult.from_json(OK_BODY)
    assert result.host_id == OK_BODY["host_id"]
    assert result.to_json() == OK_BODY["certs"]


def _without(path: tuple[str, ...]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(OK_BODY))
    target = body
    for p in path[:-1]:
        target = target[p]
    del target[path[-1]]
    return body


def _with(path: tuple[str, ...], value: object) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(OK_BODY))
    target = body
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return body


@pytest.mark.parametrize(
    "body",
    [
        [],
        _without(("host_id",)),
        _with(("host_id",), 7),
        _without(("certs",)),
        _with(("certs", "ssh"), None),
        _with(("certs", "tls"), ""),
        _with(("certs", "tls_ca_certs"), []),
        _with(("certs", "ssh_ca_keys"), [1]),
    ],
    ids=[
        "a body that is not an object is refused",
        "a body without host_id is refused",
        "a numeric host_id is refused",
        "a body without certs is refused",
        "a null ssh certificate is refused",
        "an empty TLS certificate is refused",
        "an empty CA list is refused",
        "a CA key list with a number is refused",
    ],
)
def test_register_result_from_json_is_strict(body: object) -> None:
    with pytest.raises(ValueError):
        RegisterResult.from_json(body)


# --- circuit breaker state machine ---------------------------------------------------


@dataclass(frozen=True)
class BreakerCase:
    steps: tuple[str, ...]  # fail | ok | acquire | refused | release | +<seconds>
    state: BreakerState
    retry_after: float | None = None


BREAKER_CASES = [
    ("a new breaker is closed", BreakerCase((), BreakerState.CLOSED, 0.0)),
    (
        "four failures leave the circuit closed",
        BreakerCase(("fail",) * 4 + ("acquire",), BreakerState.CLOSED),
    ),
    (
        "five consecutive failures open the circuit for reset_timeout",
        BreakerCase(("fail",) * 5 + ("refused",), BreakerState.OPEN, 10.0),
    ),
    (
        "a success resets the count of consecutive failures",
        BreakerCase(("fail",) * 4 + ("ok",) + ("fail",) * 4, BreakerState.CLOSED),
    ),
    (
        "the remaining open time counts down on the clock",
        BreakerCase(("fail",) * 5 + ("+4", "refused"), BreakerState.OPEN, 6.0),
    ),
    (
        "after reset_timeout the circuit is half-open",
        BreakerCase(("fail",) * 5 + ("+10",), BreakerState.HALF_OPEN),
    ),
    (
        "half-open lets exactly one probe through",
        BreakerCase(("fail",) * 5 + ("+10", "acquire", "refused"), BreakerState.HALF_OPEN),
    ),
    (
        "a successful probe closes the circuit",
        BreakerCase(("fail",) * 5 + ("+10", "acquire", "ok", "acquire"), BreakerState.CLOSED),
    ),
    (
        "a failed probe re-opens the circuit for a full reset_timeout",
        BreakerCase(("fail",) * 5 + ("+10", "acquire", "fail", "refused"), BreakerState.OPEN, 10.0),
    ),
    (
        "a released probe lets the next call probe",
        BreakerCase(
            ("fail",) * 5 + ("+10", "acquire", "release", "acquire", "refused"),
            BreakerState.HALF_OPEN,
        ),
    ),
]


@pytest.mark.parametrize("case", [c for _, c in BREAKER_CASES], ids=[i for i, _ in BREAKER_CASES])
def test_circuit_breaker_state_machine(case: BreakerCase) -> None:
    clock = FixedClock(T0)
    breaker = CircuitBreaker(failure_threshold=5, reset_timeout=10.0, clock=clock)
    for step in case.steps:
        if step == "fail":
            breaker.record_failure()
        elif step == "ok":
            breaker.record_success()
        elif step == "release":
            breaker.release()
        elif step == "acquire":
            breaker.acquire()
        elif step == "refused":
            with pytest.raises(Overloaded) as exc_info:
                breaker.acquire()
            assert exc_info.value.code == Code.UPSTREAM_UNAVAILABLE
            assert exc_info.value.retry_after is not None
            assert exc_info.value.retry_after > 0
        elif step.startswith("+"):
            clock.advance(float(step[1:]))
        else:
            raise AssertionError(step)
    assert breaker.state is case.state
    if case.retry_after is not None:
        assert breaker.retry_after() == pytest.approx(case.retry_after)


@pytest.mark.parametrize(
    "kwargs",
    [{"failure_threshold": 0}, {"reset_timeout": 0.0}],
    ids=["a zero failure threshold is refused", "a zero reset timeout is refused"],
)
def test_circuit_breaker_validates_its_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(clock=FixedClock(T0), **kwargs)


# --- a scripted upstream over mTLS ---------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("forward-pki")
    ca = generate_ca("internal")
    ca_file, _ = write_pem_files(ca, d, "ca")
    sc, sk = write_pem_files(
        issue_cert(ca, common_name="auth", ip_addresses=["127.0.0.1"]), d, "server"
    )
    cc, ck = write_pem_files(
        issue_cert(ca, common_name="gw", server=False, client=True), d, "client"
    )
    other, _ = write_pem_files(generate_ca("other"), d, "other")
    return Pki(ca_file, sc, sk, cc, ck, other)


Action = tuple[Any, ...]  # ("status", code, body, headers) | ("ok",) | ("reset",) | ("sleep", s)


@dataclass
class Upstream:
    """Answers each request with the next scripted action and records the bodies."""

    script: list[Action]
    bodies: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    health_hits: int = 0

    async def health(self, request: web.Request) -> web.StreamResponse:
        self.health_hits += 1
        return web.json_response({"status": "ok"})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        action = self.script.pop(0) if self.script else ("ok",)
        if action[0] == "ok":
            return web.json_response(OK_BODY)
        if action[0] == "status":
            _, code, body, headers = action
            return web.Response(status=code, body=body, headers=headers)
        if action[0] == "reset":
            # Drop the connection before any answer: what a crashing upstream does.
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(0.2)
            return web.Response(status=500)
        if action[0] == "sleep":
            await asyncio.sleep(action[1])
            return web.json_response(OK_BODY)
        raise AssertionError(action)


def _err(status: int, code: str = "x", headers: dict[str, str] | None = None) -> Action:
    body = json.dumps({"error": {"code": code, "message": "m"}}).encode()
    return ("status", status, body, headers or {})


@contextlib.asynccontextmanager
async def run_upstream(pki: Pki, script: list[Action]) -> AsyncIterator[Upstream]:
    up = Upstream(list(script))
    app = web.Application()
    app.router.add_post("/v1/register", up.handle)
    app.router.add_get("/healthz", up.health)
    async with serve_mtls(
        app, cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca_file
    ) as up.url:
        yield up


class CountingProxy:
    """A TCP relay in front of the upstream that counts the connections it accepts."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        for coro in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _client(
    pki: Pki,
    url: str,
    *,
    clock: FixedClock | None = None,
    timeout: float = 5.0,
    retries: int = 2,
    breaker: CircuitBreaker | None = None,
    trust: Path | None = None,
) -> AuthClient:
    ctx = client_ssl_context(
        trust or pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key
    )
    return AuthClient(
        url=url,
        ssl_context=ctx,
        clock=clock or FixedClock(T0),
        timeout=timeout,
        retries=retries,
        breaker=breaker,
        backoff=0.001,
        rng=random.Random(7),
    )


@dataclass(frozen=True)
class RetryCase:
    script: tuple[Action, ...]
    error: type[GatewayError] | None
    code: Code | None
    requests: int
    failures: int
    retry_after: float | None = None
    timeout: float = 5.0


RETRY_CASES = [
    (
        "a 503 then a success is retried and succeeds",
        RetryCase((_err(503), ("ok",)), None, None, 2, 0),
    ),
    (
        "a 502 and a 504 are retried",
        RetryCase((_err(502), _err(504), ("ok",)), None, None, 3, 0),
    ),
    (
        "three 503s exhaust the retries and report the upstream unavailable",
        RetryCase((_err(503),) * 3, Overloaded, Code.UPSTREAM_UNAVAILABLE, 3, 1, 1.0),
    ),
    (
        "a 503 with Retry-After is not retried: the Retry-After is passed on",
        RetryCase(
            (_err(503, headers={"Retry-After": "7"}),),
            Overloaded,
            Code.UPSTREAM_UNAVAILABLE,
            1,
            1,
            7.0,
        ),
    ),
    (
        "a signing backend that is unavailable tells the agent when to come back",
        RetryCase(
            (_err(503, "signing_unavailable", headers={"Retry-After": "44"}),),
            Overloaded,
            Code.UPSTREAM_UNAVAILABLE,
            1,
            1,
            44.0,
        ),
    ),
    (
        "a signing backend's refusal (502 signing_refused) is not retried",
        RetryCase((_err(502, "signing_refused"),), UpstreamFailed, Code.UPSTREAM_FAILED, 1, 1),
    ),
    (
        "a 400 is not retried and does not count against the upstream",
        RetryCase((_err(400, "invalid_request"),), UpstreamFailed, Code.UPSTREAM_FAILED, 1, 0),
    ),
    (
        "a 409 idempotency conflict is not retried",
        RetryCase((_err(409, "idempotency_conflict"),), UpstreamFailed, Code.UPSTREAM_FAILED, 1, 0),
    ),
    (
        "a 500 is not retried but counts as a failure",
        RetryCase((_err(500),), UpstreamFailed, Code.UPSTREAM_FAILED, 1, 1, 1.0),
    ),
    (
        "a 200 with a malformed body is an upstream failure",
        RetryCase(
            (("status", 200, b'{"host_id": 1}', {"Content-Type": "application/json"}),),
            UpstreamFailed,
            Code.UPSTREAM_FAILED,
            1,
            1,
            1.0,
        ),
    ),
    (
        "a 200 that is not JSON is an upstream failure",
        RetryCase((("status", 200, b"<html>", {}),), UpstreamFailed, Code.UPSTREAM_FAILED, 1, 1),
    ),
    (
        "an answer over 1 MiB is refused as an upstream failure",
        RetryCase(
            (("status", 200, b"x" * ((1 << 20) + 10), {}),),
            UpstreamFailed,
            Code.UPSTREAM_FAILED,
            1,
            1,
        ),
    ),
    (
        "a connection reset before the answer is retried",
        RetryCase((("reset",), ("ok",)), None, None, 2, 0),
    ),
    (
        "a timeout is not retried and reports the upstream unavailable",
        RetryCase((("sleep", 1.0),), Overloaded, Code.UPSTREAM_UNAVAILABLE, 1, 1, 1.0, timeout=0.3),
    ),
]


@pytest.mark.parametrize("case", [c for _, c in RETRY_CASES], ids=[i for i, _ in RETRY_CASES])
async def test_register_retries_only_where_safe(pki: Pki, case: RetryCase) -> None:
    async with (
        run_upstream(pki, list(case.script)) as up,
        _client(pki, up.url, timeout=case.timeout) as client,
    ):
        if case.error is None:
            result = await client.register(REG)
            assert result == RegisterResult.from_json(OK_BODY)
        else:
            with pytest.raises(case.error) as exc_info:
                await client.register(REG)
            assert exc_info.value.code == case.code
            if case.retry_after is not None:
                assert exc_info.value.retry_after == case.retry_after
        assert len(up.bodies) == case.requests
        # Every attempt carries the same body, hence the same idempotency key.
        assert all(b == REG.to_json() for b in up.bodies)
        assert client.breaker.consecutive_failures == case.failures


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_connection_refused_is_retried_then_reported_unavailable(pki: Pki) -> None:
    async with _client(pki, f"https://127.0.0.1:{_closed_port()}") as client:
        with pytest.raises(Overloaded) as exc_info:
            await client.register(REG)
    assert exc_info.value.code == Code.UPSTREAM_UNAVAILABLE
    assert exc_info.value.retry_after is not None
    assert client.breaker.consecutive_failures == 1


async def test_an_untrusted_upstream_certificate_fails_without_retrying(pki: Pki) -> None:
    async with (
        run_upstream(pki, []) as up,
        CountingProxy(int(up.url.rsplit(":", 1)[1])) as proxy,
        _client(pki, proxy.url, trust=pki.other_ca_file) as client,
    ):
        with pytest.raises(Overloaded) as exc_info:
            await client.register(REG)
        assert exc_info.value.code == Code.UPSTREAM_UNAVAILABLE
        assert proxy.accepted == 1
        assert up.bodies == []


def _state(breaker: CircuitBreaker) -> BreakerState:
    # A function call, so the type checker does not narrow the property between asserts.
    return breaker.state


async def test_an_open_circuit_fails_fast_without_any_connection(pki: Pki) -> None:
    clock = FixedClock(T0)
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=10.0, clock=clock)
    async with (
        run_upstream(pki, [_err(500), _err(500)]) as up,
        CountingProxy(int(up.url.rsplit(":", 1)[1])) as proxy,
    ):
        async with _client(pki, proxy.url, clock=clock, breaker=breaker) as client:
            for _ in range(2):
                with pytest.raises(UpstreamFailed):
                    await client.register(REG)
            assert _state(breaker) is BreakerState.OPEN
            accepted, requests = proxy.accepted, len(up.bodies)
            clock.advance(3)
            with pytest.raises(Overloaded) as exc_info:
                await client.register(REG)
            assert exc_info.value.code == Code.UPSTREAM_UNAVAILABLE
            assert exc_info.value.retry_after == pytest.approx(7.0)
            assert len(up.bodies) == requests
        # A fresh client (no pooled connection to reuse) sharing the open breaker: any I/O
        # would need a new connection, and the proxy sees none.
        async with _client(pki, proxy.url, clock=clock, breaker=breaker) as fresh:
            with pytest.raises(Overloaded):
                await fresh.register(REG)
            assert proxy.accepted == accepted
            assert len(up.bodies) == requests
            # After reset_timeout one probe goes through and, succeeding, closes the circuit.
            clock.advance(7)
            assert _state(breaker) is BreakerState.HALF_OPEN
            result = await fresh.register(REG)
            assert result.host_id == OK_BODY["host_id"]
            assert _state(breaker) is BreakerState.CLOSED
            assert len(up.bodies) == requests + 1


async def test_concurrent_calls_share_one_pool(pki: Pki) -> None:
    async with (
        run_upstream(pki, []) as up,
        CountingProxy(int(up.url.rsplit(":", 1)[1])) as proxy,
    ):
        ctx = client_ssl_context(pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key)
        async with AuthClient(
            url=proxy.url, ssl_context=ctx, clock=FixedClock(T0), max_connections=2
        ) as client:
            results = await asyncio.gather(*(client.register(REG) for _ in range(10)))
        assert len(results) == 10
        assert len(up.bodies) == 10
        assert proxy.accepted <= 2


async def test_the_gateway_pool_keeps_its_connections_warm_across_a_storm(pki: Pki) -> None:
    # The pool production_deps builds (upstream.max_connections): three waves of 60
    # registrations, each wave 15 times the pool, open the pool's connections once —
    # every later registration rides a kept-alive connection, no new TLS handshake.
    async with (
        run_upstream(pki, []) as up,
        CountingProxy(int(up.url.rsplit(":", 1)[1])) as proxy,
    ):
        config = dataclasses.replace(
            Config(),
            upstream=UpstreamConfig(
                url=proxy.url,
                ca_file=str(pki.ca_file),
                client_cert_file=str(pki.client_cert),
                client_key_file=str(pki.client_key),
                max_connections=4,
            ),
        )
        trace = Metrics().trace_config([(proxy.url, "auth")])
        async with auth_client(config, FixedClock(T0), trace, aiohttp.ClientSession) as client:
            for _ in range(3):
                results = await asyncio.gather(*(client.register(REG) for _ in range(60)))
                assert len(results) == 60
        assert len(up.bodies) == 180
        assert 1 <= proxy.accepted <= 4


async def test_ready_reflects_the_upstream_and_the_circuit(pki: Pki) -> None:
    clock = FixedClock(T0)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=10.0, clock=clock)
    async with (
        run_upstream(pki, [_err(500)]) as up,
        _client(pki, up.url, clock=clock, breaker=breaker) as client,
    ):
        assert await client.ready() is True
        assert up.health_hits == 1
        with pytest.raises(UpstreamFailed):
            await client.register(REG)
        # Open circuit: not ready, and no probe is sent.
        assert await client.ready() is False
        assert up.health_hits == 1
        # Probing never moves the breaker.
        assert _state(breaker) is BreakerState.OPEN
    async with _client(pki, f"https://127.0.0.1:{_closed_port()}") as client:
        assert await client.ready() is False
        assert _state(client.breaker) is BreakerState.CLOSED


async def test_an_injected_session_is_not_closed_by_the_client(pki: Pki) -> None:
    async with run_upstream(pki, []) as up, aiohttp.ClientSession() as session:
        ctx = client_ssl_context(pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key)
        client = AuthClient(url=up.url, ssl_context=ctx, clock=FixedClock(T0), session=session)
        await client.register(REG)
        await client.aclose()
        assert not session.closed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "ftp://x"}, "url"),
        ({"timeout": 0}, "timeout"),
        ({"retries": -1}, "retries"),
        ({"max_connections": 0}, "max_connections"),
    ],
    ids=[
        "a non-http URL is refused",
        "a zero timeout is refused",
        "negative retries are refused",
        "an empty pool is refused",
    ],
)
def test_auth_client_validates_its_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "url": "https://127.0.0.1:1",
        "ssl_context": ssl.create_default_context(),
        "clock": FixedClock(T0),
    }
    args.update(kwargs)
    factory: Callable[..., AuthClient] = AuthClient
    with pytest.raises(ValueError, match=match):
        factory(**args)
