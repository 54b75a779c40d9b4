"""The node's certificates on disk, replaced as one set; and reading them back.

A renewal must never leave a reader (sshd, Teleport, a TLS client on the node) with the new
TLS certificate beside the old CA, or a new ``host_id`` beside an old SSH certificate. So
the five files are one set, written together into a fresh directory and switched in by one
``rename`` of a symlink::

    data_dir/
      sets/<name>/{tls.crt, tls_ca.crt, ssh.crt, ssh_ca.pub, host_id}   (0700 / 0600)
      current -> sets/<name>            (replaced atomically: symlink to a temp name + rename)
      tls.crt -> current/tls.crt        (and the other four: the stable paths readers use)

This is the layout Kubernetes' atomic writer uses for projected volumes (``..data`` → a
timestamped directory, each visible file a symlink through it), for the same reason.
The new set is complete, fsynced and read back (:func:`read_set`) before ``current`` moves;
until then the old set stays in place, and it is kept until the next renewal so a reader
that resolved ``current`` just before the switch still reads a whole set. A reader that
needs two files of one set (a certificate and its CA) resolves ``current`` once.

Keys (``ssh_key``, ``tls_key.pem``) are not part of the set: a renewal certifies the same
keys again, so they never change under a reader.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import SSHCertificate

from gateway.agent.errors import AgentCode, AgentError
from gateway.agent.files import ensure_private_dir, write_private_file
from gateway.agent.keys import NodeKeys
from gateway.core.files import fsync_directory, replace_symlink

__all__ = [
    "CURRENT_LINK",
    "DATA_FILES",
    "HOST_ID_FILE",
    "SETS_DIR",
    "SSH_CA_FILE",
    "SSH_CERT_FILE",
    "TLS_CA_FILE",
    "TLS_CERT_FILE",
    "Identity",
    "load_identity",
    "read_set",
    "write_identity_set",
]

log = logging.getLogger(__name__)

HOST_ID_FILE = "host_id"
TLS_CERT_FILE = "tls.crt"
TLS_CA_FILE = "tls_ca.crt"
SSH_CERT_FILE = "ssh.crt"
SSH_CA_FILE = "ssh_ca.pub"
DATA_FILES = (TLS_CERT_FILE, TLS_CA_FILE, SSH_CERT_FILE, SSH_CA_FILE, HOST_ID_FILE)
SETS_DIR = "sets"
CURRENT_LINK = "current"


@dataclass(frozen=True)
class Identity:
    """What the set on disk says about the node: who it is and how long that holds.

    ``not_after`` is the earlier of the two certificates' ends; ``obtained_at`` is when the
    set was written (the auth service backdates ``not_before`` to absorb clock skew, so the
    lifetime that matters for renewal starts when the node got the certificates).
    """

    host_id: str
    not_before: datetime
    not_after: datetime
    obtained_at: datetime
    directory: Path

    def valid_at(self, now: datetime) -> bool:
        """Not expired. ``not_before`` is not checked: a node clock a little behind the auth
        service's would otherwise see fresh certificates as no identity and re-join at once."""
        return now < self.not_after


def _bad_set(path: Path, message: str) -> AgentError:
    return AgentError(AgentCode.WRITE_FAILED, f"{path}: {message}")


