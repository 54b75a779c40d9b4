"""run_join end to end against a fake IMDS and a fake gateway on loopback."""

from __future__ import annotations

import base64
import logging
import random
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.agent.errors import JoinFailed
from gateway.agent.keys import load_or_create_keys
from gateway.agent.nodeconfig import AgentSettings
from gateway.agent.runner import DATA_FILES, run_join
from gateway.core.clock import FixedClock
from gateway.core.tlsutil import ssh_key_pin
from tests.unit.test_agent_fakes import (
    FakeGateway,
    FakeImds,
    Scripted,
    SleepRecorder,
    make_tls_server_cert,
    ssh_ca_line,
)

CLIENT_ID = "11111111-1111-1111-1111-111111111111"


@asynccontextmanager
async def world(
    tmp_path: Path, *, aia_path: str = "/pkiops/certs/fake-intermediate.crt", **overrides: Any
) -> AsyncIterator[tuple[FakeImds, FakeGateway, AgentSettings]]:
    imds, gw = FakeImds(aia_path=aia_path), FakeGateway()
    async with imds.running(), gw.running():
        settings = AgentSettings(
            token_name="azure-token",
            client_id=CLIENT_ID,
            gateway_url=gw.base_url,
            imds_url=imds.base_url,
            data_dir=tmp_path / "teleport",
            node_name="web-1",
            aia_allowed_prefixes=(imds.base_url + "/pkiops/certs/",),
            max_attempts=5,
        )
        yield imds, gw, replace(settings, **overrides)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_a_join_writes_private_files_for_our_keys(tmp_path: Path) -> None:
    async with world(tmp_path) as (imds, gw, settings):
        outcome = await run_join(settings, sleep=SleepRecorder())
    data = settings.data_dir
    assert outcome.attempts == 1
    assert outcome.files == tuple(data / n for n in DATA_FILES)
    assert outcome.join.resource_group == "group1" and outcome.join.method == "azure"
    assert (data / "host_id").read_text().strip() == outcome.host_id
    assert mode(data) == 0o700
    for p in data.rglob("*"):
        if not p.is_symlink():
            assert mode(p) == (0o700 if p.is_dir() else 0o600), p
    assert not [p for p in data.rglob("*") if p.name.endswith(".tmp")]
    # The stable names lead through ``current`` to one set directory.
    [one_set] = (data / "sets").iterdir()
    assert (data / "current").resolve() == one_set
    for name in DATA_FILES:
        assert (data / name).resolve() == one_set / name
    keys = load_or_create_keys(data)
    cert = x509.load_pem_x509_certificate((data / "tls.crt").read_bytes())
    assert (
        cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == keys.public_tls_key.encode()
    )
    assert (data / "ssh.crt").read_text().startswith("ssh-ed25519-cert-v01@openssh.com ")
    assert (data / "ssh_ca.pub").read_text().startswith("ssh-ed25519 ")
    assert x509.load_pem_x509_certificates((data / "tls_ca.crt").read_bytes())[0] == gw.ca[0]
    # The protocol as DESIGN §1 has it: the document is for the challenge the gateway issued.
    [join] = gw.joins
    [doc_req] = imds.of("/metadata/attested/document")
    [tok_req] = imds.of("/metadata/identity/oauth2/token")
    assert doc_req.query["nonce"] == join.body["challenge"] == gw.issued[0]
    assert doc_req.headers["Metadata"] == tok_req.headers["Metadata"] == "true"
    assert tok_req.query["client_id"] == CLIENT_ID
    assert tok_req.query["resource"] == "https://management.azure.com/"
    assert join.body["access_token"] == imds.access_token
    assert join.body["host"]["public_ssh_key"] == keys.public_ssh_key
    assert set(join.body) == {
        "token_name",
        "challenge",
        "attested_data",
        "intermediates",
        "access_token",
        "host",
    }


