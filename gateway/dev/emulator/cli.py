"""``join-gateway emulator``: the Azure emulator as its own process.

Starts :class:`~gateway.dev.emulator.server.AzureEmulator`, builds a fleet (from a FLEET.yaml or
from ``--vms`` and friends), writes INFO.json (URLs, trust material, tenants, every VM) for
the demo, benchmarks and agents in other processes, then runs until SIGTERM/SIGINT.

``gateway/cli.py`` wires it as ``sub.add_parser("emulator")`` + :func:`add_arguments`, and
``cmd_emulator`` returns :func:`run`. Exit codes: 0 ok, 2 bad fleet/arguments, 3 could not
start (port taken).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import yaml

from .fleet import Fleet, apply_fleet_spec, build_fleet
from .model import ArmLimits, Latency
from .server import AzureEmulator

__all__ = ["CLOUD_DOMAINS", "add_arguments", "run"]

log = logging.getLogger(__name__)

CLOUD_DOMAINS = {
    "public": "metadata.azure.com",
    "usgov": "metadata.azure.us",
    "china": "metadata.azure.cn",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``emulator`` subcommand's options."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--fleet", type=Path, metavar="FLEET.yaml", help="fleet description")
    src.add_argument("--vms", type=int, metavar="N", help="generate a fleet of N VMs")
    parser.add_argument("--subscriptions", type=int, default=1)
    parser.add_argument("--resource-groups", type=int, default=1)
    parser.add_argument("--tenants", type=int, default=1)
    parser.add_argument("--scale-set-fraction", type=float, default=0.0)
    parser.add_argument("--scale-set-capacity", type=int, default=10)
    parser.add_argument("--identity", choices=("user", "system", "mixed"), default="user")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--info-out", type=Path, required=True, metavar="INFO.json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--https-port", type=int, default=0)
    parser.add_argument("--cloud", choices=sorted(CLOUD_DOMAINS), default="public")
    parser.add_argument("--page-size", type=int, default=50)
    parser.add_argument(
        "--signing-threads",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="threads that sign IMDS documents and tokens (0: on the event loop)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="keep the attestation CAs and TLS material here across restarts",
    )
    defaults = Latency()
    for service in ("arm", "entra", "aia", "imds"):
        parser.add_argument(
            f"--latency-{service}-ms",
            type=float,
            default=getattr(defaults, service) * 1000.0,
            help=f"added latency for {service} (ms)",
        )
    limits = ArmLimits()
    parser.add_argument("--arm-read-burst", type=int, default=limits.read_burst)
    parser.add_argument("--arm-read-per-second", type=float, default=limits.read_per_second)
    parser.add_argument("--arm-list-per-minute", type=int, default=limits.list_per_minute)


def run(args: argparse.Namespace) -> int:
    """Run the emulator until SIGTERM/SIGINT; returns the exit code."""
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:  # pragma: no cover - the handler normally catches it
        return 0


def _build(emu: AzureEmulator, args: argparse.Namespace) -> Fleet:
    if args.fleet is not None:
        with args.fleet.open(encoding="utf-8") as fh:
            spec = yaml.safe_load(fh) or {}
        return apply_fleet_spec(emu, spec)
    return build_fleet(
        emu,
        vms=args.vms,
        subscriptions=args.subscriptions,
        resource_groups=args.resource_groups,
        scale_set_fraction=args.scale_set_fraction,
        scale_set_capacity=args.scale_set_capacity,
        tenants=args.tenants,
        identity=args.identity,
        seed=args.seed,
    )


def _write_info(path: Path, info: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


async def _serve(args: argparse.Namespace) -> int:
    emu = AzureEmulator(
        host=args.host,
        http_port=args.http_port,
        https_port=args.https_port,
        latency=Latency(
            arm=args.latency_arm_ms / 1000.0,
            entra=args.latency_entra_ms / 1000.0,
            aia=args.latency_aia_ms / 1000.0,
            imds=args.latency_imds_ms / 1000.0,
        ),
        page_size=args.page_size,
        state_dir=args.state_dir,
        signing_threads=args.signing_threads,
        cloud_domain=CLOUD_DOMAINS[args.cloud],
        arm_limits=ArmLimits(
            read_burst=args.arm_read_burst,
            read_per_second=args.arm_read_per_second,
            list_per_minute=args.arm_list_per_minute,
        ),
    )
    try:
        await emu.start()
    except OSError as exc:
        log.error("emulator could not start: %s", exc)
        return 3
    try:
        try:
            fleet = _build(emu, args)
        except (OSError, ValueError, TypeError, yaml.YAMLError) as exc:
            log.error("bad fleet: %s", exc)
            return 2
        info = emu.info()
        info["subscriptions"] = list(fleet.subscriptions)
        info["resource_groups"] = [list(rg) for rg in fleet.resource_groups]
        _write_info(args.info_out, info)
        log.info("emulator ready: %s VMs, info in %s", len(fleet.vms), args.info_out)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        await emu.aclose()
