"""``join-gateway nodes …``: the inventory and the locks, through the admin API (mTLS).

On the auth service's host, ``--data-dir D`` is enough: the URL comes from ``D/auth.url``
(written by ``auth serve`` once it listens) and the admin certificate from
``D/tls/admin*.pem`` (written by ``auth init``). Elsewhere pass ``--auth-url``, ``--cert``,
``--key`` and ``--ca``.

Exit codes: 0 done, 1 the auth service refused or is unreachable, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from gateway.authservice.authority import AuthPaths
from gateway.core.tlsutil import client_ssl_context

__all__ = ["add_arguments", "parse_duration", "run"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d`` → seconds (argparse type)."""
    match = _DURATION.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 24h, 7d")
    return float(match.group(1)) * _UNIT[match.group(2)]


def _label_arg(text: str) -> str:
    """``KEY=VALUE`` (argparse type): a label the hosts listed must carry."""
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    conn = p.add_argument_group("connection")
    conn.add_argument("--data-dir", type=Path, help="the auth service's data dir (this host)")
    conn.add_argument("--auth-url", help="https://auth:3025")
    conn.add_argument("--cert", type=Path, help="admin client certificate")
    conn.add_argument("--key", type=Path, help="admin client key")
    conn.add_argument("--ca", type=Path, help="CA of the auth service's certificate")
    sub = p.add_subparsers(dest="nodes_command", required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", help="list hosts")
    ls.add_argument("--json", action="store_true")
    ls.add_argument(
        "--stale",
        type=parse_duration,
        metavar="DURATION",
        help="only hosts not renewed for DURATION",
    )
    ls.add_argument("--labels", action="store_true", help="add a LABELS column")
    ls.add_argument(
        "--label",
        action="append",
        default=[],
        type=_label_arg,
        metavar="KEY=VALUE",
        help="only hosts with this label (repeatable: every one must match)",
    )
    show = sub.add_parser("show", help="one host")
    show.add_argument("host_id")
    lock = sub.add_parser("lock", help="refuse joins by host, VM, subscription or token")
    target = lock.add_mutually_exclusive_group(required=True)
    target.add_argument("host_id", nargs="?", help="a host ID")
    target.add_argument("--vm-id")
    target.add_argument("--subscription")
    target.add_argument("--token", help="a token name")
    lock.add_argument("--reason", required=True)
    lock.add_argument("--ttl", type=parse_duration, metavar="DURATION")
    sub.add_parser("locks", help="the locks in force")
    unlock = sub.add_parser("unlock", help="remove a lock")
    unlock.add_argument("lock_id")
    rm = sub.add_parser("rm", help="remove a host (its VM joins again as a new host)")
    rm.add_argument("host_id")
    prune = sub.add_parser("prune", help="remove hosts not renewed for DURATION")
    prune.add_argument("--stale", type=parse_duration, required=True, metavar="DURATION")


@dataclass(frozen=True)
class _Conn:
    url: str
    ssl: ssl.SSLContext


def _connection(args: argparse.Namespace) -> _Conn:
    url, cert, key, ca = args.auth_url, args.cert, args.key, args.ca
    if args.data_dir is not None:
        paths = AuthPaths.for_dir(args.data_dir)
        url_file = args.data_dir / "auth.url"
        if url is None:
            if not url_file.is_file():
                raise ValueError(f"{url_file} does not exist: is the auth service running?")
            url = url_file.read_text(encoding="utf-8").strip()
        cert, key, ca = cert or paths.admin_cert, key or paths.admin_key, ca or paths.cluster_ca
    if not (url and cert and key and ca):
        raise ValueError("give --data-dir, or --auth-url with --cert, --key and --ca")
    return _Conn(
        url=url.rstrip("/"), ssl=client_ssl_context(ca_file=ca, cert_file=cert, key_file=key)
    )


async def _call(conn: _Conn, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    timeout = aiohttp.ClientTimeout(total=15)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(method, conn.url + path, json=body, ssl=conn.ssl) as resp,
    ):
        data = await resp.json(content_type=None)
        if resp.status >= 400:
            err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
            raise RuntimeError(f"{resp.status} {err.get('code', '?')}: {err.get('message', '')}")
        return data


_COLUMNS = (
    ("HOST ID", "host_id"),
    ("NODE", "node_name"),
    ("TENANT", "tenant"),
    ("SUBSCRIPTION", "subscription"),
    ("GROUP", "resource_group"),
    ("VM", "vm_name"),
    ("VM ID", "vm_id"),
    ("FIRST JOINED", "first_joined"),
    ("LAST RENEWED", "last_renewed"),
    ("CERT EXPIRY", "cert_expiry"),
    ("LOCKED", "locked"),
)


def _table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> str:
    cells = [[h for h, _ in columns]]
    cells += [
        [
            "yes" if r.get(k) is True else "" if r.get(k) in (None, False) else str(r.get(k))
            for _, k in columns
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


async def _run(args: argparse.Namespace, conn: _Conn) -> int:
    cmd = args.nodes_command
    if cmd == "ls":
        params = ([("stale", str(args.stale))] if args.stale else []) + [
            ("label", label) for label in args.label
        ]
        query = "?" + urlencode(params) if params else ""
        nodes = (await _call(conn, "GET", "/v1/admin/nodes" + query))["nodes"]
        if args.json:
            print(json.dumps(nodes, indent=2))
        else:
            columns: tuple[tuple[str, str], ...] = _COLUMNS
            if args.labels:
                for node in nodes:
                    node["labels_text"] = ",".join(f"{k}={v}" for k, v in node["labels"].items())
                columns = (*_COLUMNS, ("LABELS", "labels_text"))
            print(_table(nodes, columns))
            print(f"{len(nodes)} host(s), {sum(1 for n in nodes if n['locked'])} locked")
    elif cmd == "show":
        print(json.dumps(await _call(conn, "GET", f"/v1/admin/nodes/{args.host_id}"), indent=2))
    elif cmd == "lock":
        target, value = next(
            (t, v)
            for t, v in (
                ("host", args.host_id),
                ("vm_id", args.vm_id),
                ("subscription", args.subscription),
                ("token", args.token),
            )
            if v
        )
        body: dict[str, Any] = {"target": target, "value": value, "reason": args.reason}
        if args.ttl:
            body["ttl_seconds"] = args.ttl
        lock = await _call(conn, "POST", "/v1/admin/locks", body)
        print(f"lock {lock['lock_id']}: {lock['target']}={lock['value']} ({lock['reason']})")
    elif cmd == "locks":
        locks = (await _call(conn, "GET", "/v1/admin/locks"))["locks"]
        cols = (
            ("LOCK ID", "lock_id"),
            ("TARGET", "target"),
            ("VALUE", "value"),
            ("REASON", "reason"),
            ("CREATED", "created_at"),
            ("EXPIRES", "expires_at"),
        )
        print(_table(locks, cols))
    elif cmd == "unlock":
        await _call(conn, "DELETE", f"/v1/admin/locks/{args.lock_id}")
        print(f"lock {args.lock_id} removed")
    elif cmd == "rm":
        await _call(conn, "DELETE", f"/v1/admin/nodes/{args.host_id}")
        print(f"host {args.host_id} removed")
    elif cmd == "prune":
        removed = await _call(conn, "POST", "/v1/admin/prune", {"stale_seconds": args.stale})
        print(f"removed {len(removed['removed'])} host(s)")
        for host_id in removed["removed"]:
            print(f"  {host_id}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        conn = _connection(args)
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"nodes: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, conn))
    except (RuntimeError, aiohttp.ClientError, TimeoutError, OSError) as exc:
        print(f"nodes: {exc}", file=sys.stderr)
        return 1
