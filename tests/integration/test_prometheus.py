"""The shipped Prometheus config and alerts are valid, and a real Prometheus scrapes a
running gateway and reads its join counter back through the query API."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiohttp
import pytest

from gateway.agent import run_join
from gateway.core.config import MetricsConfig
from gateway.dev.devstack import agent_settings, dev_stack
from tests.support.binaries import require_binary
from tests.support.gateway_proc import free_port
from tests.support.tokens import azure_token_yaml

REPO = Path(__file__).resolve().parents[2]
SUB = "11111111-1111-1111-1111-111111111111"
TOKENS = azure_token_yaml(SUB)


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "config/prometheus.yml"],
        ["check", "rules", "config/alerts.yml"],
        ["test", "rules", "tests/promtool/alerts_test.yml"],
    ],
    ids=[
        "promtool accepts the scrape config",
        "promtool accepts the alert rules",
        "the alerts fire on the gateway's series (promtool unit tests)",
    ],
)
def test_promtool(args: list[str]) -> None:
    promtool = require_binary("promtool")
    out = subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


async def _query(session: aiohttp.ClientSession, base: str, promql: str) -> float | None:
    async with session.get(base + "/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json()
    result = body.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


async def test_prometheus_scrapes_the_gateway(tmp_path: Path) -> None:
    prometheus = require_binary("prometheus")
    mport, pport = free_port(), free_port()
    async with dev_stack(
        tmp_path / "stack",
        tokens_yaml=TOKENS,
        config_overrides={"metrics": MetricsConfig(listen=f"127.0.0.1:{mport}")},
    ) as st:
        tenant = st.emulator.add_tenant()
        vms = [
            st.emulator.add_vm(
                subscription=SUB, resource_group="rg", name=f"p-{i}", tenant=tenant, identity="user"
            )
            for i in range(5)
        ]
        for vm in vms:
            await run_join(agent_settings(st, vm))
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: join-gateway\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{mport}']}}]\n"
        )
        proc = await asyncio.create_subprocess_exec(
            prometheus,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{pport}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{pport}"
            value = None
            async with aiohttp.ClientSession() as session:
                for _ in range(300):
                    try:
                        value = await _query(
                            session, base, 'sum(join_gateway_joins_total{outcome="joined"})'
                        )
                    except aiohttp.ClientError:
                        value = None
                    if value == len(vms):
                        break
                    await asyncio.sleep(0.1)
                assert value == len(vms)
                up = await _query(session, base, 'up{job="join-gateway"}')
                assert up == 1.0
                entra = await _query(
                    session, base, 'sum(join_gateway_outbound_requests_total{target="entra"})'
                )
                assert entra is not None and entra >= 2  # discovery + JWKS, counted by target
        finally:
            proc.terminate()
            await proc.wait()
