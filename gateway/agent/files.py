"""Private files in the agent's data_dir: directory 0700, files 0600, written atomically.

A node that crashes half-way through writing its certificate must not come back with a
truncated one, so every file is written to a temporary file in the same directory, flushed,
and renamed over the target (rename is atomic within one file system).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from gateway.agent.errors import AgentCode, AgentError

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
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file + rename)."""
    fd, tmp = -1, ""
    try:
        # mkstemp creates the file 0600 and O_EXCL, so nobody can open it in between.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        tmp = ""
    except OSError as exc:
        raise AgentError(AgentCode.WRITE_FAILED, f"cannot write {path}: {exc}") from exc
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
