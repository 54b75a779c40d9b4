"""``join-gateway``: one entry point, argparse sub-commands.

Each ``cmd_<name>(args) -> int`` only parses, builds ``Config`` and calls library code.
Exit codes: 0 ok, 1 failure, 2 usage, 3 startup failure. A sub-command's module is
imported only when that sub-command runs (``serve`` never loads the emulator).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import __version__

__all__ = ["main"]

log = logging.getLogger("gateway.cli")

Configure = Callable[[argparse.ArgumentParser], None]


class _Formatter(logging.Formatter):
    """``logging.Formatter``'s default ``asctime``, its date and time worked out once a
    second: ``time.strftime`` of ``localtime`` was over a third of an audit line's cost
    (one line per join). The text is the default's, byte for byte."""

    _second: int | None = None
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._text},{int(record.msecs):03d}"  # default_msec_format, "%s,%03d"


def _setup_logging(level: str) -> None:
    # The format below shows no thread, process or multiprocessing name: do not look
    # them up for every record (a ``getpid`` system call among them).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


# --- serve / check-config --------------------------------------------------------------


def _configure_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="gateway.yaml")
    p.add_argument("--workers", type=int, help="worker processes (overrides the config)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    p.set_defaults(func=cmd_serve)


def _load(args: argparse.Namespace) -> object:
    from gateway.core.config import ConfigError, check_single_use, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"join-gateway: {exc}", file=sys.stderr)
        return None
    if getattr(args, "workers", None):
        cfg = dataclasses.replace(cfg, workers=args.workers)
        try:
            check_single_use(cfg, f"--workers {args.workers}")
        except ConfigError as exc:
            print(f"join-gateway: {exc}", file=sys.stderr)
            return None
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.core.config import Config

    cfg = _load(args)
    if not isinstance(cfg, Config):
        return 3
    _setup_logging(args.log_level or cfg.log_level)
    metrics_dir = None
    if cfg.workers > 1:
        from gateway.server.supervisor import prepare_multiprocess_metrics

        # Before anything imports prometheus_client: it picks its value class at import.
        metrics_dir = prepare_multiprocess_metrics()
    from gateway.server.serve import run

    return run(cfg, metrics_dir=metrics_dir)


def _configure_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="gateway.yaml")
    p.set_defaults(func=cmd_check_config)


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.core.config import Config, ConfigError
    from gateway.join.challenge import load_keys_file
    from gateway.join.deps import (
        load_tokens,
        outbound_ssl_context,
        trust_store,
        upstream_ssl_context,
    )

    cfg = _load(args)
    if not isinstance(cfg, Config):
        return 1
    problems: list[str] = []
    try:
        tokens = load_tokens(cfg)
        print(f"tokens: {', '.join(sorted(tokens.current.names())) or '(none)'}")
        for token in tokens.current:
            print(f"token {token.name!r} ({token.join_method}, roles {', '.join(token.roles)}):")
            for i, rule in enumerate(token.allow):
                print(f"  rule {i}: {rule.describe()}")
            if token.labels_from_tags:
                print(f"  labels from tags: {', '.join(token.labels_from_tags)}")
            if token.join_method == "azure":
                print(f"  names: {token.names.describe()}")
    except (ConfigError, OSError) as exc:
        problems.append(str(exc))
    try:
        keys = load_keys_file(cfg.path(cfg.challenge.keys_file))
        print(f"challenge keys: {len(keys)}")
    except (OSError, ValueError) as exc:
        problems.append(f"challenge.keys_file: {exc}")
    for name in (cfg.tls.cert_file, cfg.tls.key_file):
        if not cfg.path(name).is_file():
            problems.append(f"tls: {cfg.path(name)} does not exist")
    # What `serve` reads before it opens anything: the same functions, so a file that
    # would stop the start is found here.
    for what, build in (
        ("azure.extra_ca_files", trust_store),
        ("azure.outbound_ca_file", outbound_ssl_context),
        ("upstream TLS files", upstream_ssl_context),
    ):
        try:
            build(cfg)
        except (OSError, ValueError) as exc:
            problems.append(f"{what}: {exc}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.config}: ok (cloud {cfg.azure.cloud}, {len(cfg.listeners)} listener(s))")
    return 1 if problems else 0


