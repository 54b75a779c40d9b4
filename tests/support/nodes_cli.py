"""``join-gateway nodes …`` as an operator runs it on the auth service's host: a process
with ``--data-dir`` (for tests that read the inventory the way the CLI shows it)."""

from __future__ import annotations

import asyncio
import sys

from gateway.dev.devstack import DevStack

__all__ = ["run_nodes"]


async def run_nodes(stack: DevStack, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``join-gateway nodes --data-dir D ARGS…``."""
    data_dir = stack.auth.paths.data_dir if stack.auth.paths else ""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "nodes",
        "--data-dir",
        str(data_dir),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
