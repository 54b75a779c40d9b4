"""The node's own key pairs: ed25519 for SSH, ECDSA P-256 for TLS.

Keys are made on the VM and never leave it; only the public halves go to the gateway, and the
certificates that come back are checked to be for these keys. They live in data_dir (0600) and
are reused on the next run, so a re-join keeps the node's identity keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.agent.errors import KeyFileError
from gateway.agent.files import ensure_private_dir, write_private_file

__all__ = ["SSH_KEY_FILE", "TLS_KEY_FILE", "NodeKeys", "load_or_create_keys"]

SSH_KEY_FILE = "ssh_key"
TLS_KEY_FILE = "tls_key.pem"


@dataclass(frozen=True)
class NodeKeys:
    """The node's private keys and the public forms the join request carries."""

    ssh_key: ed25519.Ed25519PrivateKey
    tls_key: ec.EllipticCurvePrivateKey

    @property
    def public_ssh_key(self) -> str:
        """OpenSSH public key line: ``ssh-ed25519 AAAA...``."""
        return (
            self.ssh_key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode("ascii")
        )

    @property
    def public_tls_key(self) -> str:
        """PEM SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``)."""
        return self.tls_public_pem().decode("ascii")

    def tls_public_pem(self) -> bytes:
        return self.tls_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def __repr__(self) -> str:
        return f"NodeKeys(ssh={self.public_ssh_key[:24]}..., tls=P-256)"


def _load_ssh(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted OpenSSH private key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected ed25519")
    return key


def _load_tls(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path} is not an ECDSA P-256 key")
    return key


def load_or_create_keys(data_dir: Path) -> NodeKeys:
    """Load the node's keys from ``data_dir``; generate (and save, 0600) any that are missing."""
    ensure_private_dir(data_dir)
    ssh_path, tls_path = data_dir / SSH_KEY_FILE, data_dir / TLS_KEY_FILE
    if ssh_path.exists():
        ssh_key = _load_ssh(ssh_path)
    else:
        ssh_key = ed25519.Ed25519PrivateKey.generate()
        write_private_file(
            ssh_path,
            ssh_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
    if tls_path.exists():
        tls_key = _load_tls(tls_path)
    else:
        tls_key = ec.generate_private_key(ec.SECP256R1())
        write_private_file(
            tls_path,
            tls_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    return NodeKeys(ssh_key=ssh_key, tls_key=tls_key)
