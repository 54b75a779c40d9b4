"""``join-gateway demo``: the whole system on loopback, then a fleet joins.

Starts the Azure emulator, the reference auth service and the gateway (real HTTPS), then a
fleet of emulated VMs — user- and system-assigned identities, a uniform scale set, several
subscriptions and resource groups — joins concurrently through the real agent code
(``run_join``). VMs that must be refused try too: a subscription no rule allows, a
resource group outside its rule, a VM whose tags a tag rule refuses, a managed identity an
identity rule refuses, a replayed challenge, and a document from another VM. It prints
what happened and exits 0 only if every outcome is the expected one. Then the life goes
on: one node is locked by an operator, and every node renews by a full re-join — each
keeps its host ID, and the locked one is refused ``host_locked``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from gateway.agent import (
    GatewayClient,
    HostParams,
    ImdsClient,
    JoinError,
    JoinFailed,
    build_join_body,
    load_or_create_keys,
    make_session,
    make_ssl_context,
    run_join,
)
from gateway.authservice.registry import LockTarget
from gateway.dev.devstack import DevStack, agent_settings, dev_stack
from gateway.dev.emulator import EmulatedVm, Latency

__all__ = ["add_arguments", "run"]

S_OPEN = "11111111-1111-1111-1111-111111111111"
S_GROUPS = "33333333-3333-3333-3333-333333333333"
S_CLOSED = "55555555-5555-5555-5555-555555555555"
S_TAGGED = "66666666-6666-6666-6666-666666666666"  # admits VMs tagged env=prod only
# Admits one managed identity only (its client ID), whatever the VM.
S_IDENTITY = "77777777-7777-7777-7777-777777777777"
ALLOWED_CLIENT_ID = "aaaaaaaa-0000-4000-8000-0000000000a1"

TOKENS = f"""\
kind: token
version: v2
metadata:
  name: azure-token
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
      - subscription: {S_OPEN}
      - subscription: {S_GROUPS}
        resource_groups: ["group1", "group2"]
      - subscription: {S_TAGGED}
        tags:
          env: prod
      - subscription: {S_IDENTITY}
        identities: ["{ALLOWED_CLIENT_ID}"]
