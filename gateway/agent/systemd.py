"""``join-gateway install systemd``: the unit that runs ``join-gateway agent`` on the node.

The agent holds the node's private keys and talks only to IMDS and the gateway, so the unit
takes away what it does not need: no new privileges, no capabilities, a read-only file
system except its data directory (``StateDirectory=`` when that lies under ``/var/lib``),
private ``/tmp``, no home directories, IPv4/IPv6 sockets only (and AF_UNIX for logging).

Restarts: ``Restart=on-failure`` brings the agent back after a crash (exit 1) with
``RestartSec=`` of pause; exit 2 (the config is wrong) and 4 (the gateway refused the node
for good: a lock, no allow rule) are in ``RestartPreventExitStatus=`` — a restart cannot cure
them, and a locked node must stop knocking. ``systemctl reload`` sends SIGHUP: renew now.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from gateway.agent.renew import EXIT_REFUSED, EXIT_USAGE

__all__ = ["UNIT_NAME", "default_executable", "render_unit", "unit_warnings"]

UNIT_NAME = "join-gateway-agent.service"
_STATE_ROOT = Path("/var/lib")


def default_executable() -> Path | None:
    """The installed ``join-gateway`` script: beside this Python first, then on ``PATH``."""
    beside = Path(sys.executable).parent / "join-gateway"
    if beside.is_file():
        return beside
    found = shutil.which("join-gateway")
    return Path(found) if found else None


def _quote(value: str) -> str:
    """One systemd command-line word: specifiers (%) doubled, quoted if it has spaces."""
    value = value.replace("%", "%%")
    if any(c.isspace() or c in "\"'\\;" for c in value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def unit_warnings(*, executable: Path, config: Path) -> list[str]:
    """What the hardening will hide from the service: files under home directories."""
    homes = (Path("/home"), Path("/root"), Path("/run/user"))
    return [
        f"{name} {path} is under a home directory, which ProtectHome=yes hides from the "
        "service: install it elsewhere (e.g. /usr/local, /etc)"
        for name, path in (("executable", executable), ("config", config))
        if any(path.is_relative_to(h) for h in homes)
    ]


def render_unit(*, executable: Path, config: Path, data_dir: Path) -> str:
    """The unit file's text. All paths must be absolute (systemd requires it)."""
    for name, path in (("executable", executable), ("config", config), ("data_dir", data_dir)):
        if not path.is_absolute():
            raise ValueError(f"{name} must be an absolute path, not {path}")
    exec_start = " ".join(
        _quote(str(w)) for w in (executable, "agent", "--config", config, "--data-dir", data_dir)
    )
    if data_dir.is_relative_to(_STATE_ROOT) and data_dir != _STATE_ROOT:
        # systemd creates it (0700, owned by the service's user) and leaves it writable.
        state = f"StateDirectory={data_dir.relative_to(_STATE_ROOT)}\nStateDirectoryMode=0700\n"
    else:
        state = (
            "# The data directory is outside /var/lib: writable explicitly (it must exist).\n"
            f"ReadWritePaths={_quote(str(data_dir))}\n"
        )
    prevent = f"{EXIT_USAGE} {EXIT_REFUSED}"
    return f"""\
# Written by `join-gateway install systemd`.
[Unit]
Description=join-gateway node agent (joins this VM and keeps its certificates fresh)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={exec_start}
# SIGHUP: renew now.
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=30s
# 2: the config is wrong; 4: the gateway refused this node for good (locked, not allowed).
RestartPreventExitStatus={prevent}
TimeoutStopSec=10s
UMask=0077
{state}NoNewPrivileges=yes
ProtectSystem=strict
PrivateTmp=yes
ProtectHome=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
CapabilityBoundingSet=
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""
