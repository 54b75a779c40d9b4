"""Differential: ``validators.load_ssh_key`` (a short cut for plain Ed25519 lines) against
cryptography's ``load_ssh_public_key``, which it must equal on every input.

Equal means: both refuse (with the same exception type), or both give a key of the same
type and the same public bytes. A table of hand-made edge cases (padding, separators,
comments, trailing bytes, wrong inner types, certificates, other key types), then
Hypothesis edits of a real Ed25519 line and of its blob, then ``check_ssh_public_key``
itself against a checker that only ever calls cryptography.
"""

from __future__ import annotations

import base64
import struct

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol import validators
from gateway.protocol.errors import WireError
from gateway.protocol.validators import check_ssh_public_key, load_ssh_key

_ED = ed25519.Ed25519PrivateKey.generate().public_key()
_RAW = _ED.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
_LINE = _ED.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
_TYPE, _B64 = _LINE.split(b" ")
_RSA = (
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
)
_ECDSA = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
)
_FAILS = (ValueError, TypeError, UnsupportedAlgorithm)


def _sshstr(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _line(blob: bytes, key_type: bytes = b"ssh-ed25519") -> bytes:
    return key_type + b" " + base64.b64encode(blob)


def _outcome(load: object, line: bytes) -> tuple[str, object]:
    try:
        key = load(line)  # type: ignore[operator]
    except _FAILS as exc:
        return ("refused", type(exc))
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return ("ed25519", raw)
    return (
        type(key).__name__,
        key.public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
    )


def _same(line: bytes) -> None:
    assert _outcome(load_ssh_key, line) == _outcome(serialization.load_ssh_public_key, line)


_CANON = _sshstr(b"ssh-ed25519") + _sshstr(_RAW)

CASES: list[tuple[str, bytes]] = [
    ("canonical", _LINE),
    ("with a comment", _LINE + b" user@host"),
    ("comment with tabs and spaces", _LINE + b"\t a b\tc "),
    ("tab separator", _TYPE + b"\t" + _B64),
    ("several separators", _TYPE + b" \t  " + _B64),
    ("leading space", b" " + _LINE),
    ("trailing space", _LINE + b" "),
    ("vertical tab separator", _TYPE + b"\x0b" + _B64),
    ("form feed after the blob", _LINE + b"\x0cjunk"),
    ("NUL after the blob", _LINE + b"\x00junk"),
    ("type only", _TYPE),
    ("type and a space", _TYPE + b" "),
    ("empty", b""),
    ("uppercase type", b"SSH-ED25519 " + _B64),
    ("type with a suffix", b"ssh-ed25519x " + _B64),
    ("certificate type", b"ssh-ed25519-cert-v01@openssh.com " + _B64),
    ("rsa type, ed25519 blob", b"ssh-rsa " + _B64),
    ("padding removed", _TYPE + b" " + _B64.rstrip(b"=")),
    ("padding doubled", _LINE + b"="),
    ("data after padding", _TYPE + b" " + _B64 + b"AAAA"),
    ("base64 with junk inside", _TYPE + b" " + _B64[:10] + b"!*" + _B64[10:]),
    ("base64 with a dot", _TYPE + b" " + _B64[:20] + b"." + _B64[20:]),
    ("urlsafe alphabet", _TYPE + b" " + base64.urlsafe_b64encode(_CANON)),
    ("truncated base64", _TYPE + b" " + _B64[:-8]),
    ("one base64 char more", _TYPE + b" " + _B64.rstrip(b"=") + b"A"),
    ("trailing byte in the blob", _line(_CANON + b"\x00")),
    ("trailing string in the blob", _line(_CANON + _sshstr(b"x"))),
    ("31-byte key", _line(_sshstr(b"ssh-ed25519") + _sshstr(_RAW[:31]))),
    ("33-byte key", _line(_sshstr(b"ssh-ed25519") + _sshstr(_RAW + b"\x00"))),
    ("key length says 33, 32 there", _line(_sshstr(b"ssh-ed25519") + b"\0\0\0\x21" + _RAW)),
    ("key length says 31, 32 there", _line(_sshstr(b"ssh-ed25519") + b"\0\0\0\x1f" + _RAW)),
    ("inner type ssh-rsa", _line(_sshstr(b"ssh-rsa") + _sshstr(_RAW))),
    ("inner type length 12", _line(b"\0\0\0\x0cssh-ed25519\0" + _sshstr(_RAW))),
    ("inner type length huge", _line(b"\xff\xff\xff\xffssh-ed25519" + _sshstr(_RAW))),
    ("no inner type", _line(_sshstr(_RAW))),
    ("empty blob", _line(b"")),
    ("all-zero key", _line(_sshstr(b"ssh-ed25519") + _sshstr(b"\0" * 32))),
    ("all-ones key", _line(_sshstr(b"ssh-ed25519") + _sshstr(b"\xff" * 32))),
    ("rsa key", _RSA),
    ("rsa key with comment", _RSA + b" c"),
    ("ecdsa key", _ECDSA),
    ("ecdsa type, ed25519 blob", _ECDSA.split(b" ")[0] + b" " + _B64),
    ("ed25519 type, ecdsa blob", b"ssh-ed25519 " + _ECDSA.split(b" ")[1]),
    ("options before the type", b'no-pty,command="x" ' + _LINE),
    (
        "pem, not openssh",
        _ED.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ),
    ("non-ascii byte in the type", b"ssh-ed25519\xff " + _B64),
    ("non-ascii byte in the blob", _TYPE + b" " + _B64[:5] + b"\xc3\xa9" + _B64[5:]),
]


@pytest.mark.parametrize("line", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_the_short_cut_equals_cryptography(line: bytes) -> None:
    _same(line)


def test_the_short_cut_takes_the_agent_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not hollow: the agent's line goes through the short cut, an RSA line to the parser.
    called: list[bytes] = []
    real = validators.load_ssh_public_key

    def parser(line: bytes) -> object:
        called.append(line)
        return real(line)

    monkeypatch.setattr(validators, "load_ssh_public_key", parser)
    assert isinstance(load_ssh_key(_LINE + b" comment"), ed25519.Ed25519PublicKey)
    assert called == []
    load_ssh_key(_RSA)
    assert called == [_RSA]


_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \t.-_!\x0b\x00"
_B64_TEXT = st.lists(st.sampled_from(list(_B64_CHARS)), max_size=4).map(bytes)


@settings(max_examples=400, deadline=None)
@given(
    at=st.integers(0, len(_LINE)),
    cut=st.integers(0, 4),
    insert=st.binary(max_size=4) | _B64_TEXT,
)
def test_edited_lines_match(at: int, cut: int, insert: bytes) -> None:
    _same(_LINE[:at] + insert + _LINE[at + cut :])


@settings(max_examples=400, deadline=None)
@given(at=st.integers(0, len(_CANON)), cut=st.integers(0, 4), insert=st.binary(max_size=6))
def test_edited_blobs_match(at: int, cut: int, insert: bytes) -> None:
    _same(_line(_CANON[:at] + insert + _CANON[at + cut :]))


def _answer(value: str) -> str:
    try:
        check_ssh_public_key(value, "k")
    except WireError as exc:
        return f"{exc.code}: {exc}"
    return "ok"


@pytest.mark.parametrize("line", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_the_check_answers_as_before(line: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # check_ssh_public_key with the short cut, then with only cryptography's parser.
    value = line.decode("latin-1")
    texts = (value, f"  {value}\n", f"\t{value} ")
    answers = [_answer(text) for text in texts]
    monkeypatch.setattr(validators, "load_ssh_key", validators.load_ssh_public_key)
    assert answers == [_answer(text) for text in texts]
