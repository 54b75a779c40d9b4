"""The join pipeline, in process: one table through ``admit_join`` and ``verify_join``.

``JoinDeps`` is built from the real verifiers over in-process fakes that do real
cryptography: attested documents signed by a generated CA chain (``cms_forge``), access
tokens signed RS256 (``TokenMinter``), challenges MAC'd by the real codec. Only what sits
behind a socket is faked — Entra's key set, Resource Manager, the auth service — and each
fake records its calls. The table must reach every code the pipeline declares
(``PIPELINE_CODES``): a step that gains a code without a case here fails the suite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.azure.arm import VmRecord
from gateway.azure.attested import _MAX_PENDING_BUILDS, AttestedVerifier
from gateway.azure.certs import TrustStore
from gateway.azure.jwks import TokenVerifier
from gateway.azure.resource_id import ResourceId
from gateway.azure.vm_directory import VmDirectory
from gateway.core.cache import MemoryCache
from gateway.core.clock import FixedClock
from gateway.core.cloud import CLOUDS
from gateway.core.errors import (
    BadRequest,
    Code,
    GatewayError,
    JoinRejected,
    Overloaded,
    UpstreamFailed,
)
from gateway.core.redis_tier import redis_client
from gateway.core.reload import Reloadable
from gateway.join.binding import VmBinder
from gateway.join.challenge import ChallengeCodec, generate_key
from gateway.join.forward import CircuitBreaker
from gateway.join.pipeline import (
    PIPELINE_CODES,
    JoinDeps,
    JoinRequest,
    JoinTrace,
    admit_join,
    verify_join,
)
from gateway.join.replay import MemoryReplayStore, RedisReplayStore
from gateway.join.rules import load_token_files
from gateway.protocol import HostParams, RegisterResult, Registration
from gateway.protocol.possession import make_csr, sign_ssh_possession
from tests.support.cms_forge import INTERMEDIATE_CN, T0, Pki, azure_content, forge, make_pki
from tests.support.executors import GatedExecutor
from tests.support.ids import (
    OTHER_SUBSCRIPTION,
    OTHER_TENANT,
    SUBSCRIPTION,
    TENANT,
    VM_ID,
    VM_NAME,
    storage_rid,
    vm_rid,
    vmss_rid,
)
from tests.support.minter import TokenMinter
from tests.support.tokens import azure_token_yaml, refusal_tokens_yaml

NOW = T0 + timedelta(hours=1)
DOWN_TENANT = "44444444-4444-4444-4444-444444444444"  # Entra cannot be reached for it
OTHER_VM_ID = "0f3e9f3c-0000-4000-8000-000000000001"

TOKENS = (
    azure_token_yaml(SUBSCRIPTION, resource_groups=("kube",))
    + "---\n"
    + refusal_tokens_yaml(SUBSCRIPTION)
)


# --- fakes for what sits behind a socket -------------------------------------------------


class FakeEntraKeys:
    """Entra's signing keys per tenant (what ``JwksClient`` would fetch); a tenant in
    ``down`` answers as ``JwksClient`` does when Entra cannot be reached."""

    def __init__(self, keys: dict[str, dict[str, rsa.RSAPublicKey]]) -> None:
        self.keys = keys
        self.down = {DOWN_TENANT}
        self.calls: list[tuple[str, str]] = []

    async def key_for(self, tid: str, kid: str) -> rsa.RSAPublicKey:
        self.calls.append((tid, kid))
        if tid in self.down:
            raise Overloaded(Code.DEPENDENCY_UNAVAILABLE, retry_after=10, detail="Entra down")
        key = self.keys.get(tid, {}).get(kid)
        if key is None:
            raise JoinRejected(Code.ACCESS_TOKEN_KEY_UNKNOWN, f"no key {kid!r}")
        return key


class FakeArm:
    """Resource Manager's VMs by name; records every call (the tests count them)."""

    def __init__(self) -> None:
        self.vm_ids = {"node-0": VM_ID, "node-1": OTHER_VM_ID}
        self.calls: list[str] = []

    async def get_vm(self, rid: ResourceId, *, bearer: str) -> VmRecord | None:
        self.calls.append(rid.raw)
        if rid.name == "budget-spent":
            # What ArmClient raises when our own ARM budget has no token left.
            raise Overloaded(Code.AZURE_BUDGET_EXHAUSTED, retry_after=1.0, detail="budget")
        vm_id = self.vm_ids.get(rid.name)
        if vm_id is None:
            return None
        return VmRecord(
            resource_id=rid.raw,
            name=rid.name,
            vm_id=vm_id,
            resource_group=rid.resource_group,
            subscription=rid.subscription,
            location="westeurope",
            tags={"env": "prod", "owner": "someone"},
        )

    def __getattr__(self, name: str) -> Any:
        # Listings and scale-set reads are out of reach (list_threshold, no scale set):
        # any other ArmClient method the directory calls is a failure of this table.
        raise AssertionError(f"unexpected ARM call {name}")


