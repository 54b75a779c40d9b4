"""Faults, each driven by the emulator's switches or by stopping the auth service.

The contract (README, "When things fail"): every join either succeeds or gets a
retryable error with Retry-After, and every approved registration reaches the auth
service exactly once — the auth service's records prove it. The gateway runs on an
injected clock, so hold-offs and circuit timeouts are crossed by advancing it, not by
sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gateway.agent import AgentSettings, make_ssl_context, run_join
from gateway.agent.keys import load_or_create_keys
from gateway.authservice import AuthService
from gateway.core.clock import FixedClock
from gateway.core.config import Config
from gateway.dev.devstack import DevStack, agent_settings, dev_stack
from gateway.dev.emulator import EmulatedVm
from tests.support.tokens import azure_token_yaml

SUB = "11111111-1111-1111-1111-111111111111"
TOKENS = azure_token_yaml(SUB)


def tune(config: Config) -> Config:
    return dataclasses.replace(
        config,
        azure=dataclasses.replace(config.azure, request_timeout_seconds=0.5),
        cache=dataclasses.replace(config.cache, jwks_min_refresh_seconds=0.0),
        upstream=dataclasses.replace(
            config.upstream, breaker_failures=3, breaker_reset_seconds=5.0, timeout_seconds=2.0
        ),
    )


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[DevStack]:
    clock = FixedClock(time.time())
    async with dev_stack(tmp_path / "stack", tokens_yaml=TOKENS, clock=clock, adjust=tune) as st:
        yield st


def gateway_clock(stack: DevStack) -> FixedClock:
    clock = stack.gateway.deps.clock
    assert isinstance(clock, FixedClock)
    return clock


def fleet(
    stack: DevStack, n: int, *, tenant: str | None = None, prefix: str = "f"
) -> list[EmulatedVm]:
    tenant = tenant or stack.emulator.add_tenant()
    return [
        stack.emulator.add_vm(
            subscription=SUB,
            resource_group="rg",
            name=f"{prefix}-{i}",
            tenant=tenant,
            identity="user",
        )
        for i in range(n)
    ]


def patient(stack: DevStack, vm: EmulatedVm, **kw: Any) -> AgentSettings:
    """An agent that retries quickly (tests must not wait out production back-offs)."""
    return agent_settings(stack, vm, backoff_base=0.01, backoff_cap=0.05, max_attempts=30, **kw)


def virtual_sleep(stack: DevStack):  # type: ignore[no-untyped-def]
    """The agent's waits pass on the gateway's clock, not the wall's: Retry-After and
    hold-offs are honoured in full, in no real time."""

    async def sleep(seconds: float) -> None:
        gateway_clock(stack).advance(seconds)
        await asyncio.sleep(0.01)

    return sleep


async def assert_exactly_once(stack: DevStack, vms: list[EmulatedVm]) -> None:
    per_vm = Counter(r.registration.join.vm_id for r in await stack.auth.records())
    for vm in vms:
        assert per_vm[vm.vm_id] == 1, f"{vm.name} registered {per_vm[vm.vm_id]} times"


async def post_join(
    stack: DevStack, vm: EmulatedVm, tmp: Path, **kw: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One raw join request (no agent retries), to look at a single answer."""
    return await post_body(stack, join_body(stack, vm, tmp, **kw))


def join_body(stack: DevStack, vm: EmulatedVm, tmp: Path, **kw: Any) -> dict[str, Any]:
    emu = stack.emulator
    challenge = stack.gateway.deps.challenges.issue().value
    keys = load_or_create_keys(tmp / vm.name)
    body = {
        "token_name": "azure-token",
        "challenge": challenge,
        "attested_data": emu.attested_document_for(vm, nonce=challenge),
        "access_token": emu.token_for(vm),
        "host": {
            "node_name": vm.name,
            "role": "Node",
            "public_ssh_key": keys.public_ssh_key,
            "public_tls_key": keys.public_tls_key,
        },
        **kw,
    }
    return body


