"""Hostile challenges: forged, stale, replayed, malformed — each refused with its code,
and the gateway keeps serving."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from gateway.core.clock import FixedClock
from gateway.join.challenge import ChallengeCodec, generate_key, load_keys_file
from tests.security.harness import Body, Builder, Harness

pytestmark = pytest.mark.asyncio(loop_scope="module")

ChallengeMaker = Callable[[Harness], Awaitable[str]]


def _codec(
    h: Harness, *, at: float | None = None, keys: list[bytes] | None = None
) -> ChallengeCodec:
    """A codec over the gateway's own keys file (or other keys), at a chosen time."""
    keys_file = h.stack.config.path(h.stack.config.challenge.keys_file)
    clock = FixedClock(at if at is not None else h.stack.gateway.deps.clock.time())
    return ChallengeCodec(keys or load_keys_file(keys_file), ttl=60, clock=clock)


def with_challenge(make: ChallengeMaker) -> Builder:
    """A valid body whose challenge (and the document's nonce) is ``make(h)``."""

    async def build(h: Harness) -> Body:
        value = await make(h)
        return h.body(value)

    return build


async def issued(h: Harness) -> str:
    return await h.challenge()


async def expired(h: Harness) -> str:
    return _codec(h, at=h.stack.gateway.deps.clock.time() - 3600).issue().value


async def expired_by_a_second(h: Harness) -> str:
    return _codec(h, at=h.stack.gateway.deps.clock.time() - 62).issue().value


async def retired_key(h: Harness) -> str:
    return _codec(h, keys=[generate_key()]).issue().value


async def far_future_under_retired_key(h: Harness) -> str:
    return (
        _codec(h, at=h.stack.gateway.deps.clock.time() + 10 * 365 * 86400, keys=[generate_key()])
        .issue()
        .value
    )


def _flip(value: str, index: int) -> str:
    c = value[index]
    return value[:index] + ("A" if c != "A" else "B") + value[index + 1 :]


async def mac_flipped(h: Harness) -> str:
    return _flip(await h.challenge(), 31)


async def expiry_flipped(h: Harness) -> str:
    # bytes 1..4 are the expiry: characters 1..6 of the base64 text
    return _flip(await h.challenge(), 3)


async def key_id_flipped(h: Harness) -> str:
    return _flip(await h.challenge(), 0)


def literal(text: str) -> ChallengeMaker:
    async def make(h: Harness) -> str:
        return text

    return make


def derived(edit: Callable[[str], str]) -> ChallengeMaker:
    async def make(h: Harness) -> str:
        return edit(await h.challenge())

    return make


async def replayed(h: Harness) -> Body:
    body = h.body(await h.challenge())
    status, code = await h.join(body)
    assert (status, code) == (200, None)  # the first redemption joins
    return body


async def other_nonce(h: Harness) -> Body:
    """Body carries one valid challenge, the document was made for another."""
    first, second = await h.challenge(), await h.challenge()
    sig = h.emulator.attested_document_for(h.vm, nonce=second)["signature"]
    return h.body(first, signature=sig)


async def failed_then_retried(h: Harness) -> Body:
    """A rejected request must not burn the challenge: the corrected retry joins."""
    challenge = await h.challenge()
    bad = h.body(challenge, token=h.token(h.other_sub_vm))
    status, _ = await h.join(bad)
    assert status == 403
    return h.body(challenge)


CASES = [
    pytest.param(with_challenge(issued), 200, None, id="a challenge the gateway issued joins"),
    pytest.param(replayed, 403, "challenge_reused", id="a redeemed challenge cannot be replayed"),
    pytest.param(failed_then_retried, 200, None, id="a rejected join does not burn its challenge"),
    pytest.param(
        with_challenge(expired), 403, "challenge_expired", id="a challenge expired an hour ago"
    ),
    pytest.param(
        with_challenge(expired_by_a_second),
        403,
        "challenge_expired",
        id="a challenge expired seconds ago",
    ),
    pytest.param(
        with_challenge(retired_key), 403, "challenge_invalid", id="a challenge under a retired key"
    ),
    pytest.param(
        with_challenge(far_future_under_retired_key),
        403,
        "challenge_invalid",
        id="a ten-year challenge under an unknown key",
    ),
    pytest.param(
        with_challenge(mac_flipped), 403, "challenge_invalid", id="a challenge with a forged MAC"
    ),
    pytest.param(
        with_challenge(expiry_flipped),
        403,
        "challenge_invalid",
        id="a challenge whose expiry was extended",
    ),
    pytest.param(
        with_challenge(key_id_flipped),
        403,
        "challenge_invalid",
        id="a challenge whose key id was changed",
    ),
    pytest.param(
        with_challenge(derived(lambda v: v[:31])),
        403,
        "challenge_invalid",
        id="a challenge one character short",
    ),
    pytest.param(
        with_challenge(derived(lambda v: v + "A")),
        403,
        "challenge_invalid",
        id="a challenge one character long",
    ),
    pytest.param(
        with_challenge(derived(lambda v: v[:10] + "+" + v[11:])),
        403,
        "challenge_invalid",
        id="a challenge with a character outside base64url",
    ),
    pytest.param(
        with_challenge(derived(lambda v: v.lower())),
        403,
        "challenge_invalid",
        id="a challenge in the wrong case",
    ),
    pytest.param(
        with_challenge(literal("A" * 32)), 403, "challenge_invalid", id="a challenge of all A"
    ),
    pytest.param(
        with_challenge(literal("A" * 64)), 403, "challenge_invalid", id="a 64-character challenge"
    ),
    pytest.param(
        with_challenge(literal("A" * 65)),
        400,
        "invalid_request",
        id="a challenge longer than the schema allows",
    ),
    pytest.param(other_nonce, 403, "nonce_mismatch", id="a document made for another challenge"),
]


@pytest.mark.parametrize(("build", "status", "code"), CASES)
async def test_challenge_corpus(
    harness: Harness, build: Builder, status: int, code: str | None
) -> None:
    assert (await harness.join(await build(harness))) == (status, code)
    await harness.assert_alive()


REQUESTS = [
    pytest.param(b"", {}, 200, None, id="an empty challenge request is served"),
    pytest.param(b"{}", {}, 200, None, id="an empty object is served"),
    pytest.param(b'{"nonce":"mine"}', {}, 400, "invalid_request", id="a client-chosen nonce"),
    pytest.param(b"[]", {}, 400, "malformed_body", id="a JSON array"),
    pytest.param(b"{", {}, 400, "malformed_body", id="truncated JSON"),
    pytest.param(b"\xff\xfe", {}, 400, "malformed_body", id="bytes that are not UTF-8"),
    pytest.param(
        b"{}",
        {"Content-Type": "text/plain"},
        400,
        "unsupported_media_type",
        id="a text/plain challenge request",
    ),
    pytest.param(b"x" * 70000, {}, 413, "body_too_large", id="a 70 kB challenge request"),
]


@pytest.mark.parametrize(("data", "headers", "status", "code"), REQUESTS)
async def test_challenge_request_corpus(
    harness: Harness, data: bytes, headers: dict[str, str], status: int, code: str | None
) -> None:
    got_status, got_code = await harness.post("/v1/join/azure/challenge", data, headers=headers)
    assert (got_status, got_code) == (status, code)
    await harness.assert_alive()
