"""The one way we write a state or secret file: readers see the old file or the new one,
never half of one, and a secret is never readable by anyone else, not even for a moment.

:func:`write_atomic`:

1. creates a temporary file beside the target with ``O_CREAT | O_EXCL | O_NOFOLLOW``
   and mode 0600 — an existing name (a leftover, or a symlink planted in a shared
   directory) is never opened, let alone followed; another random name is tried;
2. sets the final mode on the open descriptor, writes everything, and ``fsync``\\ s it;
3. renames it over the target (atomic within one file system);
4. ``fsync``\\ s the directory, so the rename itself survives a power cut.

On any failure the temporary file is removed and the target is untouched.

:func:`replace_symlink` does the same for a symbolic link (a set of files switched at once
by pointing one link elsewhere), and :func:`fsync_directory` is step 4 on its own.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["SECRET_MODE", "fsync_directory", "replace_symlink", "write_atomic"]

SECRET_MODE = 0o600
_ATTEMPTS = 16
_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


def _random_suffix() -> str:
    return secrets.token_hex(8)


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = SECRET_MODE,
    make_parents: bool = False,
    suffix: Callable[[], str] = _random_suffix,
) -> None:
    """Replace ``path`` with ``data`` atomically; the file ends with ``mode`` (0600 unless
    told otherwise: a file is a secret until the caller says it is not).

    ``make_parents`` creates missing directories (0700). ``suffix`` names the temporary
    file (``.<name>.<suffix>.tmp``; random by default, a test passes its own). Raises
    ``OSError``; ``FileExistsError`` when every temporary name tried was taken."""
    target = Path(path)
    directory = target.parent
    if make_parents:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = _create_temporary(target, suffix)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def replace_symlink(
    link: str | os.PathLike[str], target: str, *, suffix: Callable[[], str] = _random_suffix
) -> None:
    """Point ``link`` at ``target`` in one rename: readers see the old target or the new.

    The temporary link is made under a fresh name (``symlink`` never replaces an existing
    name, like ``O_EXCL``); the caller fsyncs the directory once it has switched all it
    switches."""
    path = Path(link)
    for _ in range(_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{suffix()}.tmp")
        try:
            os.symlink(target, tmp)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{path}: no free temporary name after {_ATTEMPTS} attempts")
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create_temporary(target: Path, suffix: Callable[[], str]) -> tuple[int, Path]:
    for _ in range(_ATTEMPTS):
        tmp = target.with_name(f".{target.name}.{suffix()}.tmp")
        try:
            # 0600 at creation (the umask can only narrow it): no window in which a secret
            # is readable by others before fchmod.
            return os.open(tmp, _FLAGS, SECRET_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{target}: no free temporary name after {_ATTEMPTS} attempts")


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