class FakeAuth:
    """The auth service: registers, or fails as ``AuthClient`` does, by the SSH key's
    comment (the node name is the gateway's decision now, not the case's)."""

    def __init__(self) -> None:
        self.breaker = CircuitBreaker(clock=FixedClock(NOW))
        self.registrations: list[Registration] = []

    async def register(self, reg: Registration) -> RegisterResult:
        self.registrations.append(reg)
        if reg.host.public_ssh_key.endswith(" upstream-down"):
            raise Overloaded(Code.UPSTREAM_UNAVAILABLE, retry_after=5.0, detail="circuit open")
        if reg.host.public_ssh_key.endswith(" locked"):
            raise JoinRejected(Code.HOST_LOCKED, "auth service: locked by an operator")
        if reg.host.public_ssh_key.endswith(" unproved"):
            raise BadRequest(Code.CSR_REQUIRED, detail="auth service: --require-csr")
        if reg.host.public_ssh_key.endswith(" upstream-error"):
            raise UpstreamFailed("auth service answered 500")
        return RegisterResult(
            host_id=f"host-{len(self.registrations)}",
            ssh_cert="ssh-cert",
            tls_cert="tls-cert",
            tls_ca_certs=("ca",),
            ssh_ca_keys=("ssh-ca",),
        )

    async def ready(self) -> bool:
        return True


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the world ----------------------------------------------------------------------------


@dataclass
class World:
    deps: JoinDeps
    pki: Pki
    stranger: Pki  # a CA chain nobody trusts
    minter: TokenMinter
    other_tenant: TokenMinter
    down_tenant: TokenMinter
    arm: FakeArm
    auth: FakeAuth
    keys: FakeEntraKeys
    stale: ChallengeCodec  # the same keys, an hour ago
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, minter: TokenMinter) -> Iterator[World]:
    clock = FixedClock(NOW)
    tokens_file = tmp_path_factory.mktemp("tokens") / "tokens.yaml"
    tokens_file.write_text(TOKENS)
    keys = [generate_key()]
    pki, stranger = make_pki(), make_pki(root_cn="Nobody's Root")
    other_tenant, down_tenant = TokenMinter(tid=OTHER_TENANT), TokenMinter(tid=DOWN_TENANT)
    entra = FakeEntraKeys({TENANT: minter.public_keys, OTHER_TENANT: other_tenant.public_keys})
    arm, auth = FakeArm(), FakeAuth()
    cloud = CLOUDS["public"]
    deps = JoinDeps(
        clock=clock,
        challenge_keys=Reloadable.fixed(
            "challenge keys", ChallengeCodec(keys, ttl=60, clock=clock)
        ),
        tokens=Reloadable.fixed("token", load_token_files([tokens_file])),
        attested=AttestedVerifier(
            cloud=cloud,
            trust=TrustStore(roots=(pki.root.cert,), intermediates=()),
            aia=None,
            chain_cache=MemoryCache("chains", clock=clock),
            clock=clock,
            # The forged intermediate arrives with the request, as Azure's does: its
            # name must be one the verifier takes request intermediates under.
            known_issuer_names=(INTERMEDIATE_CN,),
        ),
        access_tokens=TokenVerifier(
            entra,  # duck-typed: a KeySource
            cloud=cloud,
            clock=clock,
            allowed_tenants=(TENANT, DOWN_TENANT),
        ),
        binder=VmBinder(
            VmDirectory(
                arm,  # duck-typed: ArmClient's point read
                clock=clock,
                list_threshold=10**9,  # point GETs only: one call per VM, easy to count
            )
        ),
        replay=MemoryReplayStore(clock=clock),
        auth=auth,  # duck-typed: register, ready, breaker
    )
    stale = ChallengeCodec(keys, ttl=60, clock=FixedClock(NOW - timedelta(hours=1)))
    yield World(deps, pki, stranger, minter, other_tenant, down_tenant, arm, auth, entra, stale)
    deps.attested.close()