@pytest.mark.parametrize(
    ("script", "max_attempts", "code", "attempts", "check_waits"),
    [
        ([Scripted(503, "overloaded", "7")], 5, None, 2, lambda w: w[0] >= 7),
        (
            [Scripted(429, "rate_limited", "3"), Scripted(503, "overloaded", "1")],
            5,
            None,
            3,
            lambda w: w[0] >= 3 and w[1] >= 1,
        ),
        ([Scripted(502, "upstream_failed")], 5, None, 2, lambda w: 0 <= w[0] <= 0.5),
        ([Scripted(504, raw="<html>gateway timeout</html>")], 5, None, 2, lambda w: len(w) == 1),
        ([Scripted(403, "not_allowed")], 5, "not_allowed", 1, lambda w: w == []),
        ([Scripted(404, "unknown_token")], 5, "unknown_token", 1, lambda w: w == []),
        ([Scripted(400, "invalid_request")], 5, "invalid_request", 1, lambda w: w == []),
        ([Scripted(503, "overloaded", "1")] * 10, 3, "overloaded", 3, lambda w: len(w) == 2),
    ],
    ids=[
        "503 with Retry-After is retried no sooner than asked",
        "429 then 503 are each honoured",
        "502 is retried after a jittered delay under the base",
        "a proxy's HTML 504 is retried",
        "403 not_allowed is not retried",
        "404 unknown_token is not retried",
        "400 invalid_request is not retried",
        "max_attempts stops the retries with the last code",
    ],
)
async def test_retries(
    tmp_path: Path,
    script: list[Scripted],
    max_attempts: int,
    code: str | None,
    attempts: int,
    check_waits: Any,
) -> None:
    sleep = SleepRecorder()
    async with world(tmp_path, max_attempts=max_attempts) as (_imds, gw, settings):
        gw.script = list(script)
        if code is None:
            outcome = await run_join(settings, sleep=sleep, rng=random.Random(3))
            assert outcome.attempts == attempts
        else:
            with pytest.raises(JoinFailed) as err:
                await run_join(settings, sleep=sleep, rng=random.Random(3))
            assert err.value.code == code
            assert err.value.attempts == attempts
            assert not (settings.data_dir / "host_id").exists()
        assert len(gw.joins) == attempts
    assert check_waits(sleep.waits), sleep.waits