"""


@dataclass
class Outcome:
    name: str
    expected: str  # "joined" or an error code
    got: str
    seconds: float
    attempts: int = 1
    host_id: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vms", type=int, default=210, help="VMs that should join (>= 20)")
    parser.add_argument("--concurrency", type=int, default=100, help="agents running at once")
    parser.add_argument(
        "--latency",
        choices=["azure", "none"],
        default="azure",
        help="emulated Azure latency: realistic (ARM 80 ms, Entra/AIA 100 ms) or none",
    )
    parser.add_argument("--workdir", type=Path, help="keep keys, certificates and records here")


def run(args: argparse.Namespace) -> int:
    if args.vms < 20:
        print("join-gateway demo: --vms must be at least 20", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(_main(args))
    return int(uvloop.run(_main(args)))


async def _main(args: argparse.Namespace) -> int:
    # Refusals are expected here and reported in the table; the agents' own error lines
    # (and the auth service's warning about the node the demo locks) would only bury it.
    logging.getLogger("gateway.agent").setLevel(logging.CRITICAL)
    logging.getLogger("gateway.authservice.app").setLevel(logging.ERROR)
    if args.workdir:
        return await _demo(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="join-gateway-demo-") as tmp:
        return await _demo(args, Path(tmp))


@dataclass
class DemoFleet:
    joiners: list[EmulatedVm]
    refused: list[tuple[EmulatedVm, str]]
    replay_vm: EmulatedVm
    swap_token_vm: EmulatedVm
    swap_doc_vm: EmulatedVm


def _fleet(stack: DevStack, n: int) -> DemoFleet:
    emu = stack.emulator
    tenant = emu.add_tenant()
    joiners: list[EmulatedVm] = []
    # A uniform scale set (system-assigned identity): a quarter of the fleet.
    ss = max(5, n // 4)
    joiners += emu.add_scale_set(
        subscription=S_OPEN,
        resource_group="rg-pool",
        name="pool",
        tenant=tenant,
        capacity=ss,
        identity="system",
    )
    rest = n - ss
    layout: list[tuple[str, str, Literal["user", "system"], float]] = [
        # (subscription, resource group, identity, share of the rest)
        (S_OPEN, "rg-web", "user", 0.35),
        (S_OPEN, "rg-db", "system", 0.25),
        (S_GROUPS, "group1", "user", 0.2),
        (S_GROUPS, "group2", "system", 0.2),
    ]
    for i, (sub, rg, identity, share) in enumerate(layout):
        count = (
            int(rest * share)
            if i < len(layout) - 1
            else rest - sum(int(rest * s) for *_, s in layout[:-1])
        )
        client_id = None
        for j in range(count):
            vm = emu.add_vm(
                subscription=sub,
                resource_group=rg,
                name=f"{rg}-{j:03d}",
                tenant=tenant,
                identity=identity,
                client_id=client_id,
            )
            client_id = vm.client_id  # one user-assigned identity per group, as operators do
            joiners.append(vm)

    def add(
        sub: str, rg: str, name: str, identity: Literal["user", "system"], **kw: Any
    ) -> EmulatedVm:
        return emu.add_vm(
            subscription=sub, resource_group=rg, name=name, tenant=tenant, identity=identity, **kw
        )

    refused: list[tuple[EmulatedVm, str]] = []
    for j in range(3):
        refused.append((add(S_CLOSED, "rg-x", f"closed-{j}", "user"), "not_allowed"))
        refused.append((add(S_GROUPS, "group3", f"group3-{j}", "system"), "not_allowed"))
    # A tag-based and an identity-based refusal: ARM says the VM is tagged env=dev; the
    # token says another managed identity joined. Each rule admits one VM too.
    dev, prod = {"env": "dev"}, {"env": "prod"}
    refused.append((add(S_TAGGED, "rg-tagged", "tagged-dev", "system", tags=dev), "not_allowed"))
    refused.append((add(S_IDENTITY, "rg-ids", "other-identity", "user"), "not_allowed"))
    joiners.append(add(S_TAGGED, "rg-tagged", "tagged-prod", "system", tags=prod))
    joiners.append(
        add(S_IDENTITY, "rg-ids", "allowed-identity", "user", client_id=ALLOWED_CLIENT_ID)
    )
    replay_vm = emu.add_vm(
        subscription=S_OPEN,
        resource_group="rg-edge",
        name="replayer",
        tenant=tenant,
        identity="user",
    )
    swap_token_vm = emu.add_vm(
        subscription=S_OPEN, resource_group="rg-edge", name="thief", tenant=tenant, identity="user"
    )
    swap_doc_vm = emu.add_vm(
        subscription=S_OPEN, resource_group="rg-edge", name="victim", tenant=tenant, identity="user"
    )
    return DemoFleet(joiners, refused, replay_vm, swap_token_vm, swap_doc_vm)


async def _demo(args: argparse.Namespace, workdir: Path) -> int:
    latency = Latency() if args.latency == "azure" else Latency.none()
    started = time.perf_counter()
    async with dev_stack(workdir, tokens_yaml=TOKENS, latency=latency) as stack:
        fleet = _fleet(stack, args.vms)
        print(f"gateway  {stack.gateway_url}   auth service {stack.auth.url}")
        emu = stack.emulator
        print(f"emulator {emu.https_url} (Entra, ARM)  {emu.http_url} (IMDS, AIA)")
        print(
            f"fleet    {len(fleet.joiners)} VMs to join, {len(fleet.refused) + 2} to refuse; "
            f"{args.concurrency} agents at a time\n"
        )
        ssl_ctx = make_ssl_context(stack.gateway_ca_file)
        gate = asyncio.Semaphore(args.concurrency)
        storm_start = time.perf_counter()

        async def agent(vm: EmulatedVm, expected: str) -> Outcome:
            async with gate:
                t0 = time.perf_counter()
                try:
                    out = await run_join(agent_settings(stack, vm), ssl_context=ssl_ctx)
                except JoinFailed as exc:
                    return Outcome(vm.name, expected, exc.code, time.perf_counter() - t0)
                return Outcome(
                    vm.name, expected, "joined", out.elapsed, out.attempts, host_id=out.host_id
                )

        tasks = [agent(vm, "joined") for vm in fleet.joiners]
        tasks += [agent(vm, code) for vm, code in fleet.refused]
        tasks += [
            _replay(stack, fleet.replay_vm, ssl_ctx),
            _stolen_token(stack, fleet.swap_token_vm, fleet.swap_doc_vm, ssl_ctx),
        ]
        outcomes = await asyncio.gather(*tasks)
        storm = time.perf_counter() - storm_start
        issued = await _check_issued(stack, workdir, fleet.joiners)
        first = _report(stack, outcomes, issued, storm, time.perf_counter() - started)

        # The node's life goes on: an operator locks one node out, then every node renews
        # by re-joining (fresh challenge, document and token) and keeps its host ID.
        hosts = {o.name: o.host_id for o in outcomes if o.got == "joined"}
        locked = fleet.joiners[0]
        await stack.auth.registry.add_lock(
            LockTarget.HOST,
            hosts[locked.name],
            reason="demo: decommissioned by an operator",
            now=stack.auth.clock.now(),
        )
        print(f"renewal round: every node re-joins; {locked.name} was locked beforehand\n")
        renew_start = time.perf_counter()
        renewals = await asyncio.gather(
            *(agent(vm, "host_locked" if vm is locked else "joined") for vm in fleet.joiners)
        )
        renew_time = time.perf_counter() - renew_start
        second = await _report_renewals(stack, renewals, hosts, renew_time)
        return 1 if first or second else 0


async def _manual_join(
    stack: DevStack, token_vm: EmulatedVm, doc_vm: EmulatedVm, ssl_ctx: object, *, twice: bool
) -> tuple[str, float]:
    """One join assembled from the agent's protocol pieces, for the misbehaving cases."""
    keys = load_or_create_keys(stack.workdir / "vms" / token_vm.name)
    async with make_session(ssl_context=ssl_ctx) as session:  # type: ignore[arg-type]
        gw = GatewayClient(session, base_url=stack.gateway_url)
        t0 = time.perf_counter()
        challenge = await gw.challenge()
        doc = await ImdsClient(session, base_url=doc_vm.imds_url).attested_document(challenge)
        token = await ImdsClient(session, base_url=token_vm.imds_url).access_token(
            client_id=token_vm.client_id
        )
        body = build_join_body(
            token_name="azure-token",
            challenge=challenge,
            attested_data=doc,
            access_token=token,
            host=HostParams(
                node_name=token_vm.name,
                role="Node",
                public_ssh_key=keys.public_ssh_key,
                public_tls_key=keys.public_tls_key,
            ),
        )
        try:
            await gw.join(body)
            if twice:
                await gw.join(body)  # the same challenge again: a replay
        except JoinError as exc:
            return exc.code, time.perf_counter() - t0
        return "joined", time.perf_counter() - t0