async def post_body(
    stack: DevStack, body: dict[str, Any]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    ctx = ssl.create_default_context(cafile=str(stack.gateway_ca_file))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            stack.gateway_url + "/v1/join/azure",
            data=json.dumps(body),
            headers={"Content-Type": "application/json"},
            ssl=ctx,
        ) as r,
    ):
        return r.status, await r.json(), dict(r.headers)


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ({"status": 500}, "dependency_unavailable"),
        ({"status": 503}, "dependency_unavailable"),
        ({"status": 429, "retry_after": 7}, "azure_budget_exhausted"),
        ({"hang": True}, "dependency_unavailable"),
        ({"drop": True}, "dependency_unavailable"),
    ],
    ids=[
        "an ARM 500 is a retryable 503",
        "an ARM 503 is a retryable 503",
        "an ARM 429 is a 503 that passes its Retry-After on",
        "an ARM call that hangs times out into a retryable 503",
        "an ARM connection dropped is a retryable 503",
    ],
)
async def test_arm_faults_are_retryable_and_joins_recover(
    stack: DevStack, tmp_path: Path, fault: dict[str, Any], code: str
) -> None:
    vms = fleet(stack, 3)
    # Persistent for the first look (aiohttp itself retries a GET once on a dropped
    # keep-alive connection), then only twice while the agents retry.
    stack.emulator.set_fault("arm", **fault)
    status, body, headers = await post_join(stack, vms[0], tmp_path)
    stack.emulator.clear_fault("arm")
    assert (status, body["error"]["code"]) == (503, code)
    assert int(headers["Retry-After"]) >= (7 if "retry_after" in fault else 1)
    if "retry_after" in fault:
        # The ARM client holds off the subscription until Retry-After: no call reaches ARM.
        before = stack.emulator.counters.get("arm.get_vm", 0)
        status, body, _ = await post_join(stack, vms[1], tmp_path)
        assert (status, body["error"]["code"]) == (503, "azure_budget_exhausted")
        assert stack.emulator.counters.get("arm.get_vm", 0) == before
        gateway_clock(stack).advance(8)
    stack.emulator.set_fault("arm", times=2, **fault)
    for vm in vms:
        await run_join(patient(stack, vm), sleep=virtual_sleep(stack))
    await assert_exactly_once(stack, vms)


async def test_entra_down_keeps_serving_known_keys_and_a_new_key_fails_closed(
    stack: DevStack, tmp_path: Path
) -> None:
    tenant = stack.emulator.add_tenant()
    vms = fleet(stack, 4, tenant=tenant)
    await run_join(patient(stack, vms[0]))  # the tenant's keys are now cached
    stack.emulator.set_fault("entra", status=503)
    await run_join(patient(stack, vms[1]))  # last known good keys keep serving
    stack.emulator.rotate_signing_key(tenant)  # tokens now carry a kid we do not have
    status, body, _ = await post_join(stack, vms[2], tmp_path)
    assert status == 403 and body["error"]["code"] == "access_token_key_unknown"
    stack.emulator.clear_fault("entra")
    gateway_clock(stack).advance(15)  # past the fetch-failure hold-off
    await run_join(patient(stack, vms[2]), sleep=virtual_sleep(stack))
    await run_join(patient(stack, vms[3]), sleep=virtual_sleep(stack))
    await assert_exactly_once(stack, [vms[0], vms[1], vms[2], vms[3]])


async def test_entra_down_with_no_keys_known_is_a_retryable_503(
    stack: DevStack, tmp_path: Path
) -> None:
    vms = fleet(stack, 1)
    stack.emulator.set_fault("entra", status=500)
    status, body, headers = await post_join(stack, vms[0], tmp_path)
    assert (status, body["error"]["code"]) == (503, "dependency_unavailable")
    assert "Retry-After" in headers


async def test_a_signing_key_rotation_in_the_middle_of_a_storm(stack: DevStack) -> None:
    tenant = stack.emulator.add_tenant()
    vms = fleet(stack, 40, tenant=tenant)
    ctx = make_ssl_context(stack.gateway_ca_file)
    await asyncio.gather(*(run_join(patient(stack, vm), ssl_context=ctx) for vm in vms[:10]))
    jwks_before = stack.emulator.counters.get("entra.jwks", 0)
    stack.emulator.rotate_signing_key(tenant)
    await asyncio.gather(
        *(
            run_join(patient(stack, vm), ssl_context=ctx, sleep=virtual_sleep(stack))
            for vm in vms[10:]
        )
    )
    # 30 joins with a new kid arriving at once: one refresh, not thirty.
    assert stack.emulator.counters.get("entra.jwks", 0) - jwks_before == 1
    await assert_exactly_once(stack, vms)


async def test_aia_down_cached_chains_keep_working(stack: DevStack, tmp_path: Path) -> None:
    vms = fleet(stack, 3)
    # The agents send no intermediates: the gateway must find the chain itself.
    await run_join(patient(stack, vms[0], collect_intermediates=False))
    assert stack.emulator.counters.get("aia", 0) == 1
    stack.emulator.set_fault("aia", status=503)
    await run_join(patient(stack, vms[1], collect_intermediates=False))
    # Agents that do send the intermediate are never affected by AIA at all.
    await run_join(patient(stack, vms[2], collect_intermediates=False))
    assert stack.emulator.counters.get("aia", 0) == 1
    await assert_exactly_once(stack, vms)


async def test_aia_down_with_nothing_cached_is_a_retryable_503(
    stack: DevStack, tmp_path: Path
) -> None:
    vms = fleet(stack, 1)
    stack.emulator.set_fault("aia", status=503)
    status, body, _ = await post_join(stack, vms[0], tmp_path)
    assert (status, body["error"]["code"]) == (503, "dependency_unavailable")