# --- building one request -----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One join: everything defaults to a VM that joins; each field breaks one thing."""

    token_name: str = "azure-token"
    role: str = "Node"
    node_name: str = "node-0"
    auth_says: str = ""  # the fake auth service's answer, by the SSH key's comment
    challenge: Callable[[World], str] | None = None
    document: Callable[[World, str], str] | None = None  # (world, challenge) -> signature
    access_token: Callable[[World], str] | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    deps: Callable[[World], JoinDeps] | None = None
    replayed: bool = False
    # (challenge) -> the host block with its proofs of possession; None: no proofs sent
    host: Callable[[str], HostParams] | None = None


def _content(challenge: str, **over: Any) -> bytes:
    """The document's signed JSON for the shared IDs, created at T0, with ``over`` changed."""
    fields: dict[str, Any] = {
        "nonce": challenge,
        "vm_id": VM_ID,
        "subscription_id": SUBSCRIPTION,
        "created_on": T0,
    }
    fields.update(over)
    return azure_content(**fields)


def _doc(**content: Any) -> Callable[[World, str], str]:
    """A correctly signed document whose content differs by ``content``."""
    return lambda w, challenge: forge(w.pki.leaf, _content(challenge, **content))


def _forged(**options: Any) -> Callable[[World, str], str]:
    """A document forged with ``options`` (see ``cms_forge.forge``); callables get the world."""

    def build(w: World, challenge: str) -> str:
        extra = {k: v(w) if callable(v) else v for k, v in options.items()}
        return forge(w.pki.leaf, _content(challenge), **extra)

    return build


def _request(w: World, case: Case) -> JoinRequest:
    codec = w.deps.challenges
    challenge = case.challenge(w) if case.challenge else codec.issue().value
    signature = (case.document or _doc())(w, challenge)
    if case.access_token is not None:
        token = case.access_token(w)
    else:
        token = w.minter.mint(now=NOW.timestamp(), **case.claims)
    return JoinRequest(
        token_name=case.token_name,
        challenge=challenge,
        attested_signature=signature,
        intermediates=(w.pki.intermediate.der,),
        access_token=token,
        host=case.host(challenge)
        if case.host
        else HostParams(
            node_name=case.node_name,
            role=case.role,
            public_ssh_key=f"ssh-ed25519 AAAA {case.auth_says}".strip(),
            public_tls_key="tls-key",
        ),
        client_address="127.0.0.1",
    )


# Real keys for the proof-of-possession cases: the proofs are real signatures.
_TLS = ec.generate_private_key(ec.SECP256R1())
_SSH = ed25519.Ed25519PrivateKey.generate()


def _proved(
    *, csr_key: ec.EllipticCurvePrivateKey = _TLS, ssh_key: ed25519.Ed25519PrivateKey = _SSH
) -> Callable[[str], HostParams]:
    """The host block an agent sends, with a CSR by ``csr_key`` and a proof by ``ssh_key``
    (the node's own keys unless a case swaps one)."""

    def build(challenge: str) -> HostParams:
        return HostParams(
            node_name="node-0",
            role="Node",
            public_ssh_key=_SSH.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode(),
            public_tls_key=_TLS.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode(),
            csr=make_csr(csr_key),
            ssh_key_proof=sign_ssh_possession(ssh_key, challenge),
        )

    return build


def _garbled_csr(challenge: str) -> HostParams:
    return dataclasses.replace(_proved()(challenge), csr="-----BEGIN CERTIFICATE REQUEST-----x")


def _stranger_leaf(w: World, challenge: str) -> str:
    return forge(w.stranger.leaf, _content(challenge))


def _mint(attr: str, **claims: Any) -> Callable[[World], str]:
    def build(w: World) -> str:
        minter: TokenMinter = getattr(w, attr)
        return minter.mint(now=NOW.timestamp(), **claims)

    return build


