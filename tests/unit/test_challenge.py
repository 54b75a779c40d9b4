from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.core.clock import FixedClock
from gateway.core.errors import Code, JoinRejected
from gateway.join.challenge import (
    ChallengeCodec,
    IssuedChallenge,
    generate_key,
    load_keys_file,
    write_new_keys_file,
)
from gateway.join.replay import MemoryReplayStore

T0 = 1_800_000_000.0
KEY_A, KEY_B = b"a" * 32, b"b" * 32


def codec(keys: list[bytes], clock: FixedClock, ttl: float = 60) -> ChallengeCodec:
    return ChallengeCodec(keys, ttl=ttl, clock=clock)


def test_issued_challenge_is_32_base64url_chars_and_verifies() -> None:
    clock = FixedClock(T0)
    issued = codec([KEY_A], clock).issue()
    assert len(issued.value) == 32
    assert set(issued.value) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert codec([KEY_A], clock).verify(issued.value) == T0 + 60
    assert issued.expires_at_rfc3339().endswith("Z")


def test_challenge_layout_is_the_documented_hmac_of_its_body() -> None:
    """The keyed HMAC state copied per tag gives HMAC-SHA256(key, body)[:12], every time
    (a copy never carries one challenge's bytes into the next)."""
    clock = FixedClock(T0)
    c = codec([KEY_A, KEY_B], clock)
    for _ in range(3):
        raw = base64.urlsafe_b64decode(c.issue().value)
        body, tag = raw[:12], raw[12:]
        assert body[0] == hashlib.sha256(KEY_A).digest()[0]
        assert struct.unpack(">I", body[1:5]) == (int(T0 + 60),)
        assert tag == hmac.new(KEY_A, body, hashlib.sha256).digest()[:12]
    # A challenge MACed by hand under the second (verify-only) key verifies too.
    body = bytes([hashlib.sha256(KEY_B).digest()[0]]) + struct.pack(">I", int(T0 + 5)) + b"r" * 7
    forged = body + hmac.new(KEY_B, body, hashlib.sha256).digest()[:12]
    assert c.verify(base64.urlsafe_b64encode(forged).decode()) == T0 + 5


@pytest.mark.parametrize("expires", [0.0, T0, 951_782_400.0, 4_102_444_799.0, 4_294_967_295.0])
def test_expires_at_is_rfc3339_utc(expires: float) -> None:
    expected = datetime.fromtimestamp(expires, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert IssuedChallenge("x", expires).expires_at_rfc3339() == expected


def test_challenges_are_unique() -> None:
    c = codec([KEY_A], FixedClock(T0))
    assert len({c.issue().value for _ in range(2000)}) == 2000


def _flip(value: str, index: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(value))
    raw[index] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda v: v[:-1], Code.CHALLENGE_INVALID),
        (lambda v: v + "A", Code.CHALLENGE_INVALID),
        (lambda v: v[:-1] + "!", Code.CHALLENGE_INVALID),
        (lambda v: _flip(v, 3), Code.CHALLENGE_INVALID),  # expiry pushed: MAC breaks
        (lambda v: _flip(v, 8), Code.CHALLENGE_INVALID),  # random part
        (lambda v: _flip(v, 20), Code.CHALLENGE_INVALID),  # tag
        (lambda v: _flip(v, 0), Code.CHALLENGE_INVALID),  # key id
        (lambda v: "A" * 32, Code.CHALLENGE_INVALID),
    ],
    ids=[
        "a truncated challenge is invalid",
        "an extended challenge is invalid",
        "a character outside base64url is invalid",
        "an altered expiry breaks the MAC",
        "an altered random part breaks the MAC",
        "an altered tag does not verify",
        "an altered key id finds no key",
        "a made-up challenge does not verify",
    ],
)
def test_tampered_challenges_are_rejected(mutate: object, code: Code) -> None:
    clock = FixedClock(T0)
    value = codec([KEY_A], clock).issue().value
    with pytest.raises(JoinRejected) as err:
        codec([KEY_A], clock).verify(mutate(value))  # type: ignore[operator]
    assert err.value.code == code