async def _replay(stack: DevStack, vm: EmulatedVm, ssl_ctx: object) -> Outcome:
    got, seconds = await _manual_join(stack, vm, vm, ssl_ctx, twice=True)
    return Outcome("replayed challenge", "challenge_reused", got, seconds)


async def _stolen_token(
    stack: DevStack, thief: EmulatedVm, victim: EmulatedVm, ssl_ctx: object
) -> Outcome:
    got, seconds = await _manual_join(stack, thief, victim, ssl_ctx, twice=False)
    return Outcome("another VM's document", "vm_binding_failed", got, seconds)


async def _check_issued(
    stack: DevStack, workdir: Path, joiners: Sequence[EmulatedVm]
) -> dict[str, int]:
    """Count what the auth service issued and check every written certificate."""
    records = await stack.auth.records()
    ca_certs: list[x509.Certificate] = []
    valid = 0
    for vm in joiners:
        node = workdir / "vms" / vm.name
        if not (node / "tls.crt").exists():
            continue
        cert = x509.load_pem_x509_certificate((node / "tls.crt").read_bytes())
        if not ca_certs:
            ca_certs = x509.load_pem_x509_certificates((node / "tls_ca.crt").read_bytes())
        if any(_signed_by(cert, ca) for ca in ca_certs) and (node / "ssh.crt").exists():
            valid += 1
    return {"registrations": len(records), "verified_pairs": valid}


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def _report_renewals(
    stack: DevStack, renewals: Sequence[Outcome], hosts: dict[str, str], seconds: float
) -> int:
    """The renewal round's table and the inventory's counts; 0 when all is as expected."""
    renewed = [o for o in renewals if o.got == "joined"]
    same = sum(1 for o in renewed if o.host_id == hosts.get(o.name))
    refused = Counter(o.got for o in renewals if o.got != "joined")
    wrong = [o for o in renewals if o.got != o.expected]
    inventory = await stack.auth.registry.hosts()
    now = stack.auth.clock.now()
    locks = await stack.auth.registry.locks(now=now)
    locked_hosts = {lk.value for lk in locks if lk.target is LockTarget.HOST}
    print("renewal                          count")
    print("-------------------------------- -----")
    print(f"{'renewed, same host ID':32} {same:5}")
    print(f"{'renewed, another host ID':32} {len(renewed) - same:5}")
    for code, count in sorted(refused.items()):
        print(f"{'refused: ' + code:32} {count:5}")
    print(
        f"\ninventory (nodes ls)       {len(inventory)} hosts, "
        f"{sum(1 for h in inventory if h.host_id in locked_hosts)} locked, "
        f"{sum(h.renewals for h in inventory)} renewals recorded"
    )
    print(f"time                       renewal round {seconds:.2f} s\n")
    ok = not wrong and same == len(renewed) and len(renewed) == len(hosts) - 1
    for o in wrong:
        print(f"UNEXPECTED  {o.name}: expected {o.expected}, got {o.got}")
    print("every renewal as expected" if ok else "SOME RENEWALS WERE NOT AS EXPECTED")
    return 0 if ok else 1