def _saturated_build_pool(w: World) -> JoinDeps:
    """A verifier whose chain-build pool already holds the most builds it queues: the
    next build is refused as overload, as it is under a flood of hostile documents."""
    executor = GatedExecutor()
    verifier = AttestedVerifier(
        cloud=CLOUDS["public"],
        trust=TrustStore.from_certificates([w.pki.root.cert, w.pki.intermediate.cert]),
        aia=None,
        chain_cache=None,
        clock=w.deps.clock,
        executor=executor,
    )
    pending = [
        asyncio.ensure_future(verifier.chain_for(w.pki.leaf.cert, "metadata.azure.com"))
        for _ in range(_MAX_PENDING_BUILDS)
    ]

    async def full() -> None:
        # The builds take their places once their tasks have run; the join's document
        # starts at once (no task of its own), so wait until every place is taken.
        for _ in range(10):
            if verifier._pending_builds == _MAX_PENDING_BUILDS:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"the build pool did not fill: {verifier!r}")

    async def drain() -> None:
        executor.gate.set()
        await asyncio.gather(*pending)
        executor.shutdown()

    w.extra.setdefault("setups", []).append(full)
    w.extra.setdefault("cleanups", []).append(drain)
    return dataclasses.replace(w.deps, attested=verifier)


def _unavailable_replay(w: World) -> JoinDeps:
    # A real Redis client on a port nothing listens on: the store answers 503, not a 500.
    client = redis_client(f"redis://127.0.0.1:{_closed_port()}/0")
    w.extra.setdefault("clients", []).append(client)
    return dataclasses.replace(w.deps, replay=RedisReplayStore(client))


SIGNED_AS_NONCE = "nonce-of-another-challenge"