async def test_auth_service_down_opens_the_circuit_and_joins_recover_when_it_returns(
    stack: DevStack, tmp_path: Path
) -> None:
    vms = fleet(stack, 8)
    await run_join(patient(stack, vms[0]))
    auth = stack.auth
    port = int(auth.url.rsplit(":", 1)[1])
    paths = auth.paths
    await auth.aclose()

    codes = []
    for vm in vms[1:6]:
        status, body, headers = await post_join(stack, vm, tmp_path)
        assert status == 503 and "Retry-After" in headers
        codes.append(body["error"]["code"])
    assert set(codes) == {"upstream_unavailable"}
    assert stack.gateway.deps.auth.breaker.state.value == "open"
    # Open: answers come without touching the network (no new outbound auth attempts).
    metrics = stack.gateway._metrics
    errors = metrics.outbound.labels(target="auth", status="error")
    before = errors._value.get()
    for vm in vms[1:4]:
        status, body, _ = await post_join(stack, vm, tmp_path)
        assert (status, body["error"]["code"]) == (503, "upstream_unavailable")
    assert errors._value.get() == before

    revived = AuthService(
        data_dir=paths.data_dir,
        host="127.0.0.1",
        port=port,
        tls_cert=paths.server_cert,
        tls_key=paths.server_key,
        client_ca=paths.gateway_client_ca,
    )
    async with revived:
        stack.auth = revived
        gateway_clock(stack).advance(6)  # the circuit half-opens; one probe closes it
        ctx = make_ssl_context(stack.gateway_ca_file)
        await asyncio.gather(
            *(
                run_join(patient(stack, vm), ssl_context=ctx, sleep=virtual_sleep(stack))
                for vm in vms[1:]
            )
        )
        assert stack.gateway.deps.auth.breaker.state.value == "closed"
        await assert_exactly_once(stack, vms)


async def test_an_upstream_failure_after_verification_is_retried_with_the_same_challenge(
    stack: DevStack,
) -> None:
    """The agent resends the verified request; the auth service sees one idempotency key."""
    vms = fleet(stack, 1)
    auth = stack.auth
    port = int(auth.url.rsplit(":", 1)[1])
    paths = auth.paths
    await auth.aclose()
    waits: list[float] = []
    revived: AuthService | None = None

    async def sleep_then_revive(seconds: float) -> None:
        nonlocal revived
        waits.append(seconds)
        if revived is None:
            revived = AuthService(
                data_dir=paths.data_dir,
                host="127.0.0.1",
                port=port,
                tls_cert=paths.server_cert,
                tls_key=paths.server_key,
                client_ca=paths.gateway_client_ca,
            )
            await revived.start()
            stack.auth = revived

    try:
        out = await run_join(patient(stack, vms[0]), sleep=sleep_then_revive)
        records = [
            r for r in await stack.auth.records() if r.registration.join.vm_id == vms[0].vm_id
        ]
    finally:
        if revived is not None:
            await revived.aclose()
    assert out.attempts == 2 and waits
    assert len(records) == 1


async def test_a_slow_auth_service_times_out_opens_the_circuit_and_recovers(
    tmp_path: Path,
) -> None:
    """The auth service answers, but only after the gateway's upstream timeout: joins get a
    fast retryable 503 and the circuit opens. The requests that timed out still reach the
    auth service late (their answers were lost): resending the *same* request, as the
    agent does, registers each VM once."""
    from urllib.parse import urlsplit

    from gateway.server.serve import GatewayServer
    from tests.support.slow_proxy import slow_proxy, wait_delivered

    clock = FixedClock(time.time())
    async with dev_stack(
        tmp_path / "base", tokens_yaml=TOKENS, clock=clock, adjust=tune, start_gateway=False
    ) as base:
        auth = urlsplit(base.auth.url)
        async with slow_proxy(str(auth.hostname), int(auth.port or 443)) as proxy:
            upstream = dataclasses.replace(
                base.config.upstream,
                url=f"https://127.0.0.1:{proxy.port}",
                timeout_seconds=0.5,
                breaker_failures=3,
                breaker_reset_seconds=5.0,
            )
            config = dataclasses.replace(base.config, upstream=upstream)
            async with GatewayServer(config, clock=clock) as gw:
                stack = dataclasses.replace(base, gateway=gw)
                vms = fleet(stack, 6)
                await run_join(patient(stack, vms[0]))  # quick: joins
                proxy.delay = 2.0  # every answer now comes after the 0.5 s timeout
                bodies = [join_body(stack, vm, tmp_path) for vm in vms[1:5]]
                for body in bodies[:3]:
                    status, answer, headers = await post_body(stack, body)
                    assert (status, answer["error"]["code"]) == (503, "upstream_unavailable")
                    assert "Retry-After" in headers
                assert gw.deps.auth.breaker.state.value == "open"
                before = proxy.connections
                status, answer, _ = await post_body(stack, bodies[3])
                assert (status, answer["error"]["code"]) == (503, "upstream_unavailable")
                assert proxy.connections == before  # open: not even a connection upstream

                proxy.delay = 0.0
                await wait_delivered(proxy)  # the timed-out requests land now
                clock.advance(6)  # half-open: one probe, which now succeeds
                for body in bodies:  # what the agent does: the same request again
                    status, answer, _ = await post_body(stack, body)
                    assert status == 200, answer
                await run_join(patient(stack, vms[5]), sleep=virtual_sleep(stack))
                assert gw.deps.auth.breaker.state.value == "closed"
                await assert_exactly_once(stack, vms)
