"""The node's keys: made once, private on disk, reused, and refused when they are not ours."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.agent.errors import KeyFileError
from gateway.agent.keys import SSH_KEY_FILE, TLS_KEY_FILE, load_or_create_keys


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_generated_private_and_reused(tmp_path: Path) -> None:
    data = tmp_path / "var" / "teleport"
    keys = load_or_create_keys(data)
    assert mode(data) == 0o700
    assert mode(data / SSH_KEY_FILE) == 0o600 and mode(data / TLS_KEY_FILE) == 0o600
    assert keys.public_ssh_key.startswith("ssh-ed25519 AAAA")
    assert keys.public_tls_key.startswith("-----BEGIN PUBLIC KEY-----")
    pub = serialization.load_pem_public_key(keys.public_tls_key.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    again = load_or_create_keys(data)
    assert again.public_ssh_key == keys.public_ssh_key
    assert again.public_tls_key == keys.public_tls_key
    assert sorted(p.name for p in data.iterdir()) == sorted([SSH_KEY_FILE, TLS_KEY_FILE])


def test_a_loose_data_dir_is_tightened_to_0700(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir(mode=0o755)
    load_or_create_keys(data)
    assert mode(data) == 0o700


def _rsa_pem() -> bytes:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (TLS_KEY_FILE, b"not a key"),
        (TLS_KEY_FILE, None),
        (SSH_KEY_FILE, b"-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n"),
    ],
    ids=[
        "a TLS key file that is not PEM is refused",
        "a TLS key file holding an RSA key is refused",
        "an SSH key file that does not parse is refused",
    ],
)
def test_unusable_key_files_are_refused(tmp_path: Path, name: str, content: bytes | None) -> None:
    tmp_path.joinpath(name).write_bytes(_rsa_pem() if content is None else content)
    with pytest.raises(KeyFileError) as err:
        load_or_create_keys(tmp_path)
    assert err.value.code == "key_invalid"
