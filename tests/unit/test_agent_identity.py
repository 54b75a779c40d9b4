"""The certificate set on disk: replaced whole, never seen half-way, kept on a bad update."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.agent.errors import AgentError
from gateway.agent.identity import (
    CURRENT_LINK,
    DATA_FILES,
    HOST_ID_FILE,
    TLS_CERT_FILE,
    load_identity,
    read_set,
    write_identity_set,
)
from gateway.agent.keys import load_or_create_keys
from tests.unit.test_agent_fakes import make_ca, ssh_ca_line

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def certificate_set(data_dir: Path, host_id: str) -> dict[str, bytes]:
    """A real set for the node's keys in ``data_dir``, tagged by ``host_id``."""
    keys = load_or_create_keys(data_dir)
    ca_cert, ca_key = make_ca("Set CA")
    tls = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, host_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(keys.tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(hours=1))
        .sign(ca_key, hashes.SHA256())
    )
    ssh_ca = ed25519.Ed25519PrivateKey.generate()
    ssh = (
        serialization.SSHCertificateBuilder()
        .public_key(keys.ssh_key.public_key())
        .serial(1)
        .type(serialization.SSHCertificateType.HOST)
        .key_id(host_id.encode())
        .valid_principals([host_id.encode()])
        .valid_after(int(NOW.timestamp()) - 300)
        .valid_before(int(NOW.timestamp()) + 3600)
        .sign(ssh_ca)
    )
    return {
        "tls.crt": tls.public_bytes(serialization.Encoding.PEM),
        "tls_ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ssh.crt": ssh.public_bytes() + b"\n",
        "ssh_ca.pub": ssh_ca_line(ssh_ca).encode() + b"\n",
        "host_id": host_id.encode() + b"\n",
    }


def test_a_set_is_written_behind_stable_names(tmp_path: Path) -> None:
    data = tmp_path / "node"
    paths = write_identity_set(data, certificate_set(data, "host-a"))
    assert paths == tuple(data / n for n in DATA_FILES)
    current = (data / CURRENT_LINK).resolve()
    for name in DATA_FILES:
        assert os.readlink(data / name) == f"{CURRENT_LINK}/{name}"
        assert (data / name).resolve() == current / name
    identity = load_identity(data, load_or_create_keys(data))
    assert identity is not None and identity.host_id == "host-a"
    assert identity.not_after == NOW + dt.timedelta(hours=1)


def test_plain_files_from_a_one_shot_join_are_adopted(tmp_path: Path) -> None:
    data = tmp_path / "node"
    data.mkdir(mode=0o700)
    for name, content in certificate_set(data, "host-old").items():
        (data / name).write_bytes(content)
    assert load_identity(data) is not None  # the plain layout is still read
    write_identity_set(data, certificate_set(data, "host-new"))
    assert (data / HOST_ID_FILE).read_text().strip() == "host-new"
    assert all((data / n).is_symlink() for n in DATA_FILES)
    # The adopted old files stay as the previous set, for a reader that is mid-way.
    kept = {p.name for p in (data / "sets").iterdir()}
    assert len(kept) == 2 and any(k.startswith("adopted-") for k in kept)


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        (
            lambda c: c.update({TLS_CERT_FILE: b"-----BEGIN CERTIFICATE-----\nnope\n"}),
            "write_failed",
        ),
        (lambda c: c.update({HOST_ID_FILE: b"\n"}), "write_failed"),
        (lambda c: c.update({"ssh.crt": b"ssh-ed25519 AAAA\n"}), "write_failed"),
    ],
    ids=[
        "a TLS certificate that does not parse is not switched in",
        "an empty host_id is not switched in",
        "an SSH key that is not a certificate is not switched in",
    ],
)
def test_a_bad_new_set_leaves_the_old_one_current(
    tmp_path: Path, damage: object, code: str
) -> None:
    data = tmp_path / "node"
    write_identity_set(data, certificate_set(data, "host-a"))
    before = (data / CURRENT_LINK).resolve()
    bad = certificate_set(data, "host-b")
    damage(bad)  # type: ignore[operator]
    with pytest.raises(AgentError) as err:
        write_identity_set(data, bad)
    assert err.value.code == code
    assert (data / CURRENT_LINK).resolve() == before
    assert (data / HOST_ID_FILE).read_text().strip() == "host-a"
    assert [p for p in (data / "sets").iterdir()] == [before]


def test_a_reader_never_sees_a_mixed_set(tmp_path: Path) -> None:
    """A reader resolving ``current`` once, racing 60 switches, always reads one whole set."""
    data = tmp_path / "node"
    sets = [certificate_set(data, f"host-{i}") for i in range(3)]
    tag = {s[TLS_CERT_FILE]: s[HOST_ID_FILE] for s in sets}
    write_identity_set(data, sets[0])
    stop = threading.Event()
    reads: list[int] = []
    mixed: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            directory = (data / CURRENT_LINK).resolve()
            try:
                tls = (directory / TLS_CERT_FILE).read_bytes()
                host_id = (directory / HOST_ID_FILE).read_bytes()
            except FileNotFoundError:
                # Only sets two switches old are removed; a reader that slow starts over.
                continue
            if tag.get(tls) != host_id:
                mixed.append(host_id.decode())
            # Through the stable names each file is always whole (never missing or partial).
            assert (data / TLS_CERT_FILE).read_bytes() in tag
            reads.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            write_identity_set(data, sets[i % 3])
    finally:
        stop.set()
        thread.join()
    assert not mixed and len(reads) > 0
    identity = read_set((data / CURRENT_LINK).resolve())
    assert identity.host_id == "host-2"  # 59 % 3