def test_expired_challenge_is_rejected_as_expired() -> None:
    clock = FixedClock(T0)
    value = codec([KEY_A], clock).issue().value
    clock.advance(61)
    with pytest.raises(JoinRejected) as err:
        codec([KEY_A], clock).verify(value)
    assert err.value.code == Code.CHALLENGE_EXPIRED


@pytest.mark.parametrize(
    ("issuer_keys", "verifier_keys", "ok"),
    [
        ([KEY_A], [KEY_B, KEY_A], True),
        ([KEY_B], [KEY_B, KEY_A], True),
        ([KEY_A], [KEY_B], False),
    ],
    ids=[
        "a challenge under the previous key verifies during rotation",
        "a challenge under the new first key verifies",
        "a challenge under a retired key is invalid",
    ],
)
def test_key_rotation(issuer_keys: list[bytes], verifier_keys: list[bytes], ok: bool) -> None:
    clock = FixedClock(T0)
    value = codec(issuer_keys, clock).issue().value
    if ok:
        codec(verifier_keys, clock).verify(value)
    else:
        with pytest.raises(JoinRejected) as err:
            codec(verifier_keys, clock).verify(value)
        assert err.value.code == Code.CHALLENGE_INVALID


def test_keys_file_rotation_puts_new_key_first(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    write_new_keys_file(path, keep_existing=False)
    first = load_keys_file(path)
    write_new_keys_file(path)
    second = load_keys_file(path)
    assert len(second) == 2 and second[1] == first[0] and second[0] != first[0]
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no keys"),
        ("# only a comment\n", "no keys"),
        ("not base64!!\n", "not base64"),
        (base64.b64encode(b"short").decode() + "\n", "shorter"),
    ],
    ids=["an empty file", "a file of comments", "a line that is not base64", "a key too short"],
)
def test_bad_keys_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_keys_file(path)


def test_codec_refuses_short_keys() -> None:
    with pytest.raises(ValueError):
        ChallengeCodec([b"x" * 16], ttl=60, clock=FixedClock(T0))
    assert len(generate_key()) == 32


async def test_replay_store_redeems_once_until_expiry() -> None:
    clock = FixedClock(T0)
    store = MemoryReplayStore(clock=clock)
    assert await store.redeem("c1", 60)
    assert not await store.redeem("c1", 60)
    assert await store.redeem("c2", 60)
    clock.advance(61)
    assert await store.redeem("c1", 60)  # past its expiry the challenge itself is expired
    await store.release("c2")
    assert await store.redeem("c2", 60)


def test_staged_rotation_add_promote_retire(tmp_path: Path) -> None:
    from gateway.join.challenge import promote_key, retire_keys, stage_key

    clock = FixedClock(T0)
    path = tmp_path / "keys"
    write_new_keys_file(path, keep_existing=False)
    (old,) = load_keys_file(path)
    before = ChallengeCodec([old], ttl=60, clock=clock).issue().value

    stage_key(path)  # the new key verifies everywhere before anyone signs with it
    staged = load_keys_file(path)
    assert staged[0] == old and len(staged) == 2
    new = staged[1]

    promote_key(path)
    assert load_keys_file(path) == [new, old]
    codec = ChallengeCodec(load_keys_file(path), ttl=60, clock=clock)
    codec.verify(before)  # still good during the overlap
    after = codec.issue().value
    ChallengeCodec([new], ttl=60, clock=clock).verify(after)  # signed by the new key

    assert retire_keys(path) == 1
    with pytest.raises(JoinRejected) as err:
        ChallengeCodec(load_keys_file(path), ttl=60, clock=clock).verify(before)
    assert err.value.code == Code.CHALLENGE_INVALID

    with pytest.raises(ValueError, match="nothing to promote"):
        promote_key(path)
