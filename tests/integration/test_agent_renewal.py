"""``join-gateway agent`` as a real process keeps a node joined through renewals and an outage.

The emulator and the auth service (certificates of a few seconds) run in the test's loop;
the gateway and the agent are ``join-gateway`` processes. The test watches the agent's data
directory as a reader would: through ``current``, resolved once per read, every set it sees
must be whole (the TLS certificate's subject is the set's ``host_id``; the SSH certificate
names the same host). Renewals are counted at the auth service and as distinct certificates
on disk; the schedule itself is unit-tested (tests/unit/test_agent_renew.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import SSHCertificate

from gateway.authservice import AuthPaths, AuthSettings
from gateway.core.tlsutil import ssh_key_pin
from gateway.dev.devstack import DEFAULT_TOKEN, DevStack, dev_stack
from gateway.dev.emulator import EmulatedVm
from tests.conftest import find_secrets
from tests.support.gateway_proc import free_port, gateway_process

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALLOWED = "11111111-1111-1111-1111-111111111111"
REFUSED = "55555555-5555-5555-5555-555555555555"
CERT_TTL = timedelta(seconds=6)  # renewal at 4 s ± 10 %
TOKENS = f"""
kind: token
version: v2
metadata:
  name: {DEFAULT_TOKEN}
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
      - subscription: {ALLOWED}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevStack]:
    async with dev_stack(
        tmp_path_factory.mktemp("renewal"),
        tokens_yaml=TOKENS,
        start_gateway=False,
        auth_settings=AuthSettings(cert_ttl=CERT_TTL),
    ) as st:
        yield st


@dataclass
class Watched:
    """What a reader of the data directory saw: distinct sets, and any set that was not whole."""

    serials: list[int] = field(default_factory=list)
    not_after: datetime | None = None
    broken: list[str] = field(default_factory=list)

    def look(self, data_dir: Path) -> None:
        current = data_dir / "current"
        if not current.is_symlink():
            return
        directory = current.resolve()
        try:
            tls = x509.load_pem_x509_certificate((directory / "tls.crt").read_bytes())
            host_id = (directory / "host_id").read_text().strip()
            ssh = serialization.load_ssh_public_identity((directory / "ssh.crt").read_bytes())
            x509.load_pem_x509_certificates((directory / "tls_ca.crt").read_bytes())
            serialization.load_ssh_public_key((directory / "ssh_ca.pub").read_bytes())
        except FileNotFoundError:
            return  # a set two switches old was pruned under a slow reader: read again
        except ValueError as exc:
            self.broken.append(f"{directory.name}: {exc}")
            return
        cn = tls.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        if cn != host_id or not isinstance(ssh, SSHCertificate):
            self.broken.append(f"{directory.name}: TLS for {cn!r}, host_id {host_id!r}")
        elif not ssh.key_id.decode().startswith(host_id):
            self.broken.append(f"{directory.name}: SSH for {ssh.key_id!r}, host_id {host_id!r}")
        if tls.serial_number not in self.serials:
            self.serials.append(tls.serial_number)
            self.not_after = tls.not_valid_after_utc


@dataclass
class Agent:
    proc: asyncio.subprocess.Process
    data_dir: Path
    log_path: Path
    watched: Watched = field(default_factory=Watched)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def until(self, what: str, pred: object, within: float) -> None:
        """Watch the data directory every 20 ms until ``pred()``; fail after ``within`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not pred():  # type: ignore[operator]
            self.watched.look(self.data_dir)
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"agent exited {self.proc.returncode} waiting for {what}:\n"
                    + self.log()[-3000:]
                )
            if loop.time() > deadline:
                raise AssertionError(f"no {what} within {within}s:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.02)

    async def watch_for(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            self.watched.look(self.data_dir)
            await asyncio.sleep(0.02)


def new_vm(stack: DevStack, subscription: str, name: str) -> EmulatedVm:
    emu = stack.emulator
    return emu.add_vm(
        subscription=subscription,
        resource_group="rg",
        name=name,
        tenant=emu.add_tenant(),
        identity="user",
    )


def node_yaml(stack: DevStack, vm: EmulatedVm, gateway_port: int) -> str:
    paths = AuthPaths.for_dir(stack.workdir / "auth")
    ssh_pin = ssh_key_pin(serialization.load_ssh_public_key(paths.ssh_ca_pub.read_bytes()))
    return f"""\
version: v3
teleport:
  nodename: {vm.name}
  join_params:
    token_name: {DEFAULT_TOKEN}
    method: azure
    azure: {{client_id: {vm.client_id}}}
  proxy_server: 127.0.0.1:{gateway_port}
  ca_pin: {stack.auth.ca_pin()}
  ssh_ca_pin: {ssh_pin}
