"""``join-gateway join`` and ``join-gateway agent``: the agent's command line.

Only glue: parse flags, build :class:`AgentSettings` from the node config plus overrides, run
:func:`run_join` once (``join``) or the renewal loop :class:`NodeAgent` (``agent``).
Exit codes: 0 joined (``agent``: stopped by a signal), 1 the join failed (the error code is
printed), 2 the config or a flag is wrong, 4 (``agent``) the gateway refused the node for
good (see :mod:`gateway.agent.renew`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.agent.errors import AgentError, JoinFailed, NodeConfigError
from gateway.agent.nodeconfig import AgentSettings, load_node_config
from gateway.agent.renew import EXIT_REFUSED, NodeAgent
from gateway.agent.runner import run_join

__all__ = [
    "EXIT_REFUSED",
    "add_agent_arguments",
    "add_arguments",
    "build_settings",
    "run",
    "run_agent",
]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``join`` subcommand's flags to ``parser``."""
    parser.add_argument("--config", required=True, type=Path, help="node config (YAML)")
    parser.add_argument("--imds-url", help="IMDS base URL (default http://169.254.169.254)")
    parser.add_argument("--ca-file", type=Path, help="extra CA certificates for the gateway's TLS")
    parser.add_argument("--data-dir", type=Path, help="where keys and certificates are kept")
    parser.add_argument("--local-addr", help="source IP for outgoing connections")
    parser.add_argument("--max-attempts", type=int, help="attempts before giving up")
    parser.add_argument("--total-timeout", type=float, help="seconds before giving up")
    parser.add_argument(
        "--node-name",
        help="node name to ask for (default: teleport.nodename; unset, the gateway names the "
        "node after the VM's Azure name)",
    )
    parser.add_argument(
        "--principal",
        action="append",
        default=[],
        dest="principals",
        help="additional principal (repeatable)",
    )
    parser.add_argument(
        "--dns-name", action="append", default=[], dest="dns_names", help="DNS name (repeatable)"
    )
    parser.add_argument(
        "--aia-allow-prefix",
        action="append",
        default=[],
        dest="aia_prefixes",
        help="also fetch intermediates from URLs under this prefix (repeatable)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="progress is logged at INFO (never tokens or keys)",
    )
    parser.add_argument(
        "--no-intermediates",
        action="store_true",
        help="do not collect the attested document's intermediates",
    )


def build_settings(args: argparse.Namespace) -> AgentSettings:
    """The node config with the command line's overrides applied."""
    settings = load_node_config(args.config)
    overrides: dict[str, Any] = {}
    if args.imds_url:
        overrides["imds_url"] = args.imds_url
    if args.ca_file is not None:
        overrides["ca_file"] = args.ca_file
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.local_addr:
        overrides["local_addr"] = args.local_addr
    if args.max_attempts is not None:
        overrides["max_attempts"] = args.max_attempts
    if args.total_timeout is not None:
        overrides["total_timeout"] = args.total_timeout
    if args.node_name:
        overrides["node_name"] = args.node_name
    if args.principals:
        overrides["additional_principals"] = tuple(args.principals)
    if args.dns_names:
        overrides["dns_names"] = tuple(args.dns_names)
    if args.aia_prefixes:
        overrides["aia_allowed_prefixes"] = settings.aia_allowed_prefixes + tuple(args.aia_prefixes)
    if args.no_intermediates:
        overrides["collect_intermediates"] = False
    return dataclasses.replace(settings, **overrides)


def run(args: argparse.Namespace) -> int:
    """Run the join; the process exit code."""
    try:
        settings = build_settings(args)
    except NodeConfigError as exc:
        print(f"join-gateway join: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        outcome = asyncio.run(run_join(settings))
    except NodeConfigError as exc:
        print(f"join-gateway join: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except JoinFailed as exc:
        print(f"join failed: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except AgentError as exc:
        print(f"join failed: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"joined: host_id={outcome.host_id} attempts={outcome.attempts} "
        f"data_dir={settings.data_dir}"
    )
    return EXIT_OK


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``agent`` subcommand: ``join``'s flags plus the renewal's own."""
    add_arguments(parser)
    parser.add_argument(
        "--retry-cap",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="longest wait between failed renewals (exponential backoff up to this; default 300)",
    )


def run_agent(args: argparse.Namespace) -> int:
    """Keep the node's identity fresh until SIGTERM; the process exit code."""
    try:
        settings = build_settings(args)
    except NodeConfigError as exc:
        print(f"join-gateway agent: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    if args.retry_cap <= 0:
        print("join-gateway agent: --retry-cap must be > 0", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_agent(NodeAgent(settings, retry_cap=args.retry_cap)))


async def _agent(agent: NodeAgent) -> int:
    loop = asyncio.get_running_loop()
    handlers = {
        signal.SIGHUP: agent.renew_now,
        signal.SIGTERM: agent.stop,
        signal.SIGINT: agent.stop,
    }
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)  # handlers only record; the loop acts
    try:
        return await agent.run()
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)