# --- challenge keys ----------------------------------------------------------------------


def _configure_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=["new", "add", "promote", "retire", "rotate"],
        help="new: a fresh file; add: append a key that only verifies; promote: the last "
        "key signs; retire: drop all but the signing key; rotate: prepend a signing key "
        "at once (one replica only)",
    )
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_challenge_keys)


def cmd_challenge_keys(args: argparse.Namespace) -> int:
    from gateway.join.challenge import (
        load_keys_file,
        promote_key,
        retire_keys,
        stage_key,
        write_new_keys_file,
    )

    if args.action == "new" and args.file.exists():
        print(f"join-gateway: {args.file} exists; use add/promote/retire", file=sys.stderr)
        return 1
    try:
        if args.action in ("new", "rotate"):
            write_new_keys_file(args.file, keep_existing=args.action == "rotate")
        elif args.action == "add":
            stage_key(args.file)
        elif args.action == "promote":
            promote_key(args.file)
        else:
            retire_keys(args.file)
    except (OSError, ValueError) as exc:
        print(f"join-gateway: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: {len(load_keys_file(args.file))} key(s); the first one signs")
    return 0


# --- status ------------------------------------------------------------------------------


def _configure_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--auth-data-dir", type=Path, help="the auth service's data directory")
    p.add_argument("--gateway", help="gateway base URL, e.g. https://gw.example.com")
    p.add_argument("--ca-file", type=Path, help="CA to trust for the gateway's TLS")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    if not args.auth_data_dir and not args.gateway:
        print("join-gateway status: give --auth-data-dir and/or --gateway", file=sys.stderr)
        return 2
    rc = 0
    if args.auth_data_dir:
        from gateway.authservice import ca_pins_for_data_dir

        try:
            pins = ca_pins_for_data_dir(args.auth_data_dir)
            print(f"CA pin: {pins.ca_pin}")
            # The node config's teleport.ssh_ca_pin.
            print(f"SSH CA pin: {pins.ssh_ca_pin}")
            print(f"CA backend: {pins.backend}")
        except (OSError, ValueError, KeyError) as exc:
            print(f"auth service: {exc}", file=sys.stderr)
            rc = 1
    if args.gateway:
        rc = max(rc, asyncio.run(_gateway_status(args.gateway, args.ca_file)))
    return rc


async def _gateway_status(url: str, ca_file: Path | None) -> int:
    import aiohttp

    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url.rstrip("/") + "/readyz", ssl=ctx) as resp,
        ):
            body = await resp.json(content_type=None)
            print(f"gateway {url}: {json.dumps(body)}")
            return 0 if resp.status == 200 else 1
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        print(f"gateway {url}: unreachable: {exc}", file=sys.stderr)
        return 1


# --- dev ---------------------------------------------------------------------------------


def _configure_dev(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, type=Path, help="keys, configs, stack.json")
    p.add_argument("--vms", type=int, default=3, help="emulated VMs to offer (default 3)")
    p.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="gateway worker processes; more than 1 shares the replay store in a private "
        "redis-server (needs redis-server installed)",
    )
    p.add_argument(
        "--ca-backend",
        choices=("local", "vault"),
        default="local",
        help="vault: the auth service signs through a throwaway `bao server -dev` "
        "(needs OpenBao's bao on PATH)",
    )
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    p.set_defaults(func=cmd_dev)


def cmd_dev(args: argparse.Namespace) -> int:
    if args.vms < 0 or args.gateway_workers < 1:
        print("join-gateway dev: --vms must be >= 0 and --gateway-workers >= 1", file=sys.stderr)
        return 2
    from gateway.dev.devstack import run_dev

    try:
        return asyncio.run(
            run_dev(
                args.workdir.resolve(),
                vms=args.vms,
                gateway_workers=args.gateway_workers,
                ca_backend=args.ca_backend,
            )
        )
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"join-gateway dev: failed to start: {exc}", file=sys.stderr)
        return 3


# --- agent / install ---------------------------------------------------------------------


def _configure_agent(p: argparse.ArgumentParser) -> None:
    from gateway.agent.cli import add_agent_arguments, run_agent

    add_agent_arguments(p)
    p.set_defaults(func=run_agent)


