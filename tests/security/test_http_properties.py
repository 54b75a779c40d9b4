"""Property test over HTTPS: whatever one field of a valid join body becomes, the gateway
answers below 500 with one of our error bodies, and keeps serving.

Each example starts from a *valid* join (a fresh challenge, the emulator's attested
document for it, the VM's managed-identity token, the emulator's intermediate) and changes
one thing: the document's DER bytes or its base64 text, the intermediates, one token
segment (or the token's dots), any JSON field of the body, or the request's headers. It is
posted to a real gateway (``tests/security/harness.py``) and the next request must be
served. Issue 8 found three 500s this way by hand; this is the net for their siblings.

Hypothesis drives a synchronous test, so the dev stack runs on its own event loop in a
background thread and each HTTP exchange is submitted to it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import string
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.harness import Body, Harness, open_harness
from tests.support.cms_forge import with_x509_version

T = TypeVar("T")

# Well under a minute on the shared 2-core machine: each example is three HTTPS exchanges.
EXAMPLES = 150
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Remote:
    """The harness on its own loop in a thread; :meth:`run` awaits a coroutine there."""

    def __init__(self, loop: asyncio.AbstractEventLoop, harness: Harness) -> None:
        self.loop = loop
        self.h = harness

    def run(self, make: Callable[[Harness], Awaitable[T]]) -> T:
        async def call() -> T:
            return await make(self.h)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=60)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    workdir: Path = tmp_path_factory.mktemp("http-properties")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def hold() -> None:
        try:
            async with open_harness(workdir) as h:
                state["harness"] = h
                state["stop"] = asyncio.Event()
                ready.set()
                await state["stop"].wait()
        except BaseException as exc:
            state["error"] = exc
            raise
        finally:
            ready.set()

    def main() -> None:
        asyncio.set_event_loop(loop)
        # Errors are re-raised to the test through ``state``; the thread just ends.
        with contextlib.suppress(BaseException):
            loop.run_until_complete(hold())

    thread = threading.Thread(target=main, name="http-properties-stack", daemon=True)
    thread.start()
    assert ready.wait(120), "dev stack did not start"
    if "error" in state:
        raise state["error"]
    try:
        yield Remote(loop, state["harness"])
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(60)
        loop.close()


# ------------------------------------------------------------------ mutations

B64URL = string.ascii_letters + string.digits + "-_"
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """One edit of ``data``: a flipped byte, a truncation, an insertion, a replaced span,
    or an X.509 version rewritten (v1 ... "v5" and beyond)."""
    op = draw(st.sampled_from(["flip", "truncate", "insert", "replace", "version"]))
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if op == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if op == "truncate":
        return data[:at]
    if op == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
    if op == "replace":
        span = draw(st.integers(1, 64))
        return data[:at] + draw(st.binary(max_size=64)) + data[at + span :]
    version = draw(st.integers(0, 255))
    try:
        return with_x509_version(data, version)
    except ValueError:  # no v3 certificate in these bytes
        return data


def _leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        out: list[tuple[Any, ...]] = [prefix] if prefix else []
        for k, v in value.items():
            out += _leaf_paths(v, (*prefix, k))
        return out
    if isinstance(value, list):
        out = [prefix]
        for i, v in enumerate(value):
            out += _leaf_paths(v, (*prefix, i))
        return out
    return [prefix]


def _set(body: Body, path: tuple[Any, ...], value: Any) -> None:
    target: Any = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


FIELDS = ["document bytes", "document text", "intermediates", "token", "json field", "headers"]


Draw = Callable[[st.SearchStrategy[Any]], Any]


def mutate(draw: Draw, body: Body) -> tuple[bytes, dict[str, str]]:
    """The body (as sent) and extra headers for one mutation of ``body``."""
    body = copy.deepcopy(body)
    headers: dict[str, str] = {}
    field = draw(st.sampled_from(FIELDS))
    signature = body["attested_data"]["signature"]
    if field == "document bytes":
        der = base64.b64decode(signature)
        body["attested_data"]["signature"] = _b64(draw(mutated_bytes(der)))
    elif field == "document text":
        edit = draw(st.sampled_from(["replace", "append", "truncate"]))
        text = draw(st.text(max_size=80))
        body["attested_data"]["signature"] = (
            text
            if edit == "replace"
            else signature + text
            if edit == "append"
            else signature[: len(text)]
        )
    elif field == "intermediates":
        valid = base64.b64decode(body["intermediates"][0])
        items = draw(
            st.lists(
                st.one_of(
                    mutated_bytes(valid).map(_b64),
                    st.binary(max_size=300).map(_b64),
                    st.just(_b64(with_x509_version(valid, 4))),
                    st.just(_b64(valid)),
                    st.text(max_size=40),
                ),
                max_size=9,
            )
        )
        body["intermediates"] = items
    elif field == "token":
        parts = body["access_token"].split(".")
        i = draw(st.integers(0, 2))
        raw = base64.urlsafe_b64decode(parts[i] + "=" * (-len(parts[i]) % 4))
        parts[i] = draw(
            st.one_of(
                st.text(alphabet=B64URL, max_size=400),
                mutated_bytes(raw).map(_b64url),
                st.integers(0, len(parts[i])).map(lambda n, p=parts[i]: p[:n]),
                st.text(max_size=20).map(lambda t, p=parts[i]: p + t),
                st.integers(1, 3000).map(lambda n: _b64url(b"[" * n + b"]" * n)),
            )
        )
        dots = draw(st.sampled_from([".", ".", ".", "", ".."]))
        body["access_token"] = dots.join(parts)
    elif field == "json field":
        path = draw(st.sampled_from(_leaf_paths(body)))
        _set(body, path, draw(JSON))
    else:
        names = st.sampled_from(
            [
                "Content-Type",
                "X-Forwarded-For",
                "Forwarded",
                "X-Request-Id",
                "Accept",
                "Content-Encoding",
                "Authorization",
                "X-Junk",
            ]
        )
        headers = draw(st.dictionaries(names, HEADER_TEXT, min_size=1, max_size=4))
    return json.dumps(body).encode(), headers


@SETTINGS
@given(data=st.data())
def test_no_mutation_of_a_valid_join_answers_5xx(remote: Remote, data: st.DataObject) -> None:
    async def base(h: Harness) -> Body:
        return h.body(await h.challenge())

    body, headers = mutate(data.draw, remote.run(base))

    async def send(h: Harness) -> tuple[int, str | None]:
        return await h.post("/v1/join/azure", body, headers=headers)

    status, code = remote.run(send)
    assert status < 500, (status, code)
    if status != 200:
        assert code is not None and not code.startswith("<"), code  # our error body
    remote.run(lambda h: h.assert_alive())
