"""Private files in the agent's data_dir: directory 0700, files 0600, written atomically.

A node that crashes half-way through writing its certificate must not come back with a
truncated one, so every file goes through the one atomic writer (``gateway.core.files``:
a temporary file created with O_EXCL, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.agent.errors import AgentCode, AgentError
from gateway.core.files import write_atomic

__all__ = ["ensure_private_dir", "write_private_file"]

DIR_MODE = 0o700
FILE_MODE = 0o600


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if needed and make it 0700: it holds private keys."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, DIR_MODE)
    except OSError as exc:
        raise AgentError(AgentCode.WRITE_FAILED, f"cannot prepare {path}: {exc}") from exc


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (``gateway.core.files``)."""
    try:
        write_atomic(path, data, mode=FILE_MODE)
    except OSError as exc:
        raise AgentError(AgentCode.WRITE_FAILED, f"cannot write {path}: {exc}") from exc
