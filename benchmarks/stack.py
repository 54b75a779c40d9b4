"""The join storm's system under test, as separate processes.

The emulator, the auth service and the gateway each run as their own ``python -m
gateway.cli`` process so the gateway's CPU accounting (``/proc/<pid>/stat`` of the
supervisor and its workers) holds the gateway's work and nothing else: the emulator's RSA
signing, the auth service's certificate issuing and the storm client all burn CPU
elsewhere. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.authservice import init_auth_dir
from gateway.core.config import (
    AiaConfig,
    AzureConfig,
    CacheConfig,
    ChallengeConfig,
    Config,
    ListenerConfig,
    MetricsConfig,
    TlsConfig,
    TokensConfig,
    UpstreamConfig,
    dump_config,
)
from gateway.core.tlsutil import generate_ca, issue_cert, write_pem_files
from gateway.dev.emulator.pki import INTERMEDIATE_CN
from gateway.dev.ports import free_port as free_port  # imported from here by tests
from gateway.join.challenge import write_new_keys_file

__all__ = [
    "EmulatorInfo",
    "FleetPlan",
    "GatewayFiles",
    "Proc",
    "StackError",
    "VmSpec",
    "fleet_plan",
    "free_port",
    "gateway_config",
    "make_gateway_files",
    "process_cpu_seconds",
    "start_auth",
    "start_emulator",
    "start_gateway",
    "start_redis",
    "tokens_yaml",
]

TOKEN_NAME = "azure-token"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class StackError(Exception):
    """A process of the stack did not come up (the harness failed, not the gateway)."""




@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    # Stopped after this one (the gateway's own Redis).
    companions: list[Proc] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for companion in self.companions:
            companion.stop(timeout)


def _spawn(
    name: str,
    args: Sequence[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    python_args: Sequence[str] = (),
) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, *python_args, "-m", "gateway.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    return Proc(name, popen, log_path)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        out += [int(p) for p in text.split()]
    return out


def _own_cpu(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may contain spaces: fields start after the closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def process_cpu_seconds(pid: int, *, with_children: bool = True) -> float:
    """CPU seconds the process (and, recursively, its live children) have used so far."""
    total = _own_cpu(pid)
    if with_children:
        for child in _children(pid):
            total += process_cpu_seconds(child)
    return total


# ------------------------------------------------------------------------------ fleet


@dataclass(frozen=True)
class VmSpec:
    """What the storm client needs of one emulated VM (from the emulator's INFO.json)."""

    name: str
    subscription: str
    resource_group: str
    identity: str
    client_id: str | None
    imds_url: str
    scale_set: str | None


@dataclass(frozen=True)
class EmulatorInfo:
    http_url: str
    https_url: str
    aia_prefix: str
    arm_audience: str
    tls_ca_pem: str
    attestation_root_pem: str
    tenants: tuple[str, ...]
    subscriptions: tuple[str, ...]
    vms: tuple[VmSpec, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmulatorInfo:
        return cls(
            http_url=str(data["http_url"]),
            https_url=str(data["https_url"]),
            aia_prefix=str(data["aia_prefix"]),
            arm_audience=str(data.get("arm_audience", "")),
            tls_ca_pem=str(data["tls_ca_pem"]),
            attestation_root_pem=str(data["attestation_root_pem"]),
            tenants=tuple(data["tenants"]),
            subscriptions=tuple(data["subscriptions"]),
            vms=tuple(
                VmSpec(
                    name=v["name"],
                    subscription=v["subscription"],
                    resource_group=v["resource_group"],
                    identity=v["identity"],
                    client_id=v.get("client_id"),
                    imds_url=v["imds_url"],
                    scale_set=v.get("scale_set"),
                )
                for v in data["vms"]
            ),
        )


@dataclass(frozen=True)
class FleetPlan:
    """The FLEET.yaml content and the shape it describes (for the report)."""

    spec: dict[str, Any]
    subscriptions: tuple[str, ...]
    resource_groups: int
    scale_set_sizes: tuple[int, ...] = field(default=())
    standalone: int = 0


# Scale-set sizes cycle through these (the issue: uniform scale sets of 200-1,000).
_SCALE_SET_SIZES = (1000, 400, 700, 200, 900, 300, 600, 500, 800)


def _guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def fleet_plan(
    vms: int, *, subscriptions: int = 5, resource_groups: int = 20, seed: int = 7
) -> FleetPlan:
    """Half the fleet in uniform scale sets of 200-1,000 instances (smaller only when the
    fleet is too small for one), half standalone VMs; 5 subscriptions, 20 resource groups;
    user- and system-assigned identities alternating by resource group / scale set.

    The standalone half is ``generate:``d by the emulator (``build_fleet``). Its tenant
    and subscription GUIDs come from a seeded RNG, replayed here so the scale sets can be
    placed in the same subscriptions; :func:`start_emulator` checks the two agree.
    """
    rng = random.Random(seed)
    tenant = _guid(rng)  # build_fleet draws the tenants first, then the subscriptions
    subs = tuple(_guid(rng) for _ in range(subscriptions))
    in_sets = vms // 2
    sizes: list[int] = []
    left = in_sets
    k = 0
    while left > 0:
        size = _SCALE_SET_SIZES[k % len(_SCALE_SET_SIZES)]
        if left - size < 200 or size > left:
            size = left  # the last set takes the remainder (keeps it >= 200 when possible)
        sizes.append(size)
        left -= size
        k += 1
    scale_sets: list[dict[str, Any]] = []
    for s, size in enumerate(sizes):
        rg = s % resource_groups
        ident = "system" if s % 2 else "user"
        entry: dict[str, Any] = {
            "name": f"ss-{s:04d}",
            "subscription": subs[rg % subscriptions],
            "resource_group": f"rg-{rg:03d}",
            "tenant": tenant,
            "capacity": size,
            "identity": ident,
        }
        if ident == "user":
            entry["client_id"] = _guid(rng)
        scale_sets.append(entry)
    spec: dict[str, Any] = {
        "generate": {
            "vms": vms - in_sets,
            "subscriptions": subscriptions,
            "resource_groups": resource_groups,
            "tenants": 1,
            "identity": "mixed",
            "seed": seed,
        },
        "scale_sets": scale_sets,
    }
    return FleetPlan(
        spec=spec,
        subscriptions=subs,
        resource_groups=resource_groups,
        scale_set_sizes=tuple(sizes),
        standalone=vms - in_sets,
    )


def tokens_yaml(subscriptions: Sequence[str]) -> str:
    allow = "\n".join(f"      - subscription: {s}" for s in subscriptions)
    return (
        "kind: token\nversion: v2\n"
        f"metadata: {{name: {TOKEN_NAME}}}\n"
        "spec:\n  roles: [Node]\n  join_method: azure\n  azure:\n    allow:\n"
        f"{allow}\n"
    )


# ------------------------------------------------------------------------- processes


def _wait(what: str, proc: Proc, ready: Any, within: float) -> None:
    """Until ``ready()``; a process that dies or never gets ready is stopped and reported."""
    deadline = time.monotonic() + within
    while True:
        if ready():
            return
        if not proc.alive():
            raise StackError(f"{what} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            proc.stop(timeout=10.0)
            raise StackError(f"{what} not ready after {within:.0f}s:\n{proc.log_tail()}")
        time.sleep(0.1)


def start_emulator(
    workdir: Path,
    plan: FleetPlan,
    *,
    signing_threads: int = 2,
    extra_args: Sequence[str] = (),
) -> tuple[Proc, EmulatorInfo]:
    """``join-gateway emulator --fleet FLEET.yaml`` with Azure-like latencies (its defaults)."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    fleet_file = workdir / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(plan.spec, sort_keys=False), encoding="utf-8")
    info_file = workdir / "emulator-info.json"
    info_file.unlink(missing_ok=True)
    proc = _spawn(
        "emulator",
        [
            "emulator",
            "--fleet",
            str(fleet_file),
            "--info-out",
            str(info_file),
            "--signing-threads",
            str(signing_threads),
            *extra_args,
        ],
        workdir / "emulator.log",
    )
    _wait("emulator", proc, info_file.exists, 300.0)
    info = EmulatorInfo.from_json(json.loads(info_file.read_text(encoding="utf-8")))
    if not set(plan.subscriptions) <= set(info.subscriptions):
        proc.stop()
        raise StackError("the emulator's generated subscriptions differ from the plan's")
    return proc, info


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class AuthEndpoint:
    url: str
    client_cert: Path
    client_key: Path
    cluster_ca: Path


def start_auth(workdir: Path, extra_args: Sequence[str] = ()) -> tuple[Proc, AuthEndpoint]:
    """``join-gateway auth serve`` on a fresh data dir (made with ``init_auth_dir``);
    ``extra_args``: its signing backend's flags, say."""
    data = workdir.resolve() / "auth"
    paths = init_auth_dir(data)
    port = free_port()
    proc = _spawn(
        "auth",
        ["auth", "serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}", *extra_args],
        workdir / "auth.log",
    )
    _wait("auth service", proc, lambda: _port_open(port), 60.0)
    return proc, AuthEndpoint(
        url=f"https://127.0.0.1:{port}",
        client_cert=paths.gateway_client_cert,
        client_key=paths.gateway_client_key,
        cluster_ca=paths.cluster_ca,
    )


@dataclass(frozen=True)
class GatewayFiles:
    """The gateway's TLS identity (ECDSA P-256 from a dev CA), keys and trust files."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    keys_file: Path
    emulator_root: Path
    emulator_tls_ca: Path


def make_gateway_files(workdir: Path, info: EmulatorInfo) -> GatewayFiles:
    gw = workdir.resolve() / "gateway-files"
    gw.mkdir(parents=True, exist_ok=True)
    ca = generate_ca("join-storm dev CA")
    ca_file, _ = write_pem_files(ca, gw, "gateway-ca")
    leaf = issue_cert(
        ca,
        common_name="127.0.0.1",
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
        server=True,
    )
    cert_file, key_file = write_pem_files(leaf, gw, "gateway")
    keys_file = gw / "challenge-keys"
    write_new_keys_file(keys_file, keep_existing=False)
    root = gw / "emulator-attestation-root.pem"
    root.write_text(info.attestation_root_pem, encoding="ascii")
    tls_ca = gw / "emulator-tls-ca.pem"
    tls_ca.write_text(info.tls_ca_pem, encoding="ascii")
    return GatewayFiles(ca_file, cert_file, key_file, keys_file, root, tls_ca)


def gateway_config(
    files: GatewayFiles,
    info: EmulatorInfo,
    auth: AuthEndpoint,
    token_file: Path,
    *,
    port: int,
    metrics_port: int,
    workers: int,
    naive: bool,
) -> Config:
    """The gateway pointed at the emulator by configuration only (as ``devstack`` does).

    ``naive``: ``cache.enabled: false`` — no caches, no coalescing, no ARM budget.
    """
    return Config(
        listeners=(ListenerConfig(address=f"127.0.0.1:{port}"),),
        tls=TlsConfig(cert_file=str(files.cert_file), key_file=str(files.key_file)),
        metrics=MetricsConfig(listen=f"127.0.0.1:{metrics_port}"),
        challenge=ChallengeConfig(keys_file=str(files.keys_file)),
        azure=AzureConfig(
            extra_ca_files=(str(files.emulator_root),),
            # The agents send the emulator's issuing CA: a name the gateway must know.
            known_issuer_names=(INTERMEDIATE_CN,),
            authority_host=info.https_url,
            arm_endpoint=info.https_url,
            outbound_ca_file=str(files.emulator_tls_ca),
            aia=AiaConfig(
                extra_allowed_prefixes=(info.aia_prefix,), allow_private_destinations=True
            ),
        ),
        tokens=TokensConfig(files=(str(token_file),)),
        upstream=UpstreamConfig(
            url=auth.url,
            client_cert_file=str(auth.client_cert),
            client_key_file=str(auth.client_key),
            ca_file=str(auth.cluster_ca),
        ),
        # Several workers share one replay store (a challenge is redeemed once across
        # them): start_gateway starts the Redis this points at.
        cache=CacheConfig(enabled=not naive, backend="redis" if workers > 1 else "memory"),
        workers=workers,
        shutdown_timeout_seconds=10.0,
    )


def _ready(url: str, ctx: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", context=ctx, timeout=2) as resp:  # noqa: S310
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_gateway(
    workdir: Path,
    config: Config,
    ca_file: Path,
    name: str,
    *,
    profile_to: Path | None = None,
    stages_to: Path | None = None,
    stage_interval_ms: float = 1.0,
) -> tuple[Proc, str]:
    """``join-gateway serve -c gateway.yaml`` (supervisor + workers); waits for /readyz.

    ``profile_to``: run it under ``cProfile`` (one worker only), stats written on SIGTERM.
    ``stages_to``: run it under ``benchmarks.stage_sampler``, per-stage CPU samples of
    every process written into that directory, one sample per ``stage_interval_ms`` of
    each process's CPU.
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    redis = None
    if config.cache.backend == "redis":
        redis, redis_url = start_redis(workdir, f"{name}-redis")
        config = dataclasses.replace(
            config, cache=dataclasses.replace(config.cache, redis_url=redis_url)
        )
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(dump_config(config), encoding="utf-8")
    prom = workdir / f"{name}-prom"
    prom.mkdir(exist_ok=True)
    proc = _spawn(
        name,
        ["serve", "-c", str(config_path)],
        workdir / f"{name}.log",
        env={"PROMETHEUS_MULTIPROC_DIR": str(prom), **_sampler_env(stages_to)},
        python_args=_gateway_python_args(profile_to, stages_to, stage_interval_ms),
    )
    if redis is not None:
        proc.companions.append(redis)
    url = f"https://{config.listeners[0].address}"
    ctx = ssl.create_default_context(cafile=str(ca_file))
    _wait("gateway", proc, lambda: _ready(url, ctx), 60.0)
    return proc, url


def _gateway_python_args(
    profile_to: Path | None, stages_to: Path | None, stage_interval_ms: float
) -> tuple[str, ...]:
    if profile_to is not None:
        return ("-m", "cProfile", "-o", str(profile_to.resolve()))
    if stages_to is not None:
        sampler = ("-m", "benchmarks.stage_sampler", "--out", str(stages_to.resolve()))
        return (*sampler, "--interval-ms", str(stage_interval_ms))
    return ()


def _sampler_env(stages_to: Path | None) -> dict[str, str]:
    """The sampler lives in this repository's benchmarks package: put it on the path."""
    if stages_to is None:
        return {}
    root = str(Path(__file__).resolve().parent.parent)
    return {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def start_redis(workdir: Path, name: str) -> tuple[Proc, str]:
    """``redis-server`` on a free loopback port, nothing persisted: the replay store the
    workers of a multi-worker gateway share. Returns the process and its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("several gateway workers need redis-server (apt-get install it)")
    port = free_port()
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    proc = Proc(name, popen, log_path)
    _wait("redis", proc, lambda: _port_open(port), 30.0)
    return proc, f"redis://127.0.0.1:{port}/0"