def _configure_install(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="install_target", required=True, metavar="{systemd}")
    unit = sub.add_parser("systemd", help="a systemd unit running `join-gateway agent`")
    unit.add_argument("--config", required=True, type=Path, help="the node config (YAML)")
    unit.add_argument("-o", "--output", type=Path, help="write the unit here (default: print)")
    unit.add_argument("--data-dir", type=Path, help="override teleport.data_dir")
    unit.add_argument("--executable", type=Path, help="join-gateway to run (default: this one)")
    p.set_defaults(func=cmd_install)


def cmd_install(args: argparse.Namespace) -> int:
    from gateway.agent.errors import NodeConfigError
    from gateway.agent.nodeconfig import load_node_config
    from gateway.agent.systemd import UNIT_NAME, default_executable, render_unit, unit_warnings
    from gateway.core.files import write_atomic

    config = args.config.absolute()
    try:
        settings = load_node_config(config)
    except NodeConfigError as exc:
        print(f"join-gateway install: {exc.message}", file=sys.stderr)
        return 2
    executable = args.executable or default_executable()
    if executable is None:
        print(
            "join-gateway install: join-gateway is not installed; give --executable",
            file=sys.stderr,
        )
        return 2
    data_dir = (args.data_dir or settings.data_dir).absolute()
    try:
        text = render_unit(executable=executable.absolute(), config=config, data_dir=data_dir)
    except ValueError as exc:
        print(f"join-gateway install: {exc}", file=sys.stderr)
        return 2
    for warning in unit_warnings(executable=executable.absolute(), config=config):
        print(f"join-gateway install: warning: {warning}", file=sys.stderr)
    if args.output is None:
        print(text, end="")
        return 0
    try:
        # A unit file is configuration, not a secret: systemd and admins read it.
        write_atomic(args.output, text.encode(), mode=0o644, make_parents=True)
    except OSError as exc:
        print(f"join-gateway install: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output}; install it as /etc/systemd/system/{UNIT_NAME}, then "
        f"`systemctl daemon-reload && systemctl enable --now {UNIT_NAME}`"
    )
    return 0


# --- delegated sub-commands ------------------------------------------------------------


def _delegate(module: str) -> Configure:
    def configure(p: argparse.ArgumentParser) -> None:
        import importlib

        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)

    return configure


COMMANDS: dict[str, tuple[str, Configure]] = {
    "serve": ("run the gateway", _configure_serve),
    "join": ("join this VM once (the agent)", _delegate("gateway.agent.cli")),
    "agent": ("join this VM and keep its certificates renewed", _configure_agent),
    "install": ("install the agent as a service (systemd unit)", _configure_install),
    "auth": ("the reference auth service", _delegate("gateway.authservice.cli")),
    "emulator": (
        "an Azure emulator for tests, demos and benchmarks",
        _delegate("gateway.dev.emulator.cli"),
    ),
    "status": ("the auth service's CA pins and the gateway's health", _configure_status),
    "nodes": (
        "the auth service's inventory of hosts, and locks (admin API)",
        _delegate("gateway.authservice.nodes_cli"),
    ),
    "dev": (
        "the whole system on loopback (emulator, auth service, gateway) until stopped; "
        "writes WORKDIR/stack.json for joining emulated VMs by hand",
        _configure_dev,
    ),
    "demo": (
        "everything on loopback, then a fleet of emulated VMs joins",
        _delegate("gateway.dev.demo"),
    ),
    "inspect": (
        "verify a captured attested document and/or token, step by step",
        _delegate("gateway.join.inspect"),
    ),
    "rules": (
        "explain which allow rule admits a VM, or why none does",
        _delegate("gateway.join.explain"),
    ),
    "check-config": ("validate gateway.yaml, token files and keys", _configure_check),
    "challenge-keys": ("create or rotate the challenge keys file", _configure_keys),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="join-gateway", description="Azure join gateway")
    parser.add_argument("--version", action="version", version=f"join-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            configure(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command not in ("serve",):
        _setup_logging(getattr(args, "log_level", None) or "WARNING")
    result = args.func(args)
    return int(result)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
