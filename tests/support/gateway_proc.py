"""Run ``join-gateway serve`` as a real process (supervisor and workers) for tests."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarks.stack import free_port as free_port  # the tests' one source of ports
from gateway.core.config import Config, ListenerConfig, MetricsConfig, dump_config


@dataclass
class GatewayProcess:
    proc: asyncio.subprocess.Process
    url: str
    metrics_url: str
    config_path: Path
    log_path: Path
    metrics_dir: Path

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def send(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def wait_ready(url: str, ssl_ctx: ssl.SSLContext, within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/readyz", ssl=ssl_ctx) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, OSError):
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"gateway at {url} not ready after {within}s")
            await asyncio.sleep(0.1)


@asynccontextmanager
async def gateway_process(
    config: Config,
    workdir: Path,
    ca_file: Path,
    *,
    workers: int = 2,
    port: int | None = None,
    **overrides: object,
) -> AsyncIterator[GatewayProcess]:
    """``port``: listen there (a restart on the same address); default a free one."""
    port, mport = port or free_port(), free_port()
    config = dataclasses.replace(
        config,
        listeners=(ListenerConfig(f"127.0.0.1:{port}"),),
        metrics=MetricsConfig(listen=f"127.0.0.1:{mport}"),
        workers=workers,
    )
    config = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "gateway.yaml"
    config_path.write_text(dump_config(config))
    log_path = workdir / "gateway.log"
    metrics_dir = workdir / "prom"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "-c",
            str(config_path),
            stdout=log,
            stderr=log,
            env=env,
        )
    gp = GatewayProcess(
        proc,
        f"https://127.0.0.1:{port}",
        f"http://127.0.0.1:{mport}/metrics",
        config_path,
        log_path,
        metrics_dir,
    )
    try:
        await wait_ready(gp.url, ssl.create_default_context(cafile=str(ca_file)))
        yield gp
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        from tests.conftest import find_secrets

        leaks = find_secrets(gp.log())
        assert not leaks, f"secrets in the gateway process's log: {leaks[:3]}"