CASES: list[tuple[str, Case, Code | None]] = [
    ("a VM whose evidence all holds joins", Case(), None),
    ("a VM that proves it holds its keys joins", Case(host=_proved()), None),
    # 2b. proof of possession
    ("a CSR that does not parse", Case(host=_garbled_csr), Code.CSR_INVALID),
    (
        "a CSR for another key than the one to certify",
        Case(host=_proved(csr_key=ec.generate_private_key(ec.SECP256R1()))),
        Code.CSR_KEY_MISMATCH,
    ),
    (
        "an SSH proof made by another key",
        Case(host=_proved(ssh_key=ed25519.Ed25519PrivateKey.generate())),
        Code.SSH_KEY_PROOF_INVALID,
    ),
    # 2. challenge
    (
        "a challenge this gateway did not issue",
        Case(challenge=lambda w: "A" * 32),
        Code.CHALLENGE_INVALID,
    ),
    (
        "a challenge past its lifetime",
        Case(challenge=lambda w: w.stale.issue().value),
        Code.CHALLENGE_EXPIRED,
    ),
    # 3. join token
    ("a join token that does not exist", Case(token_name="nope"), Code.UNKNOWN_TOKEN),
    ("a join token of another method", Case(token_name="static-token"), Code.TOKEN_WRONG_METHOD),
    ("a join token past its expiry", Case(token_name="expired-token"), Code.TOKEN_EXPIRED),
    ("a role the join token does not grant", Case(role="Kube"), Code.ROLE_NOT_ALLOWED),
    # 4a. document
    (
        "a document that is not base64",
        Case(document=lambda w, c: "%%%"),
        Code.ATTESTED_MALFORMED,
    ),
    (
        "a document with two signers",
        Case(document=_forged(extra_signers=lambda w: [w.pki.leaf])),
        Code.ATTESTED_SIGNER_INVALID,
    ),
    (
        "a document digested with SHA-1",
        Case(document=_forged(digest="sha1")),
        Code.ATTESTED_DIGEST_UNSUPPORTED,
    ),
    (
        "a document whose signature was altered",
        Case(document=_forged(tamper_signature=True)),
        Code.ATTESTED_SIGNATURE_INVALID,
    ),
    (
        "a document signed under a CA nobody pinned",
        Case(document=_stranger_leaf),
        Code.ATTESTED_CHAIN_UNTRUSTED,
    ),
    (
        "a document whose vmId is not a GUID",
        Case(document=_doc(vm_id="not-a-guid")),
        Code.ATTESTED_CONTENT_INVALID,
    ),
    (
        "a document without subscriptionId",
        Case(document=_doc(subscription_id=None)),
        Code.ATTESTED_CONTENT_INVALID,
    ),
    (
        "a document past its window",
        Case(document=_doc(created_on=T0 - timedelta(days=2))),
        Code.ATTESTED_EXPIRED,
    ),
    (
        "a document for another challenge",
        Case(document=_doc(nonce=SIGNED_AS_NONCE)),
        Code.NONCE_MISMATCH,
    ),
    (
        "a document whose chain build finds the build pool full",
        Case(deps=_saturated_build_pool),
        Code.OVERLOADED,
    ),
    # 4b. access token
    (
        "an access token that is not a JWT",
        Case(access_token=lambda w: "not-a-jwt"),
        Code.ACCESS_TOKEN_MALFORMED,
    ),
    (
        "an access token signed by a key the tenant does not publish under that kid",
        Case(access_token=lambda w: w.minter.mint(now=NOW.timestamp(), key=w.other_tenant.key)),
        Code.ACCESS_TOKEN_INVALID,
    ),
    (
        "an expired access token",
        Case(claims={"exp": int(NOW.timestamp()) - 3600}),
        Code.ACCESS_TOKEN_EXPIRED,
    ),
    (
        "an access token under a kid the tenant never published",
        Case(access_token=lambda w: w.minter.mint(now=NOW.timestamp(), kid="k9")),
        Code.ACCESS_TOKEN_KEY_UNKNOWN,
    ),
    (
        "an access token from another issuer",
        Case(claims={"iss": "https://sts.example.com/x/"}),
        Code.ACCESS_TOKEN_ISSUER_INVALID,
    ),
    (
        "an access token for another audience",
        Case(claims={"aud": "https://vault.azure.net"}),
        Code.ACCESS_TOKEN_AUDIENCE_INVALID,
    ),
    (
        "an access token of a tenant not allowed",
        Case(access_token=_mint("other_tenant")),
        Code.TENANT_NOT_ALLOWED,
    ),
    (
        "an access token whose tenant's keys cannot be fetched",
        Case(access_token=_mint("down_tenant")),
        Code.DEPENDENCY_UNAVAILABLE,
    ),
    # 5. identity and binding
    (
        "a storage account's token",
        Case(claims={"xms_mirid": storage_rid()}),
        Code.IDENTITY_UNSUPPORTED,
    ),
    (
        "a token whose VM is in another subscription than the document",
        Case(claims={"xms_mirid": vm_rid(subscription=OTHER_SUBSCRIPTION)}),
        Code.SUBSCRIPTION_MISMATCH,
    ),
    # 6a. rules, before Resource Manager
    (
        "a VM in a resource group no rule allows",
        Case(claims={"xms_mirid": vm_rid(group="elsewhere")}),
        Code.NOT_ALLOWED,
    ),
    # 5c. Resource Manager
    (
        "another VM's document with this VM's token",
        Case(claims={"xms_mirid": vm_rid(name="node-1")}),
        Code.VM_BINDING_FAILED,
    ),
    (
        "a VM Resource Manager does not know",
        Case(claims={"xms_mirid": vm_rid(name="ghost")}),
        Code.VM_BINDING_FAILED,
    ),
    (
        "a join when our Resource Manager budget is spent",
        Case(claims={"xms_mirid": vm_rid(name="budget-spent")}),
        Code.AZURE_BUDGET_EXHAUSTED,
    ),
    # 6c. names
    ("a VM that asks for no node name joins", Case(node_name=""), None),
    ("a VM that asks for its own name in capitals joins", Case(node_name="NODE-0"), None),
    ("a VM asking for another VM's name", Case(node_name="node-1"), Code.NAME_NOT_ALLOWED),
    # 7. redemption and forwarding
    ("a challenge redeemed before", Case(replayed=True), Code.CHALLENGE_REUSED),
    (
        "a replay store that cannot be reached",
        Case(deps=_unavailable_replay),
        Code.REPLAY_STORE_UNAVAILABLE,
    ),
    (
        "an auth service behind an open circuit",
        Case(auth_says="upstream-down"),
        Code.UPSTREAM_UNAVAILABLE,
    ),
    ("an auth service that fails", Case(auth_says="upstream-error"), Code.UPSTREAM_FAILED),
    ("a VM an operator locked", Case(auth_says="locked"), Code.HOST_LOCKED),
    (
        "no proof of possession where the auth service requires one",
        Case(auth_says="unproved"),
        Code.CSR_REQUIRED,
    ),
]


