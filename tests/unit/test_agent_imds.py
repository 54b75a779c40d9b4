"""The IMDS client: exact requests, retries on throttling, typed errors, no token in logs."""

from __future__ import annotations

import logging
import random
from typing import Any

import aiohttp
import pytest

from gateway.agent.backoff import Backoff
from gateway.agent.errors import ImdsError
from gateway.agent.imds import ImdsClient
from tests.unit.test_agent_fakes import FakeImds, SleepRecorder

CLIENT_ID = "11111111-1111-1111-1111-111111111111"


def client(session: aiohttp.ClientSession, imds: FakeImds, sleep: SleepRecorder) -> ImdsClient:
    return ImdsClient(
        session,
        base_url=imds.base_url,
        sleep=sleep,
        backoff=Backoff(base=0.5, cap=5, rng=random.Random(1)),
    )


@pytest.mark.parametrize(
    ("client_id", "expected_client_id"),
    [(CLIENT_ID, CLIENT_ID), (None, None)],
    ids=[
        "a user-assigned identity is asked for by client_id",
        "the system-assigned identity sends no client_id",
    ],
)
async def test_requests_carry_header_api_version_nonce_resource_and_client_id(
    client_id: str | None, expected_client_id: str | None
) -> None:
    imds, sleep = FakeImds(), SleepRecorder()
    async with imds.running(), aiohttp.ClientSession() as s:
        c = client(s, imds, sleep)
        doc = await c.attested_document("abc-_DEF123")
        token = await c.access_token(client_id=client_id)
    assert doc["encoding"] == "pkcs7" and doc["signature"]
    assert token == imds.access_token
    [d] = imds.of("/metadata/attested/document")
    [t] = imds.of("/metadata/identity/oauth2/token")
    assert d.headers["Metadata"] == "true" and t.headers["Metadata"] == "true"
    assert d.query == {"api-version": "2021-02-01", "nonce": "abc-_DEF123"}
    assert t.query.get("api-version") == "2018-02-01"
    assert t.query.get("resource") == "https://management.azure.com/"
    assert t.query.get("client_id") == expected_client_id
    assert sleep.waits == []


async def test_the_resource_is_sent_percent_encoded() -> None:
    seen: list[str] = []

    async def on_request_start(
        session: Any, ctx: Any, params: aiohttp.TraceRequestStartParams
    ) -> None:
        seen.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    imds = FakeImds()
    async with imds.running(), aiohttp.ClientSession(trace_configs=[trace]) as s:
        await client(s, imds, SleepRecorder()).access_token(client_id=CLIENT_ID)
    assert seen[0].endswith(
        "/metadata/identity/oauth2/token?api-version=2018-02-01"
        "&resource=https%3A%2F%2Fmanagement.azure.com%2F"
        f"&client_id={CLIENT_ID}"
    )


@pytest.mark.parametrize(
    ("statuses", "requests", "waits"),
    [([429], 2, 1), ([503, 500], 3, 2), ([410], 2, 1)],
    ids=[
        "a throttled (429) token request is retried",
        "two server errors in a row are retried",
        "410 during an IMDS update is retried",
    ],
)
async def test_transient_imds_failures_are_retried(
    statuses: list[int], requests: int, waits: int
) -> None:
    imds, sleep = FakeImds(), SleepRecorder()
    imds.token_statuses = list(statuses)
    async with imds.running(), aiohttp.ClientSession() as s:
        assert await client(s, imds, sleep).access_token(client_id=None) == imds.access_token
    assert len(imds.of("/metadata/identity/oauth2/token")) == requests
    assert len(sleep.waits) == waits


@pytest.mark.parametrize(
    ("setup", "requests", "retryable"),
    [
        ({"token_statuses": [500] * 10}, 4, True),
        ({"token_statuses": [400]}, 1, False),
        ({"token_statuses": [404]}, 1, False),
        ({"token_body": {"token_type": "Bearer"}}, 1, False),
        ({"token_body": {"access_token": 5}}, 1, False),
    ],
    ids=[
        "server errors that persist give up after max_attempts with a retryable error",
        "a bad request is not retried",
        "an identity that is not there is not retried",
        "a token response without access_token is an IMDS error",
        "a token that is not a string is an IMDS error",
    ],
)
async def test_imds_token_failures_are_typed(
    setup: dict[str, Any], requests: int, retryable: bool
) -> None:
    imds, sleep = FakeImds(), SleepRecorder()
    for k, v in setup.items():
        setattr(imds, k, v)
    async with imds.running(), aiohttp.ClientSession() as s:
        with pytest.raises(ImdsError) as err:
            await client(s, imds, sleep).access_token(client_id=CLIENT_ID)
    assert err.value.code == "imds_failed"
    assert err.value.retryable is retryable
    assert len(imds.of("/metadata/identity/oauth2/token")) == requests


@pytest.mark.parametrize(
    "nonce",
    ["x" * 33, "", "has space", "slash/"],
    ids=[
        "a nonce longer than IMDS's 32 characters is refused before any request",
        "an empty nonce is refused",
        "a nonce with a space is refused",
        "a nonce outside the base64url alphabet is refused",
    ],
)
async def test_bad_nonces_are_refused_locally(nonce: str) -> None:
    imds = FakeImds()
    async with imds.running(), aiohttp.ClientSession() as s:
        with pytest.raises(ImdsError) as err:
            await client(s, imds, SleepRecorder()).attested_document(nonce)
    assert err.value.code == "imds_failed"
    assert imds.requests == []


async def test_an_unreachable_imds_is_a_retryable_imds_error() -> None:
    sleep = SleepRecorder()
    async with aiohttp.ClientSession() as s:
        c = ImdsClient(s, base_url="http://127.0.0.1:1", sleep=sleep, max_attempts=2)
        with pytest.raises(ImdsError) as err:
            await c.attested_document("n")
    assert err.value.code == "imds_failed" and err.value.retryable
    assert len(sleep.waits) == 1


async def test_the_access_token_never_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    imds, sleep = FakeImds(), SleepRecorder()
    imds.token_statuses = [503]
    async with imds.running(), aiohttp.ClientSession() as s:
        token = await client(s, imds, sleep).access_token(client_id=CLIENT_ID)
    assert token == imds.access_token
    assert caplog.records, "the client logs nothing: this test would prove nothing"
    for record in caplog.records:
        assert token not in record.getMessage()
        assert token.split(".")[2] not in record.getMessage()
