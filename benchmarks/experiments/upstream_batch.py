"""Experiment: CPU per registration, one request each against registrations in batches.

    python benchmarks/experiments/upstream_batch.py --registrations 2000 --in-flight 256 \\
        --rounds 3

Starts the reference auth service (``join-gateway auth serve``, local CAs, SQLite registry)
as a subprocess on 127.0.0.1 with mTLS, and sends it ``--registrations`` registrations of
distinct VMs through one :class:`~gateway.join.forward.AuthClient` in this process,
``--in-flight`` at a time, on a pool warmed up beforehand (the production pool:
``upstream.max_connections`` 64). Each round runs both modes on fresh VMs — ``single``
(``batch=False``: ``upstream.batch: false``, one ``POST /v1/register`` per registration)
and ``batched`` (the default: ``POST /v1/register/batch``) — alternating which goes first.

Figures per mode, medians over the rounds: the client's process CPU per registration
(``time.process_time`` delta / N: the AuthClient, aiohttp, TLS, JSON — the gateway's share
of a join's upstream call), the auth service's CPU per registration (its process tree,
from /proc) and the HTTP requests sent; and each ratio against ``single`` of the same run.
The auth service's figure includes what batching cannot change (signing the certificates,
the registry's transactions, the audit line).

``--lone N`` then answers "a batch of one: which endpoint?": N registrations one after
the other (nothing else in flight), each POSTed by a bare aiohttp session on a warm
connection to ``/v1/register`` and, as a batch of one, to ``/v1/register/batch``; client
and auth service CPU per registration, medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages first
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: E402

from benchmarks.stack import AuthEndpoint, process_cpu_seconds, start_auth  # noqa: E402
from gateway.core.clock import SystemClock  # noqa: E402
from gateway.core.tlsutil import client_ssl_context  # noqa: E402
from gateway.join.forward import AuthClient  # noqa: E402
from gateway.protocol import (  # noqa: E402
    REGISTER_BATCH_PATH,
    REGISTER_PATH,
    HostParams,
    JoinBlock,
    Registration,
)

MODES = ("single", "batched")
_KEY_POOL = 32  # node key pairs, reused across VMs (the auth service does not care)


def _key_pool() -> list[tuple[str, str]]:
    pool = []
    for _ in range(_KEY_POOL):
        tls = ec.generate_private_key(ec.SECP256R1()).public_key()
        ssh = ed25519.Ed25519PrivateKey.generate().public_key()
        pool.append(
            (
                tls.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ).decode(),
                ssh.public_bytes(
                    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                ).decode(),
            )
        )
    return pool


def registrations(prefix: int, n: int, pool: list[tuple[str, str]]) -> list[Registration]:
    """``n`` registrations of distinct new VMs (``prefix`` keeps runs apart)."""
    base = Registration(
        idempotency_key="x",
        token_name="azure-token",
        role="Node",
        client_address="203.0.113.7",
        join=JoinBlock(
            method="azure",
            tenant="44444444-4444-4444-4444-444444444444",
            subscription="11111111-1111-1111-1111-111111111111",
            resource_group="group1",
            vm_id="x",
            resource_id="/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/"
            "group1/providers/Microsoft.Compute/virtualMachines/vm",
        ),
        host=HostParams(
            node_name="x",
            role="Node",
            public_ssh_key=pool[0][1],
            public_tls_key=pool[0][0],
            additional_principals=("10.1.2.3",),
            dns_names=("vm.internal",),
        ),
    )
    out = []
    for i in range(n):
        tls, ssh = pool[i % len(pool)]
        vm = f"{prefix:08d}-2222-2222-2222-{i:012d}"
        out.append(
            replace(
                base,
                idempotency_key=f"bench-{prefix}-{i}",
                join=replace(base.join, vm_id=vm),
                host=replace(
                    base.host, node_name=f"vm-{prefix}-{i}", public_ssh_key=ssh, public_tls_key=tls
                ),
            )
        )
    return out


@dataclass(frozen=True)
class Run:
    mode: str
    client_us: float  # client process CPU per registration, microseconds
    auth_us: float  # auth service CPU per registration, microseconds
    requests: int
    wall: float  # seconds (for the record: the machine is shared)


async def _drive(client: AuthClient, regs: list[Registration], in_flight: int) -> None:
    it = iter(regs)

    async def worker() -> None:
        for reg in it:
            await client.register(reg)

    await asyncio.gather(*(worker() for _ in range(in_flight)))


async def one_run(
    mode: str,
    auth: AuthEndpoint,
    auth_pid: int,
    warmup: list[Registration],
    regs: list[Registration],
    in_flight: int,
) -> Run:
    ctx = client_ssl_context(auth.cluster_ca, cert_file=auth.client_cert, key_file=auth.client_key)
    requests = 0

    async def on_request_start(*_: object) -> None:
        nonlocal requests
        requests += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    # As production_deps opens it: its own pooled session (upstream.max_connections 64).
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, ssl=ctx), trust_env=False, trace_configs=[trace]
    ) as session:
        client = AuthClient(
            url=auth.url,
            ssl_context=ctx,
            clock=SystemClock(),
            # CPU is measured, not latency: on a busy machine 256 registrations in flight
            # may wait longer than production's 10 s, and a timeout would end the run.
            timeout=300.0,
            session=session,
            batch=mode == "batched",
        )
        await _drive(client, warmup, in_flight)  # the pool's connections, opened once
        requests = 0
        auth_cpu = process_cpu_seconds(auth_pid)
        cpu, wall = time.process_time(), time.monotonic()
        await _drive(client, regs, in_flight)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        auth_cpu = process_cpu_seconds(auth_pid) - auth_cpu
        await client.aclose()
    n = len(regs)
    return Run(mode, cpu / n * 1e6, auth_cpu / n * 1e6, requests, wall)


async def lone_run(
    path: str, auth: AuthEndpoint, auth_pid: int, regs: list[Registration]
) -> tuple[float, float]:
    """Client and auth service CPU (µs) per registration, sent one after the other to
    ``path`` (a batch of one on the batch path)."""
    ctx = client_ssl_context(auth.cluster_ca, cert_file=auth.client_cert, key_file=auth.client_key)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    bodies = [
        json.dumps({"registrations": [r.to_json()]} if path == REGISTER_BATCH_PATH else r.to_json())
        for r in regs
    ]
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1, ssl=ctx), trust_env=False
    ) as session:

        async def post(body: str) -> None:
            async with session.post(auth.url + path, data=body, headers=headers) as resp:
                await resp.read()
                assert resp.status == 200, resp.status

        await post(bodies[0])  # the connection, opened once
        auth_cpu = process_cpu_seconds(auth_pid)
        cpu = time.process_time()
        for body in bodies[1:]:
            await post(body)
        cpu = time.process_time() - cpu
        auth_cpu = process_cpu_seconds(auth_pid) - auth_cpu
    n = len(bodies) - 1
    return cpu / n * 1e6, auth_cpu / n * 1e6


async def experiment(args: argparse.Namespace, workdir: Path) -> list[list[Run]]:
    proc, auth = start_auth(workdir)
    pool = _key_pool()
    rounds: list[list[Run]] = []
    prefix = 10_000_000
    try:
        for r in range(args.rounds):
            runs = []
            order = MODES if r % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                prefix += 1
                warmup = registrations(prefix, args.in_flight, pool)
                prefix += 1
                regs = registrations(prefix, args.registrations, pool)
                run = await one_run(mode, auth, proc.popen.pid, warmup, regs, args.in_flight)
                print(
                    f"round {r + 1} {mode:8s} client {run.client_us:7.1f} us/reg  "
                    f"auth {run.auth_us:7.1f} us/reg  requests {run.requests}  "
                    f"wall {run.wall:.1f} s",
                    flush=True,
                )
                runs.append(run)
            rounds.append(sorted(runs, key=lambda x: MODES.index(x.mode)))
        if args.lone:
            lone: dict[str, list[tuple[float, float]]] = {
                REGISTER_PATH: [],
                REGISTER_BATCH_PATH: [],
            }
            for r in range(args.rounds):
                paths = [REGISTER_PATH, REGISTER_BATCH_PATH]
                for path in paths if r % 2 == 0 else reversed(paths):
                    prefix += 1
                    regs = registrations(prefix, args.lone + 1, pool)
                    lone[path].append(await lone_run(path, auth, proc.popen.pid, regs))
                    c, a = lone[path][-1]
                    print(f"lone round {r + 1} {path:20s} client {c:6.1f} us  auth {a:7.1f} us")
            print(f"\nlone registrations, medians of {args.rounds} rounds, {args.lone} each")
            for path, figures in lone.items():
                c = statistics.median(f[0] for f in figures)
                a = statistics.median(f[1] for f in figures)
                print(f"{path:20s} client {c:6.1f} us/reg  auth {a:7.1f} us/reg")
    finally:
        proc.stop()
    return rounds


def report(rounds: list[list[Run]], n: int) -> None:
    med: dict[str, tuple[float, float, float]] = {}
    for mode in MODES:
        runs = [run for rnd in rounds for run in rnd if run.mode == mode]
        med[mode] = (
            statistics.median(r.client_us for r in runs),
            statistics.median(r.auth_us for r in runs),
            statistics.median(r.requests for r in runs),
        )
    base = med["single"]
    print(f"\nmedians of {len(rounds)} rounds, {n} registrations each")
    print(
        f"{'mode':8s} {'client us/reg':>14s} {'ratio':>6s} {'auth us/reg':>12s} {'ratio':>6s}"
        f" {'requests':>9s}"
    )
    for mode in MODES:
        c, a, q = med[mode]
        print(f"{mode:8s} {c:14.1f} {c / base[0]:6.2f} {a:12.1f} {a / base[1]:6.2f} {q:9.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registrations", type=int, default=2000)
    p.add_argument("--in-flight", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lone", type=int, default=0, help="lone registrations per endpoint")
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the gateway's own loop; asyncio's otherwise
        runner = asyncio.run
    else:
        runner = uvloop.run
    with tempfile.TemporaryDirectory(prefix="upstream-batch-") as tmp:
        rounds = runner(experiment(args, Path(tmp)))
    report(rounds, args.registrations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