async def _admit(world: World, case: Case) -> tuple[Code | None, int, JoinRequest, Any]:
    """Run one case through ``admit_join``: (code or None, ARM calls it made, request,
    outcome or None)."""
    deps = case.deps(world) if case.deps else world.deps
    for setup in world.extra.pop("setups", []):
        await setup()
    req = _request(world, case)
    if case.replayed:
        await admit_join(req, deps, JoinTrace())
    arm_calls = len(world.arm.calls)
    try:
        outcome = await admit_join(req, deps, JoinTrace())
    except GatewayError as err:
        return err.code, len(world.arm.calls) - arm_calls, req, None
    finally:
        for client in world.extra.pop("clients", []):
            await client.aclose()
        for cleanup in world.extra.pop("cleanups", []):
            await cleanup()
    return None, len(world.arm.calls) - arm_calls, req, outcome


@pytest.mark.parametrize(("case", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_admit_join(world: World, case: Case, code: Code | None) -> None:
    got, arm_calls, req, outcome = await _admit(world, case)
    assert got == code
    if code is Code.NOT_ALLOWED:
        # Refused from the signed resource ID alone: Resource Manager was not asked.
        assert arm_calls == 0
    if code is None:
        assert outcome.attrs.vm_id == VM_ID and outcome.attrs.arm_verified
        assert outcome.attrs.resource_group == "kube"
        assert world.auth.registrations[-1].idempotency_key == req.challenge
        # Whatever the request said, the registration names the VM as Azure does.
        assert world.auth.registrations[-1].host.node_name == "node-0"


async def test_the_table_reaches_every_code_the_pipeline_can_return(world: World) -> None:
    # The whole table again, so that this holds whatever ``-k`` selected: the codes the
    # cases produce are exactly the codes the steps declare.
    produced = set()
    for _, case, _ in CASES:
        code, *_ = await _admit(world, case)
        produced.add(code)
    assert produced - {None} == set(PIPELINE_CODES)
    assert {code for _, _, code in CASES if code is not None} == set(PIPELINE_CODES)


async def test_verify_join_refuses_before_redeeming_or_forwarding(world: World) -> None:
    case = Case(claims={"xms_mirid": vm_rid(group="elsewhere")})
    req = _request(world, case)
    registered = len(world.auth.registrations)
    with pytest.raises(GatewayError) as err:
        await verify_join(req, world.deps, JoinTrace())
    assert err.value.code is Code.NOT_ALLOWED
    # The challenge was not burnt: the same one still redeems.
    assert await world.deps.replay.redeem(req.challenge, 60)
    assert len(world.auth.registrations) == registered


async def test_joins_no_rule_allows_cost_no_resource_manager_call(world: World) -> None:
    before = len(world.arm.calls)
    trace = JoinTrace()
    for group in ("elsewhere", "other", "KUBEX"):
        req = _request(world, Case(claims={"xms_mirid": vm_rid(group=group)}))
        with pytest.raises(GatewayError) as err:
            await admit_join(req, world.deps, trace)
        assert err.value.code is Code.NOT_ALLOWED
    # A subscription no rule names, with a document of that subscription too.
    req = _request(
        world,
        Case(
            document=_doc(subscription_id=OTHER_SUBSCRIPTION),
            claims={"xms_mirid": vm_rid(subscription=OTHER_SUBSCRIPTION)},
        ),
    )
    with pytest.raises(GatewayError) as err:
        await admit_join(req, world.deps, trace)
    assert err.value.code is Code.NOT_ALLOWED
    assert len(world.arm.calls) == before
    assert "arm" not in trace.steps  # the step never ran


async def test_the_audit_facts_of_a_cheap_refusal_name_the_resource(world: World) -> None:
    trace = JoinTrace()
    req = _request(world, Case(claims={"xms_mirid": vm_rid(group="elsewhere")}))
    with pytest.raises(GatewayError):
        await admit_join(req, world.deps, trace)
    assert trace.facts["resource_group"] == "elsewhere"
    assert trace.facts["tenant"] == TENANT and trace.facts["vm_id"] == VM_ID
    assert list(trace.steps) == [
        "challenge",
        "possession",
        "token",
        "document",
        "access_token",
        "identity",
        "binding",
        "rules",
    ]


async def test_a_join_forwards_labels_from_the_verified_vm_record(
    world: World, tmp_path: Path
) -> None:
    # A token listing one tag (spelled in another case than the VM's): the registration
    # carries the verified attributes and that tag only, and so does the audit trace.
    path = tmp_path / "labelled.yaml"
    path.write_text(
        azure_token_yaml(SUBSCRIPTION, name="labelled") + "    labels_from_tags: [ENV]\n"
    )
    deps = dataclasses.replace(
        world.deps, tokens=Reloadable.fixed("token", load_token_files([path]))
    )
    trace = JoinTrace()
    outcome = await admit_join(_request(world, Case(token_name="labelled")), deps, trace)
    expected = {
        "azure/tenant": TENANT,
        "azure/subscription": SUBSCRIPTION,
        "azure/resource_group": "kube",
        "azure/vm_id": VM_ID,
        "azure/vm_name": VM_NAME,
        "azure/location": "westeurope",
        "azure/tag/ENV": "prod",
    }
    assert dict(world.auth.registrations[-1].labels) == expected
    assert dict(outcome.attrs.labels) == expected
    assert trace.labels is not None and dict(trace.labels) == expected
    assert "labels" in trace.steps


async def test_the_registration_and_the_audit_carry_the_decided_node_name(world: World) -> None:
    # The request asks for no name: the gateway decides (the VM's Azure name), registers
    # that, and the audit facts name it too.
    req = _request(world, Case(node_name=""))
    trace = JoinTrace()
    outcome = await admit_join(req, world.deps, trace)
    assert outcome.attrs.names.node_name == "node-0"
    assert world.auth.registrations[-1].host.node_name == "node-0"
    assert trace.facts["node_name"] == "node-0"


async def test_without_vm_binding_a_scale_set_token_gives_no_node_name(world: World) -> None:
    # With azure.vm_binding off the token's resource is all that is known: for a uniform
    # scale set that is the set, not the instance, so there is no VM name to certify.
    deps = dataclasses.replace(world.deps, binder=VmBinder(None, enabled=False))
    req = _request(world, Case(node_name="", claims={"xms_mirid": vmss_rid()}))
    with pytest.raises(JoinRejected) as info:
        await verify_join(req, deps, JoinTrace())
    assert info.value.code is Code.NAME_NOT_ALLOWED
    # A standalone VM's token names the VM: its name is the token's.
    req = _request(world, Case(node_name=""))
    assert (await verify_join(req, deps, JoinTrace())).names.node_name == "node-0"


async def test_a_warm_join_runs_its_steps_without_a_task(world: World) -> None:
    # The document and the access token are checked side by side only when one of them
    # has to wait (a cold key set or chain): with the caches warm, a join creates no task.
    await verify_join(_request(world, Case()), world.deps, JoinTrace())  # warms the caches
    req = _request(world, Case())
    loop = asyncio.get_running_loop()
    created: list[object] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        created.append(coro)
        return asyncio.Task(coro, loop=loop, **kw)

    previous = loop.get_task_factory()
    loop.set_task_factory(factory)
    try:
        trace = JoinTrace()
        attrs = await verify_join(req, world.deps, trace)
    finally:
        loop.set_task_factory(previous)
    assert attrs.vm_id and {"document", "access_token"} <= set(trace.steps)
    assert created == []


def test_the_trace_times_each_step_also_when_it_raises() -> None:
    trace = JoinTrace()
    with trace.step("a"):
        pass
    with pytest.raises(JoinRejected), trace.step("b"):
        raise JoinRejected(Code.NOT_ALLOWED, "no")
    assert set(trace.steps) == {"a", "b"} and all(t >= 0 for t in trace.steps.values())


async def test_a_join_parses_the_token_resource_id_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The identity step parses it; the binding step binds that very ID.
    from gateway.join import binding

    parsed: list[str] = []
    real = binding.parse_resource_id

    def counting(raw: str) -> ResourceId:
        parsed.append(raw)
        return real(raw)

    monkeypatch.setattr(binding, "parse_resource_id", counting)
    attrs = await verify_join(_request(world, Case()), world.deps, JoinTrace())
    assert attrs.arm_verified and len(parsed) == 1
