"""End-to-end joins: emulator, auth service and gateway on loopback, over real TLS.

One table of join cases runs twice: through ``admit_join()`` with the gateway's own
production dependencies, and over HTTPS against the running gateway. Each case asserts
the status and the error code; the successful ones also check what the auth service
recorded. The real agent then joins VMs of every kind and is refused where it must be.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gateway.agent import JoinFailed, run_join
from gateway.agent.keys import load_or_create_keys
from gateway.core.errors import GatewayError
from gateway.dev.devstack import DevStack, agent_settings, dev_stack
from gateway.dev.emulator import EmulatedVm
from gateway.http.schema import decode_join_request
from gateway.join.pipeline import JoinTrace, admit_join
from tests.support.forge_tokens import resign
from tests.support.tokens import refusal_tokens_yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")

S1 = "11111111-1111-1111-1111-111111111111"  # allowed: any resource group
S2 = "33333333-3333-3333-3333-333333333333"  # allowed: group1, group2
S3 = "55555555-5555-5555-5555-555555555555"  # not allowed
S4 = "66666666-6666-6666-6666-666666666666"  # only through the tenant rule
T_RULE = "44444444-4444-4444-4444-444444444444"

TOKENS = f"""
kind: token
version: v2
metadata:
  name: azure-token
spec:
  roles: [Node]
  join_method: azure
  azure:
    # The names the joins below ask for: a host name per VM (a scale-set instance's
    # with a dash: "_" is no DNS character) and the VM's own NIC address.
    host_names: ["{{vm_name}}.internal", "{{scale_set}}-{{instance_id}}.internal"]
    host_ips: nic
    allow:
      - subscription: {S1}
      - subscription: {S2}
        resource_groups: ["group1", "Group2"]
      - tenant: {T_RULE}