def read_set(directory: Path, keys: NodeKeys | None = None) -> Identity:
    """Parse one set directory; :class:`AgentError` if a file is missing or does not parse.

    With ``keys``, the certificates must also be for those keys (a set left by other keys is
    no identity of ours).
    """
    try:
        host_id = (directory / HOST_ID_FILE).read_text(encoding="ascii").strip()
        tls_pem = (directory / TLS_CERT_FILE).read_bytes()
        ca_pems = (directory / TLS_CA_FILE).read_bytes()
        ssh_line = (directory / SSH_CERT_FILE).read_bytes()
        (directory / SSH_CA_FILE).read_bytes()
        obtained = (directory / TLS_CERT_FILE).stat().st_mtime
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad_set(directory, f"incomplete certificate set: {exc}") from exc
    try:
        tls = x509.load_pem_x509_certificate(tls_pem)
        x509.load_pem_x509_certificates(ca_pems)
        ssh = serialization.load_ssh_public_identity(ssh_line.strip())
    except (ValueError, TypeError) as exc:
        raise _bad_set(directory, f"certificate does not parse: {exc}") from exc
    if not host_id or not isinstance(ssh, SSHCertificate):
        raise _bad_set(directory, "no host_id or no SSH certificate")
    if keys is not None:
        theirs = tls.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ssh_pub = ssh.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        if theirs != keys.tls_public_pem() or ssh_pub.decode() != keys.public_ssh_key:
            raise _bad_set(directory, "the certificates are not for this node's keys")
    ssh_before = datetime.fromtimestamp(ssh.valid_before, UTC)
    ssh_after = datetime.fromtimestamp(ssh.valid_after, UTC)
    return Identity(
        host_id=host_id,
        not_before=max(tls.not_valid_before_utc, ssh_after),
        not_after=min(tls.not_valid_after_utc, ssh_before),
        obtained_at=datetime.fromtimestamp(obtained, UTC),
        directory=directory,
    )


def load_identity(data_dir: Path, keys: NodeKeys | None = None) -> Identity | None:
    """The set ``current`` points to (or a pre-set layout's plain files); ``None`` if none."""
    current = data_dir / CURRENT_LINK
    directory = current.resolve() if current.is_symlink() else data_dir
    try:
        return read_set(directory, keys)
    except AgentError as exc:
        if (directory / HOST_ID_FILE).exists():
            log.warning("the certificate set on disk is unusable: %s", exc.message)
        return None


def _adopt_plain_files(data_dir: Path, sets: Path) -> None:
    """A data_dir from before sets (plain files) becomes a set without a mixed moment.

    The plain files are copied into a set first and ``current`` points at it, so replacing
    each plain file by its symlink swaps identical content; the new set switches in after.
    """
    plain = [n for n in DATA_FILES if (data_dir / n).exists() and not (data_dir / n).is_symlink()]
    if not plain or (data_dir / CURRENT_LINK).is_symlink():
        return
    old = Path(tempfile.mkdtemp(prefix="adopted-", dir=sets))
    for name in plain:
        shutil.copy2(data_dir / name, old / name)
        os.chmod(old / name, 0o600)
    fsync_directory(old)
    replace_symlink(data_dir / CURRENT_LINK, f"{SETS_DIR}/{old.name}")


def write_identity_set(data_dir: Path, contents: dict[str, bytes]) -> tuple[Path, ...]:
    """Write ``contents`` (a file name of :data:`DATA_FILES` → bytes) as the new current set.

    Returns the stable paths (``data_dir/<name>``), in :data:`DATA_FILES` order. Raises
    :class:`AgentError` ``write_failed``; the previous set is then still current.
    """
    if set(contents) != set(DATA_FILES):
        raise ValueError(f"a certificate set is exactly {DATA_FILES}")
    sets = data_dir / SETS_DIR
    ensure_private_dir(data_dir)
    ensure_private_dir(sets)
    new: Path | None = None
    try:
        new = Path(tempfile.mkdtemp(prefix="set-", dir=sets))
        for name in DATA_FILES:
            write_private_file(new / name, contents[name])
        fsync_directory(new)
        read_set(new)  # complete and parseable, before anyone can see it
        _adopt_plain_files(data_dir, sets)
        current = data_dir / CURRENT_LINK
        previous = current.resolve().name if current.is_symlink() else None
        replace_symlink(current, f"{SETS_DIR}/{new.name}")
        for name in DATA_FILES:
            stable = data_dir / name
            if not (stable.is_symlink() and os.readlink(stable) == f"{CURRENT_LINK}/{name}"):
                replace_symlink(stable, f"{CURRENT_LINK}/{name}")
        fsync_directory(data_dir)
    except OSError as exc:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
        raise AgentError(AgentCode.WRITE_FAILED, f"cannot write {data_dir}: {exc}") from exc
    except AgentError:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
        raise
    # Keep the set just replaced (a reader may be mid-way through it); older ones go.
    for old in sets.iterdir():
        if old.name not in (new.name, previous):
            shutil.rmtree(old, ignore_errors=True)
    return tuple(data_dir / name for name in DATA_FILES)