async def test_a_reused_challenge_is_retried_with_a_fresh_challenge_and_document(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as (imds, gw, settings):
        gw.script = [Scripted(403, "challenge_reused")]
        outcome = await run_join(settings, sleep=SleepRecorder())
    assert outcome.attempts == 2
    first, second = (j.body for j in gw.joins)
    assert first["challenge"] != second["challenge"]
    assert gw.issued == [first["challenge"], second["challenge"]]
    assert [r.query["nonce"] for r in imds.of("/metadata/attested/document")] == gw.issued
    assert first["attested_data"] != second["attested_data"]


async def test_a_throttled_imds_is_retried_inside_the_attempt(tmp_path: Path) -> None:
    sleep = SleepRecorder()
    async with world(tmp_path) as (imds, _gw, settings):
        imds.token_statuses = [429]
        outcome = await run_join(settings, sleep=sleep)
    assert outcome.attempts == 1 and len(sleep.waits) == 1
    assert len(imds.of("/metadata/identity/oauth2/token")) == 2


async def test_an_identity_imds_refuses_ends_the_join(tmp_path: Path) -> None:
    async with world(tmp_path) as (imds, gw, settings):
        imds.token_statuses = [400]
        with pytest.raises(JoinFailed) as err:
            await run_join(settings, sleep=SleepRecorder())
    assert (err.value.code, err.value.status) == ("imds_failed", 400)
    assert gw.joins == []


async def test_the_total_timeout_ends_the_retries(tmp_path: Path) -> None:
    clock = FixedClock(1_800_000_000)

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    async with world(tmp_path, total_timeout=20.0, max_attempts=100) as (_i, gw, settings):
        gw.script = [Scripted(503, "overloaded", "8")] * 100
        with pytest.raises(JoinFailed) as err:
            await run_join(settings, sleep=sleep, clock=clock)
    assert err.value.code == "deadline_exceeded"
    assert err.value.attempts == 3  # waits of 8 s: 0 → 8 → 16, a third wait would pass 20 s


@pytest.mark.parametrize(
    ("mode", "pins", "code"),
    [
        ("ok", "gateway", None),
        ("rogue_ca", "gateway", "ca_pin_mismatch"),
        ("rogue_leaf", "gateway", "ca_pin_mismatch"),
        ("ok", "other", "ca_pin_mismatch"),
        ("other_key", "none", "tls_key_mismatch"),
    ],
    ids=[
        "certificates from the pinned CA are accepted",
        "a CA that does not match the pin is refused and nothing is written",
        "listing the pinned CA while signing with another is refused",
        "a pin for some other CA refuses the real one",
        "a TLS certificate for a key that is not ours is refused",
    ],
)
async def test_returned_certificates_are_checked_before_anything_is_written(
    tmp_path: Path, mode: str, pins: str, code: str | None
) -> None:
    async with world(tmp_path) as (_imds, gw, settings):
        gw.issue_mode = mode
        pin = {"gateway": (gw.ca_pin,), "other": ("sha256:" + "00" * 32,), "none": ()}[pins]
        settings = replace(settings, ca_pins=pin)
        if code is None:
            await run_join(settings, sleep=SleepRecorder())
            assert (settings.data_dir / "host_id").exists()
            return
        with pytest.raises(JoinFailed) as err:
            await run_join(settings, sleep=SleepRecorder())
    assert err.value.code == code
    assert err.value.attempts == 1 and len(gw.joins) == 1
    for name in DATA_FILES:
        assert not (settings.data_dir / name).exists(), name


def _ssh_pin(key: ed25519.Ed25519PrivateKey) -> str:
    return ssh_key_pin(key.public_key())


@pytest.mark.parametrize(
    ("mode", "tls_pin", "ssh_pin", "code", "tls_cas", "ssh_cas"),
    [
        ("extra_ca", True, False, None, 1, 1),
        ("extra_ca", False, False, None, 2, 1),
        ("ok", False, True, None, 1, 1),
        ("extra_ssh_ca", True, True, None, 1, 1),
        ("extra_ssh_ca", False, False, None, 1, 2),
        ("rogue_ssh_ca", False, True, "ssh_ca_pin_mismatch", 0, 0),
        ("rogue_ssh_leaf", False, True, "ssh_ca_pin_mismatch", 0, 0),
        ("forged_ssh_signature", False, True, "ssh_ca_pin_mismatch", 0, 0),
        ("user_ssh_cert", False, True, "bad_response", 0, 0),
        ("rogue_ssh_ca", False, False, None, 1, 1),
        ("ok", False, "other", "ssh_ca_pin_mismatch", 0, 0),
    ],
    ids=[
        "with a CA pin an unpinned extra CA is left out of the trust file",
        "without a CA pin every returned CA is written, as before",
        "a host certificate signed by the pinned SSH CA is accepted",
        "with an SSH CA pin an unpinned extra SSH CA is left out of ssh_ca.pub",
        "without an SSH CA pin every returned SSH CA is written, as before",
        "an SSH CA that does not match the pin is refused and nothing is written",
        "listing the pinned SSH CA while signing with another is refused",
        "a certificate naming the pinned SSH CA with a forged signature is refused",
        "a user certificate from the pinned SSH CA is not a host certificate",
        "without an SSH CA pin any signer is accepted (with a warning)",
        "an SSH CA pin for some other key refuses the real SSH CA",
    ],
)
async def test_only_pinned_cas_are_trusted(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    tls_pin: bool,
    ssh_pin: bool | str,
    code: str | None,
    tls_cas: int,
    ssh_cas: int,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.agent")
    async with world(tmp_path) as (_imds, gw, settings):
        gw.issue_mode = mode
        pin = _ssh_pin(gw.ssh_ca) if ssh_pin is True else "sha256:" + "00" * 32
        settings = replace(
            settings,
            ca_pins=(gw.ca_pin,) if tls_pin else (),
            ssh_ca_pins=(pin,) if ssh_pin else (),
        )
        if code is not None:
            with pytest.raises(JoinFailed) as err:
                await run_join(settings, sleep=SleepRecorder())
            assert err.value.code == code
            for name in DATA_FILES:
                assert not (settings.data_dir / name).exists(), name
            return
        await run_join(settings, sleep=SleepRecorder())
    data = settings.data_dir
    written = x509.load_pem_x509_certificates((data / "tls_ca.crt").read_bytes())
    assert len(written) == tls_cas and written[0] == gw.ca[0]
    lines = (data / "ssh_ca.pub").read_text().splitlines()
    assert len(lines) == ssh_cas
    assert lines[0] == ssh_ca_line(gw.rogue_ssh_ca if mode == "rogue_ssh_ca" else gw.ssh_ca)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert ("teleport.ssh_ca_pin is not set" in warned) == (not ssh_pin)
    assert ("teleport.ca_pin is not set" in warned) == (not tls_pin)


@pytest.mark.parametrize(
    ("aia_path", "allowed", "fetched", "sent"),
    [
        ("/pkiops/certs/fake-intermediate.crt", True, True, True),
        ("/elsewhere/fake-intermediate.crt", True, False, False),
        ("/pkiops/certs/../../elsewhere/x.crt", True, False, False),
        ("/pkiops/certs/fake-intermediate.crt", False, False, False),
    ],
    ids=[
        "an intermediate under an allowed prefix is fetched and sent",
        "a leaf whose AIA URL is off the list is not fetched",
        "a dot-dot path cannot escape the allowed prefix",
        "with collection off nothing is fetched",
    ],
)
async def test_intermediates_are_collected_only_from_allowed_prefixes(
    tmp_path: Path, aia_path: str, allowed: bool, fetched: bool, sent: bool
) -> None:
    async with world(tmp_path, aia_path=aia_path, collect_intermediates=allowed) as (
        imds,
        gw,
        settings,
    ):
        gw.script = [Scripted(503, "overloaded", "1")]  # two attempts: fetched once, cached
        await run_join(settings, sleep=SleepRecorder())
    aia_requests = [r for r in imds.requests if not r.path.startswith("/metadata/")]
    assert len(aia_requests) == (1 if fetched else 0)
    for join in gw.joins:
        if sent:
            assert join.body["intermediates"] == [base64.b64encode(imds.intermediate_der).decode()]
        else:
            assert "intermediates" not in join.body


async def test_a_failed_intermediate_fetch_does_not_stop_the_join(tmp_path: Path) -> None:
    async with world(tmp_path, aia_path="/pkiops/certs/missing.crt") as (imds, gw, settings):
        imds.aia_path = "/pkiops/certs/served-elsewhere.crt"  # the leaf's URL now 404s
        outcome = await run_join(settings, sleep=SleepRecorder())
    assert outcome.attempts == 1
    assert [r.path for r in imds.requests if r.path.startswith("/pkiops/")] == [
        "/pkiops/certs/missing.crt"
    ]
    assert "intermediates" not in gw.joins[0].body


async def test_local_addr_binds_the_source_address(tmp_path: Path) -> None:
    async with world(tmp_path, local_addr="127.0.0.2") as (imds, gw, settings):
        await run_join(settings, sleep=SleepRecorder())
    assert {r.remote for r in gw.requests} == {"127.0.0.2"}
    assert {r.remote for r in imds.requests} == {"127.0.0.2"}


async def test_without_local_addr_the_default_source_is_used(tmp_path: Path) -> None:
    async with world(tmp_path) as (_imds, gw, settings):
        await run_join(settings, sleep=SleepRecorder())
    assert {r.remote for r in gw.requests} == {"127.0.0.1"}


@pytest.mark.parametrize(
    ("trust", "code"),
    [(True, None), (False, "tls_verify_failed")],
    ids=[
        "a gateway certificate trusted through ca_file is accepted over real TLS",
        "an untrusted gateway certificate fails at once and is not retried",
    ],
)
async def test_real_tls_to_the_gateway(tmp_path: Path, trust: bool, code: str | None) -> None:
    server_ctx, ca_path = make_tls_server_cert(tmp_path)
    imds, gw = FakeImds(), FakeGateway()
    async with imds.running(), gw.running(ssl_context=server_ctx):
        assert gw.base_url.startswith("https://127.0.0.1:")
        settings = AgentSettings(
            token_name="azure-token",
            gateway_url=gw.base_url,
            imds_url=imds.base_url,
            data_dir=tmp_path / "d",
            node_name="web-1",
            ca_file=ca_path if trust else None,
            collect_intermediates=False,
        )
        sleep = SleepRecorder()
        if code is None:
            outcome = await run_join(settings, sleep=sleep)
            assert outcome.attempts == 1 and len(gw.joins) == 1
        else:
            with pytest.raises(JoinFailed) as err:
                await run_join(settings, sleep=sleep)
            assert err.value.code == code and err.value.attempts == 1
            assert sleep.waits == [] and gw.requests == []


async def test_a_caller_session_is_used_and_left_open(tmp_path: Path) -> None:
    async with world(tmp_path) as (_imds, _gw, settings), aiohttp.ClientSession() as session:
        await run_join(settings, session=session, sleep=SleepRecorder())
        assert not session.closed


async def test_the_access_token_is_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with world(tmp_path) as (imds, gw, settings):
        gw.script = [Scripted(503, "overloaded", "1"), Scripted(403, "not_allowed")]
        imds.token_statuses = [500]
        with pytest.raises(JoinFailed) as err:
            await run_join(settings, sleep=SleepRecorder())
    token = imds.access_token
    assert len(caplog.records) >= 3, "nothing was logged: this test would prove nothing"
    for record in caplog.records:
        assert token not in record.getMessage()
        assert token.split(".")[2] not in record.getMessage()
    assert token not in str(err.value)
    assert gw.joins[0].body["access_token"] == token  # the token did flow, just not to the log


async def test_a_second_join_reuses_the_node_keys(tmp_path: Path) -> None:
    async with world(tmp_path) as (_imds, gw, settings):
        first = await run_join(settings, sleep=SleepRecorder())
        second = await run_join(settings, sleep=SleepRecorder())
    assert first.host_id != second.host_id
    a, b = (j.body["host"] for j in gw.joins)
    assert a["public_ssh_key"] == b["public_ssh_key"]
    assert a["public_tls_key"] == b["public_tls_key"]


async def test_the_agent_asks_for_no_node_name_unless_one_is_configured(tmp_path: Path) -> None:
    # The gateway names the node after the VM's verified Azure name (a uniform scale-set
    # instance's hostname is not its Azure name); a configured name is sent as it is.
    async with world(tmp_path, node_name="") as (_imds, gw, settings):
        await run_join(settings, sleep=SleepRecorder())
        assert "node_name" not in gw.joins[-1].body["host"]
    async with world(tmp_path / "named") as (_imds, gw, settings):
        await run_join(settings, sleep=SleepRecorder())
        assert gw.joins[-1].body["host"]["node_name"] == "web-1"