def _report(
    stack: DevStack, outcomes: Sequence[Outcome], issued: dict[str, int], storm: float, total: float
) -> int:
    joined = [o for o in outcomes if o.got == "joined"]
    refused = Counter(o.got for o in outcomes if o.got != "joined")
    wrong = [o for o in outcomes if o.got != o.expected]
    lat = [o.seconds * 1000 for o in joined]
    expected_joins = sum(1 for o in outcomes if o.expected == "joined")
    c = stack.emulator.counters
    arm = sum(v for k, v in c.items() if k.startswith("arm.") and k != "arm.429")
    print("outcome                          count")
    print("-------------------------------- -----")
    print(f"{'joined':32} {len(joined):5}")
    for code, count in sorted(refused.items()):
        print(f"{'refused: ' + code:32} {count:5}")
    names = ", ".join(f"{o.name} ({o.got})" for o in outcomes if o.got != "joined")
    print(textwrap.fill(names, 88, initial_indent="refused VMs: ", subsequent_indent="  "))
    print()
    print(
        f"join latency (agent, ms)   p50 {_pct(lat, 50):7.1f}   p99 {_pct(lat, 99):7.1f}"
        f"   max {max(lat, default=0):7.1f}"
    )
    retried = sum(1 for o in joined if o.attempts > 1)
    print(f"joins needing a retry      {retried}")
    print(
        f"certificates issued        {issued['registrations']} registrations at the auth service,"
        f" {issued['verified_pairs']} X.509 + SSH pairs written and verified"
    )
    print(
        f"Azure calls (emulator)     ARM {arm}, Entra {c.get('entra.discovery', 0)} discovery"
        f" + {c.get('entra.jwks', 0)} JWKS, AIA {c.get('aia', 0)}, 429s {c.get('arm.429', 0)}"
    )
    print(
        f"time                       storm {storm:.2f} s, total {total:.2f} s "
        f"({len(joined) / storm:.0f} joins/s)\n"
    )
    # Refusals never reach the auth service; the replay's first join does (then its replay
    # is refused): one registration more than the fleet's joins.
    ok = (
        not wrong
        and issued["registrations"] == expected_joins + 1
        and issued["verified_pairs"] == expected_joins
    )
    for o in wrong:
        print(f"UNEXPECTED  {o.name}: expected {o.expected}, got {o.got}")
    print("every outcome as expected" if ok else "SOME OUTCOMES WERE NOT AS EXPECTED")
    return 0 if ok else 1