---
""" + refusal_tokens_yaml(S1)


@dataclass
class Fleet:
    user_vm: EmulatedVm
    system_vm: EmulatedVm
    neighbour_vm: EmulatedVm  # same resource group as user_vm
    ss_user: EmulatedVm
    ss_system: EmulatedVm
    group1_vm: EmulatedVm
    group2_case_vm: EmulatedVm
    group3_vm: EmulatedVm
    other_sub_vm: EmulatedVm
    tenant_rule_vm: EmulatedVm


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevStack]:
    async with dev_stack(tmp_path_factory.mktemp("e2e"), tokens_yaml=TOKENS) as st:
        yield st


@pytest.fixture(scope="module")
def fleet(stack: DevStack) -> Fleet:
    emu = stack.emulator
    t1 = emu.add_tenant()
    t2 = emu.add_tenant(T_RULE)

    def vm(sub: str, rg: str, name: str, identity: str = "user", tenant: str = t1) -> EmulatedVm:
        return emu.add_vm(
            subscription=sub, resource_group=rg, name=name, tenant=tenant, identity=identity
        )

    ss = emu.add_scale_set(
        subscription=S1,
        resource_group="rg-ss",
        name="pool",
        tenant=t1,
        capacity=3,
        identity="user",
    )
    ss_sys = emu.add_scale_set(
        subscription=S1,
        resource_group="rg-ss2",
        name="pool2",
        tenant=t1,
        capacity=2,
        identity="system",
    )
    return Fleet(
        user_vm=vm(S1, "rg-a", "user-vm"),
        system_vm=vm(S1, "rg-a", "system-vm", identity="system"),
        neighbour_vm=vm(S1, "rg-a", "neighbour-vm"),
        ss_user=ss[1],
        ss_system=ss_sys[0],
        group1_vm=vm(S2, "group1", "g1-vm"),
        group2_case_vm=vm(S2, "GROUP2", "g2-vm"),
        group3_vm=vm(S2, "group3", "g3-vm"),
        other_sub_vm=vm(S3, "rg-x", "s3-vm"),
        tenant_rule_vm=vm(S4, "anything", "t2-vm", tenant=t2),
    )


# --- building requests ------------------------------------------------------------------


@dataclass
class Ctx:
    stack: DevStack
    fleet: Fleet
    keys_dir: Path

    def challenge(self) -> str:
        return self.stack.gateway.deps.challenges.issue().value

    def body(
        self,
        vm: EmulatedVm,
        challenge: str,
        *,
        doc_vm: EmulatedVm | None = None,
        nonce: str | None = None,
        token_name: str = "azure-token",
        role: str = "Node",
    ) -> dict[str, Any]:
        emu = self.stack.emulator
        keys = load_or_create_keys(self.keys_dir)
        return {
            "token_name": token_name,
            "challenge": challenge,
            "attested_data": emu.attested_document_for(
                doc_vm or vm, nonce=challenge if nonce is None else nonce
            ),
            "intermediates": [base64.b64encode(_pem_to_der(emu.intermediate_pem)).decode()],
            "access_token": emu.token_for(vm),
            "host": {
                "node_name": vm.name,
                "role": role,
                "public_ssh_key": keys.public_ssh_key,
                "public_tls_key": keys.public_tls_key,
                "additional_principals": [vm.private_ips[0]],
                "dns_names": [f"{vm.name.replace('_', '-')}.internal"],
            },
        }


def _pem_to_der(pem: bytes) -> bytes:
    lines = [ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----")]
    return base64.b64decode("".join(lines))


Builder = Callable[[Ctx], Awaitable[bytes]]


def ok_for(pick: Callable[[Fleet], EmulatedVm]) -> Builder:
    async def build(ctx: Ctx) -> bytes:
        return json.dumps(ctx.body(pick(ctx.fleet), ctx.challenge())).encode()

    return build


def body_with(**kwargs: Any) -> Builder:
    vm_pick = kwargs.pop("vm", lambda f: f.user_vm)
    doc_pick = kwargs.pop("doc_vm", None)

    async def build(ctx: Ctx) -> bytes:
        doc = doc_pick(ctx.fleet) if doc_pick else None
        return json.dumps(
            ctx.body(vm_pick(ctx.fleet), ctx.challenge(), doc_vm=doc, **kwargs)
        ).encode()

    return build


def mutated(mutate: Callable[[dict[str, Any]], object]) -> Builder:
    async def build(ctx: Ctx) -> bytes:
        body = ctx.body(ctx.fleet.user_vm, ctx.challenge())
        result = mutate(body)
        if isinstance(result, bytes):
            return result
        return json.dumps(body).encode()

    return build


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = body
        for p in parents:
            node = node[p]
        node[last] = value

    return mutate


async def replayed(ctx: Ctx) -> bytes:
    body = json.dumps(ctx.body(ctx.fleet.user_vm, ctx.challenge())).encode()
    req = decode_join_request(body, client_address="127.0.0.1")
    await admit_join(req, ctx.stack.gateway.deps, JoinTrace())  # first redemption succeeds
    return body


CASES: list[tuple[str, Builder, int, str | None]] = [
    ("a VM with a user-assigned identity joins", ok_for(lambda f: f.user_vm), 200, None),
    ("a VM with a system-assigned identity joins", ok_for(lambda f: f.system_vm), 200, None),
    (
        "a scale-set instance with a user-assigned identity joins",
        ok_for(lambda f: f.ss_user),
        200,
        None,
    ),
    (
        "a scale-set instance with a system-assigned identity joins",
        ok_for(lambda f: f.ss_system),
        200,
        None,
    ),
    ("a VM in an allowed resource group joins", ok_for(lambda f: f.group1_vm), 200, None),
    ("resource groups compare case-insensitively", ok_for(lambda f: f.group2_case_vm), 200, None),
    (
        "a tenant rule admits any subscription of the tenant",
        ok_for(lambda f: f.tenant_rule_vm),
        200,
        None,
    ),
    (
        "a resource group outside the rule is refused",
        ok_for(lambda f: f.group3_vm),
        403,
        "not_allowed",
    ),
    (
        "a subscription no rule names is refused",
        ok_for(lambda f: f.other_sub_vm),
        403,
        "not_allowed",
    ),
    (
        "another VM's document with this VM's token is refused",
        body_with(doc_vm=lambda f: f.neighbour_vm),
        403,
        "vm_binding_failed",
    ),
    (
        "a document from another subscription is refused",
        body_with(doc_vm=lambda f: f.other_sub_vm),
        403,
        "subscription_mismatch",
    ),
    (
        "a document for another nonce is refused",
        body_with(nonce="another-nonce"),
        403,
        "nonce_mismatch",
    ),
    ("a replayed challenge is refused", replayed, 403, "challenge_reused"),
    ("an unknown token name is 404", body_with(token_name="no-such-token"), 404, "unknown_token"),
    (
        "a token of another join method is refused",
        body_with(token_name="static-token"),
        403,
        "token_wrong_method",
    ),
    ("an expired token is refused", body_with(token_name="expired-token"), 403, "token_expired"),
    ("a role the token does not allow is refused", body_with(role="Kube"), 403, "role_not_allowed"),
    (
        "a made-up challenge is refused",
        mutated(_set("challenge", "A" * 32)),
        403,
        "challenge_invalid",
    ),
    (
        "a signature that is not base64 is malformed",
        mutated(_set("attested_data.signature", "%%%not-base64%%%")),
        400,
        "attested_malformed",
    ),
    (
        "base64 that is not CMS is malformed",
        mutated(_set("attested_data.signature", base64.b64encode(b"hello").decode())),
        400,
        "attested_malformed",
    ),
    (
        "an access token that is not a JWT is malformed",
        mutated(_set("access_token", "not-a-jwt")),
        400,
        "access_token_malformed",
    ),
    ("an unknown field is refused", mutated(_set("extra", 1)), 400, "invalid_request"),
    ("a wrong type is refused", mutated(_set("host.dns_names", "x")), 400, "invalid_request"),
    (
        "a bad SSH public key is refused",
        mutated(_set("host.public_ssh_key", "ssh-rsa AAAA")),
        400,
        "invalid_request",
    ),
    ("a body that is not JSON is refused", mutated(lambda b: b"{not json"), 400, "malformed_body"),
    ("a body over 64 KiB is refused", mutated(lambda b: b" " * 70000), 413, "body_too_large"),
]
IDS = [c[0] for c in CASES]
PARAMS = [c[1:] for c in CASES]


@pytest.fixture
def ctx(stack: DevStack, fleet: Fleet, tmp_path: Path) -> Ctx:
    return Ctx(stack, fleet, tmp_path / "keys")


@pytest.mark.parametrize(("build", "status", "code"), PARAMS, ids=IDS)
async def test_admit_join_table(ctx: Ctx, build: Builder, status: int, code: str | None) -> None:
    raw = await build(ctx)
    try:
        req = decode_join_request(raw, client_address="127.0.0.1")
        outcome = await admit_join(req, ctx.stack.gateway.deps, JoinTrace())
    except GatewayError as err:
        assert (err.status, err.code.value) == (status, code), err.detail
        return
    assert (status, code) == (200, None)
    records = {r.host_id: r for r in await ctx.stack.auth.records()}
    record = records[outcome.result.host_id]
    assert record.registration.join.vm_id == outcome.attrs.vm_id
    assert record.idempotency_key == req.challenge


@pytest.mark.parametrize(("build", "status", "code"), PARAMS, ids=IDS)
async def test_https_join_table(ctx: Ctx, build: Builder, status: int, code: str | None) -> None:
    raw = await build(ctx)
    ssl_ctx = ssl.create_default_context(cafile=str(ctx.stack.gateway_ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            ctx.stack.gateway_url + "/v1/join/azure",
            data=raw,
            headers={"Content-Type": "application/json"},
            ssl=ssl_ctx,
        ) as resp,
    ):
        body = await resp.json()
    assert resp.status == status, body
    if code is None:
        assert set(body) == {"host_id", "certs", "join"}
        records = {r.host_id: r for r in await ctx.stack.auth.records()}
        record = records[body["host_id"]]
        assert record.registration.join.vm_id == body["join"]["vm_id"]
        assert record.registration.client_address == "127.0.0.1"
    else:
        assert body == {"error": {"code": code, "message": body["error"]["message"]}}
        if status == 403:
            # A 403 says no more than the code's summary: the reason is in the audit log.
            from gateway.core.errors import CODES, Code

            assert body["error"]["message"] == CODES[Code(code)].summary


# --- the real agent ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pick",
    [lambda f: f.user_vm, lambda f: f.system_vm, lambda f: f.ss_user, lambda f: f.tenant_rule_vm],
    ids=[
        "the agent joins a VM with a user-assigned identity",
        "the agent joins a VM with a system-assigned identity",
        "the agent joins a scale-set instance",
        "the agent joins through a tenant rule",
    ],
)
async def test_agent_joins_and_certificates_verify(
    stack: DevStack, fleet: Fleet, tmp_path: Path, pick: Callable[[Fleet], EmulatedVm]
) -> None:
    vm = pick(fleet)
    pin = stack.auth.ca_pin()
    settings = agent_settings(stack, vm, data_dir=tmp_path / "node", ca_pins=(pin,))
    outcome = await run_join(settings)
    assert outcome.join.vm_id == vm.vm_id
    node = tmp_path / "node"
    for name in ("host_id", "tls.crt", "tls_ca.crt", "ssh.crt", "ssh_ca.pub"):
        assert (node / name).stat().st_mode & 0o777 == 0o600
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(node / "tls_ca.crt"), str(node / "tls.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    listing = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(node / "ssh.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "host certificate" in listing.stdout and outcome.host_id in listing.stdout


async def test_agent_is_refused_with_the_code(
    stack: DevStack, fleet: Fleet, tmp_path: Path
) -> None:
    settings = agent_settings(stack, fleet.other_sub_vm, data_dir=tmp_path / "node")
    with pytest.raises(JoinFailed) as err:
        await run_join(settings)
    assert err.value.code == "not_allowed"
    assert not (tmp_path / "node" / "tls.crt").exists()


async def test_agent_refuses_a_cluster_ca_that_does_not_match_its_pin(
    stack: DevStack, fleet: Fleet, tmp_path: Path
) -> None:
    settings = agent_settings(
        stack, fleet.user_vm, data_dir=tmp_path / "node", ca_pins=("sha256:" + "0" * 64,)
    )
    with pytest.raises(JoinFailed) as err:
        await run_join(settings)
    assert err.value.code == "ca_pin_mismatch"
    assert not (tmp_path / "node" / "tls.crt").exists()


async def test_every_decision_is_audited_without_secrets(
    stack: DevStack, fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="gateway.audit")
    ctx = Ctx(stack, fleet, tmp_path / "keys")
    good = ctx.body(fleet.user_vm, ctx.challenge())
    bad = ctx.body(fleet.group3_vm, ctx.challenge())
    ssl_ctx = ssl.create_default_context(cafile=str(stack.gateway_ca_file))
    async with aiohttp.ClientSession() as session:
        for body in (good, bad):
            async with session.post(
                stack.gateway_url + "/v1/join/azure", json=body, ssl=ssl_ctx
            ) as r:
                await r.read()
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert [r["outcome"] for r in records[-2:]] == ["joined", "rejected"]
    refused = records[-1]
    assert refused["code"] == "not_allowed"
    assert refused["resource_group"].lower() == "group3"
    assert refused["vm_id"] == fleet.group3_vm.vm_id
    assert refused["detail"]  # the full reason, which the 403 body does not carry
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (good["access_token"], bad["access_token"], good["attested_data"]["signature"]):
        assert secret not in text


async def test_readiness_and_health(stack: DevStack) -> None:
    ssl_ctx = ssl.create_default_context(cafile=str(stack.gateway_ca_file))
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.gateway_url + "/healthz", ssl=ssl_ctx) as r:
            assert r.status == 200
        async with session.get(stack.gateway_url + "/readyz", ssl=ssl_ctx) as r:
            body = await r.json()
            assert r.status == 200, body
            assert body["checks"]["upstream"] is True
        async with session.get(stack.gateway_url + "/nope", ssl=ssl_ctx) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with session.get(stack.gateway_url + "/v1/join/azure", ssl=ssl_ctx) as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"


async def test_sighup_reload_picks_up_rotated_challenge_keys(stack: DevStack) -> None:
    from gateway.join.challenge import promote_key, retire_keys, stage_key

    server = stack.gateway
    keys_file = server.config.path(server.config.challenge.keys_file)
    original = keys_file.read_bytes()
    try:
        before = server.deps.challenges.issue().value
        stage_key(keys_file)
        promote_key(keys_file)
        assert server.reload()
        assert server.deps.challenges.key_count == 2
        server.deps.challenges.verify(before)  # the old key still verifies
        retire_keys(keys_file)
        assert server.reload()
        with pytest.raises(GatewayError) as err:
            server.deps.challenges.verify(before)
        assert err.value.code.value == "challenge_invalid"
        keys_file.write_text("not base64!!\n")
        assert not server.reload()  # a broken file keeps the current keys
        assert server.deps.challenges.key_count == 1
    finally:
        keys_file.write_bytes(original)
        server.reload()


# --- the gateway and inspect agree ---------------------------------------------------------
#
# One table of evidence, run through the gateway over HTTPS and through `join-gateway
# inspect` on the same files: both read one step table, so they must give the same verdict
# and code. (inspect has no challenge, token files or Resource Manager: the cases are about
# the evidence, which both check the same way.)


def _resigned(ctx: Ctx, vm: EmulatedVm, **claims: Any) -> str:
    """``vm``'s own token with ``claims`` changed, signed by its tenant's current key."""
    signer = ctx.stack.emulator._tenant(vm.tenant).signer  # no public way to edit claims

    def edit(c: dict[str, Any]) -> None:
        for name, value in claims.items():
            if value is None:
                c.pop(name, None)
            else:
                c[name] = value

    return resign(ctx.stack.emulator.token_for(vm), signer.key, claims=edit)


def _storage_rid(vm: EmulatedVm) -> str:
    return (
        f"/subscriptions/{vm.subscription}/resourceGroups/{vm.resource_group}"
        "/providers/Microsoft.Storage/storageAccounts/logs"
    )


Evidence = Callable[[Ctx, dict[str, Any]], None]  # edits a join body in place


def _token_of(pick: Callable[[Fleet], EmulatedVm]) -> Evidence:
    def edit(ctx: Ctx, body: dict[str, Any]) -> None:
        body["access_token"] = ctx.stack.emulator.token_for(pick(ctx.fleet))

    return edit


AGREE: list[tuple[str, Evidence | None, str | None]] = [
    ("a VM's own document and token are accepted by both", None, None),
    (
        "a token whose VM is in another subscription than the document",
        _token_of(lambda f: f.other_sub_vm),
        "subscription_mismatch",
    ),
    (
        "a storage account's token",
        lambda ctx, body: body.update(
            access_token=_resigned(
                ctx,
                ctx.fleet.user_vm,
                xms_mirid=_storage_rid(ctx.fleet.user_vm),
                xms_az_rid=None,
            )
        ),
        "identity_unsupported",
    ),
    (
        "a document signed for another nonce",
        lambda ctx, body: body.update(
            attested_data=ctx.stack.emulator.attested_document_for(
                ctx.fleet.user_vm, nonce="another-nonce"
            )
        ),
        "nonce_mismatch",
    ),
    (
        "a token for another audience",
        lambda ctx, body: body.update(
            access_token=_resigned(ctx, ctx.fleet.user_vm, aud="https://vault.azure.net")
        ),
        "access_token_audience_invalid",
    ),
    (
        "a document that is base64 but not CMS",
        lambda ctx, body: body["attested_data"].update(
            signature=base64.b64encode(b"hello").decode()
        ),
        "attested_malformed",
    ),
    (
        "an access token that is not a JWT",
        lambda ctx, body: body.update(access_token="not-a-jwt"),
        "access_token_malformed",
    ),
]


async def _jwks_file(ctx: Ctx, tid: str, path: Path) -> Path:
    emu = ctx.stack.emulator
    tls = ssl.create_default_context(cadata=emu.tls_ca_pem.decode())
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{emu.https_url}/{tid}/discovery/keys", ssl=tls) as resp,
    ):
        assert resp.status == 200
        path.write_bytes(await resp.read())
    return path


def _inspect(argv: list[str]) -> tuple[int, dict[str, Any]]:
    from gateway.join.inspect import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = io.StringIO()
    rc = run(parser.parse_args([*argv, "--json"]), out=out, err=io.StringIO())
    return rc, json.loads(out.getvalue())


@pytest.mark.parametrize(("edit", "code"), [a[1:] for a in AGREE], ids=[a[0] for a in AGREE])
async def test_the_gateway_and_inspect_give_the_same_verdict(
    ctx: Ctx, tmp_path: Path, edit: Evidence | None, code: str | None
) -> None:
    vm = ctx.fleet.user_vm
    challenge = ctx.challenge()
    body = ctx.body(vm, challenge)
    if edit is not None:
        edit(ctx, body)

    ssl_ctx = ssl.create_default_context(cafile=str(ctx.stack.gateway_ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.post(ctx.stack.gateway_url + "/v1/join/azure", json=body, ssl=ssl_ctx) as resp,
    ):
        answer = await resp.json()
    gateway_code = None if resp.status == 200 else answer["error"]["code"]

    emu = ctx.stack.emulator
    (tmp_path / "doc.json").write_text(json.dumps(body["attested_data"]))
    (tmp_path / "token.jwt").write_text(body["access_token"])
    (tmp_path / "root.pem").write_bytes(emu.attestation_root_pem)
    (tmp_path / "intermediate.pem").write_bytes(emu.intermediate_pem)
    jwks = await _jwks_file(ctx, vm.tenant, tmp_path / "jwks.json")
    rc, report = await asyncio.to_thread(
        _inspect,
        [
            "--attested", str(tmp_path / "doc.json"),
            f"--nonce={challenge}",  # a challenge may begin with "-"
            "--ca-bundle", str(tmp_path / "root.pem"),
            "--ca-bundle", str(tmp_path / "intermediate.pem"),
            "--token", str(tmp_path / "token.jwt"),
            "--jwks", str(jwks),
        ],
    )  # fmt: skip

    assert gateway_code == code, answer
    assert report["code"] == code, report["checks"]
    assert (rc, report["verdict"]) == ((0, "accepted") if code is None else (1, "rejected"))
    if code is None:
        arm = next(c for c in report["checks"] if c["name"] == "arm")
        assert arm["status"] == "skipped"  # the gateway asked ARM; inspect says it did not


async def test_joins_no_rule_allows_cost_the_emulated_resource_manager_nothing(
    ctx: Ctx,
) -> None:
    """Over HTTPS against the emulator: refused from the signed resource ID alone."""
    emu = ctx.stack.emulator

    def arm_calls() -> int:
        return sum(n for name, n in emu.counters.items() if name.startswith("arm."))

    before = arm_calls()
    ssl_ctx = ssl.create_default_context(cafile=str(ctx.stack.gateway_ca_file))
    async with aiohttp.ClientSession() as session:
        for vm in (ctx.fleet.other_sub_vm, ctx.fleet.group3_vm, ctx.fleet.other_sub_vm):
            body = ctx.body(vm, ctx.challenge())
            async with session.post(
                ctx.stack.gateway_url + "/v1/join/azure", json=body, ssl=ssl_ctx
            ) as resp:
                answer = await resp.json()
            assert (resp.status, answer["error"]["code"]) == (403, "not_allowed")
    assert arm_calls() == before


async def test_sighup_swaps_the_challenge_keys_of_a_running_gateway(
    stack: DevStack, tmp_path: Path
) -> None:
    """A real ``serve`` process and a real SIGHUP: the keys swap whole; a bad file keeps
    the ones in use."""
    from gateway.core.clock import SystemClock
    from gateway.core.config import ChallengeConfig
    from gateway.join.challenge import ChallengeCodec, load_keys_file, write_new_keys_file
    from tests.support.gateway_proc import gateway_process

    keys_file = tmp_path / "challenge-keys"
    write_new_keys_file(keys_file, keep_existing=False)
    first = load_keys_file(keys_file)
    config = dataclasses.replace(stack.config, challenge=ChallengeConfig(keys_file=str(keys_file)))
    ssl_ctx = ssl.create_default_context(cafile=str(stack.gateway_ca_file))
    # gateway_process points prometheus_client at this directory; with one worker no
    # supervisor creates it.
    (tmp_path / "gw" / "prom").mkdir(parents=True)

    def signed_by(keys: list[bytes], challenge: str) -> bool:
        try:
            ChallengeCodec(keys, ttl=60, clock=SystemClock()).verify(challenge)
        except GatewayError:
            return False
        return True

    async with (
        gateway_process(config, tmp_path / "gw", stack.gateway_ca_file, workers=1) as gp,
        aiohttp.ClientSession() as session,
    ):

        async def challenge() -> str:
            async with session.post(
                gp.url + "/v1/join/azure/challenge", json={}, ssl=ssl_ctx
            ) as resp:
                value = (await resp.json())["challenge"]
                assert isinstance(value, str)
                return value

        assert signed_by(first, await challenge())
        write_new_keys_file(keys_file, keep_existing=False)  # a new key, the old one gone
        second = load_keys_file(keys_file)
        gp.send(signal.SIGHUP)
        for _ in range(100):
            issued = await challenge()
            if signed_by(second, issued):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the gateway never swapped to the new challenge key")
        assert not signed_by(first, issued)

        keys_file.write_text("not base64!!\n")
        gp.send(signal.SIGHUP)
        for _ in range(100):
            if "challenge keys reload failed" in gp.log():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the broken keys file was not reported")
        assert signed_by(second, await challenge())  # the keys in use stay