"""


async def start_agent(stack: DevStack, vm: EmulatedVm, workdir: Path, port: int) -> Agent:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "node.yaml"
    config.write_text(node_yaml(stack, vm, port))
    data_dir, log_path = workdir / "data", workdir / "agent.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "agent",
            "--config",
            str(config),
            "--data-dir",
            str(data_dir),
            "--imds-url",
            vm.imds_url,
            "--ca-file",
            str(stack.gateway_ca_file),
            "--aia-allow-prefix",
            stack.emulator.aia_prefix,
            # One attempt per join: the agent's own backoff (capped at 1 s here) retries.
            "--max-attempts",
            "1",
            "--retry-cap",
            "1",
            "--log-level",
            "INFO",
            stdout=log,
            stderr=log,
        )
    return Agent(proc, data_dir, log_path)


async def stop(agent: Agent) -> int:
    """SIGTERM; the exit status, which must come within 2 s."""
    if agent.proc.returncode is None:
        agent.proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(agent.proc.wait(), 2)
    finally:
        if agent.proc.returncode is None:
            agent.proc.kill()
            await agent.proc.wait()


async def test_the_agent_renews_through_signals_and_a_gateway_outage(
    stack: DevStack, tmp_path: Path
) -> None:
    vm = new_vm(stack, ALLOWED, "renewing-vm")
    port = free_port()
    registrations = len(await stack.auth.records())
    gw_dir = tmp_path / "gw"
    # One worker: serve runs without a supervisor, which would otherwise create this.
    (gw_dir / "prom").mkdir(parents=True)
    async with gateway_process(stack.config, gw_dir, stack.gateway_ca_file, workers=1, port=port):
        agent = await start_agent(stack, vm, tmp_path / "node", port)
        seen = agent.watched.serials
        try:
            # The first join, then two renewals at two thirds of the 6 s lifetime.
            await agent.until("join and two renewals", lambda: len(seen) >= 3, within=40)
            assert len(await stack.auth.records()) - registrations >= 3
            # The log line follows the switch of the file set: wait for it, don't race it.
            await agent.until(
                "two renewals logged", lambda: agent.log().count("renewed as host") >= 2, within=5
            )

            # SIGHUP right after a renewal: the next one comes at once, not 4 s later.
            before = len(seen)
            agent.proc.send_signal(signal.SIGHUP)
            await agent.until("SIGHUP renewal", lambda: len(seen) > before, within=10)
            assert "SIGHUP: renewing now" in agent.log()
        except BaseException:
            await stop(agent)
            raise

    # The gateway is down past the renewal time and past expiry: no new set, and the agent
    # says the node has no valid identity — but it keeps trying.
    count, expiry = len(seen), agent.watched.not_after
    assert expiry is not None
    outage = (expiry - datetime.now(UTC)).total_seconds() + 1.5
    await agent.watch_for(outage)
    assert len(seen) == count and agent.proc.returncode is None
    log_so_far = agent.log()
    assert "connection_failed" in log_so_far
    assert "the node has no valid identity" in log_so_far

    # Back on the same port: the agent joins again by itself.
    async with gateway_process(stack.config, gw_dir, stack.gateway_ca_file, workers=1, port=port):
        try:
            await agent.until("renewal after the outage", lambda: len(seen) > count, within=20)
        finally:
            assert await stop(agent) == 0
    assert agent.watched.broken == []
    assert "agent stopping" in agent.log()
    assert not find_secrets(agent.log())
    # Every set the agent left behind is whole; at most two are kept.
    assert len(list((agent.data_dir / "sets").iterdir())) <= 2
    assert all(os.path.islink(agent.data_dir / n) for n in ("tls.crt", "host_id"))


async def test_a_node_no_rule_allows_stops_with_exit_4(stack: DevStack, tmp_path: Path) -> None:
    vm = new_vm(stack, REFUSED, "refused-vm")
    port = free_port()
    (tmp_path / "gw" / "prom").mkdir(parents=True)
    async with gateway_process(
        stack.config, tmp_path / "gw", stack.gateway_ca_file, workers=1, port=port
    ):
        agent = await start_agent(stack, vm, tmp_path / "node", port)
        try:
            assert await asyncio.wait_for(agent.proc.wait(), 20) == 4
        finally:
            await stop(agent)
    assert "refused this node for good (not_allowed" in agent.log()
    assert not (agent.data_dir / "current").exists()
