"""The Azure join, as DESIGN §3 lists it: one pipeline, cheap checks first.

One declared step table, :data:`JOIN_STEPS`, reads top-down like the design:
challenge → token → (document ∥ access token) → identity → binding → allow rules →
Resource Manager → allow rules again → node labels → names (what the certificates may
name). ``verify_join`` runs it fail-fast; ``inspect`` (:func:`inspect_evidence`) runs the
very same table recording every step, so the two cannot disagree. Each step calls the
check of its own module (typed evidence, or
``JoinRejected``). The allow rules run first on the signed token's resource ID — a join
no rule allows costs no Resource Manager call — and again on what ARM answered.
``admit_join`` adds step 7 (:data:`ADMIT_STEPS`): single-use redemption, then forwarding
to the auth service.

Every Azure dependency arrives through :class:`JoinDeps` (our ``AzureJoinConfig``):
production code and tests fill the same dataclass; nothing here reaches for a global.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gateway.azure.attested import DOCUMENT_STEPS, AttestedDocument, AttestedVerifier, Inspection
from gateway.azure.jwks import TokenVerifier
from gateway.azure.resource_id import ResourceId
from gateway.azure.token import TokenClaims, normalize_guid
from gateway.core.clock import Clock
from gateway.core.errors import BadRequest, Code, GatewayError, JoinRejected
from gateway.core.reload import Reloadable
from gateway.core.steps import (
    Detail,
    Skip,
    Step,
    StepResult,
    StepTable,
    codes_of,
    run_fail_fast,
    run_recording,
)
from gateway.join.binding import IdentityKind, VmBinder, VmIdentity, resource_from_claims
from gateway.join.challenge import ChallengeCodec
from gateway.join.forward import AuthClient
from gateway.join.labels import NodeLabels, node_labels
from gateway.join.names import DecidedNames, VmAttributes, decide_names, wants_nic_ips
from gateway.join.replay import ReplayStore
from gateway.join.rules import (
    AllowRule,
    ProvisionToken,
    TokenRegistry,
    VmFacts,
    check_token,
    match_allow_rules,
    refuse_unless_any_rule_can_match,
)
from gateway.protocol import (
    HostParams,
    JoinBlock,
    JoinRequest,
    JoinResponse,
    RegisterResult,
    Registration,
)
from gateway.protocol.labels import Labels
from gateway.protocol.possession import PossessionError, verify_csr, verify_ssh_possession

__all__ = [
    "ADMIT_STEPS",
    "JOIN_STEPS",
    "PIPELINE_CODES",
    "AdmittedJoin",
    "EvidenceReport",
    "JoinAttrs",
    "JoinDeps",
    "JoinRequest",
    "JoinTrace",
    "admit_join",
    "inspect_evidence",
    "verify_join",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinAttrs:
    """What verification established; everything here comes from signed evidence or ARM."""

    token_name: str
    role: str
    tenant: str
    subscription: str
    resource_group: str
    vm_id: str
    resource_id: str
    identity_kind: str
    arm_verified: bool
    rule: AllowRule
    challenge_expires: float
    # What the certificates will name (gateway/join/names.py): the registration's names.
    names: DecidedNames
    # Node labels from the verified attributes (``gateway/join/labels.py``).
    labels: Labels = field(default_factory=lambda: MappingProxyType({}))

    def join_block(self) -> JoinBlock:
        return JoinBlock(
            method="azure",
            tenant=self.tenant,
            subscription=self.subscription,
            resource_group=self.resource_group,
            vm_id=self.vm_id,
            resource_id=self.resource_id,
        )


@dataclass(frozen=True)
class AdmittedJoin:
    """A join verified, redeemed and registered: what the gateway answers with."""

    attrs: JoinAttrs
    result: RegisterResult

    def to_json(self) -> dict[str, object]:
        return JoinResponse(self.result, self.attrs.join_block()).to_json()


class JoinTrace:
    """What one join did, for its audit record and metrics: per-step durations (seconds)
    and the facts established so far (so a refusal half-way is still audited with the
    tenant, VM and subscription it got to), and the node labels once established. Never
    holds the access token."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self.facts: dict[str, str] = {}
        self.labels: Labels | None = None

    def step(self, name: str) -> _StepTimer:
        """Times the ``with`` block into ``steps[name]`` (also when it raises)."""
        return _StepTimer(self.steps, name)


class _StepTimer:
    """``JoinTrace.step``'s context manager: a join enters thirteen of them, and a plain
    class costs a fraction of a ``@contextmanager`` generator."""

    __slots__ = ("_name", "_start", "_steps")

    def __init__(self, steps: dict[str, float], name: str) -> None:
        self._steps = steps
        self._name = name
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._steps[self._name] = time.perf_counter() - self._start


@dataclass(frozen=True)
class JoinDeps:
    """Everything a join needs (our ``AzureJoinConfig``); frozen after construction.

    What may change at run time — the token registry and the challenge keys — sits in
    ``Reloadable`` holders that SIGHUP swaps whole; the deps object itself never changes.
    """

    clock: Clock
    challenge_keys: Reloadable[ChallengeCodec]
    tokens: Reloadable[TokenRegistry]
    attested: AttestedVerifier
    access_tokens: TokenVerifier
    binder: VmBinder
    replay: ReplayStore
    auth: AuthClient

    @property
    def challenges(self) -> ChallengeCodec:
        """The current challenge codec (read once per use: a reload swaps it whole)."""
        return self.challenge_keys.current

    def reloadables(self) -> tuple[Reloadable[Any], ...]:
        """What SIGHUP re-reads, each on its own: a bad file keeps only its own old value."""
        return (self.tokens, self.challenge_keys)


@dataclass
class _Run:
    """One join's (or one inspection's) inputs and the evidence its steps establish.

    Made per call and never shared. A ``None`` dependency or input means "not here": the
    step that needs it is skipped with the reason (``inspect`` has no challenge, no token
    files and no Resource Manager), never silently passed in the gateway, where every one
    is set.
    """

    clock: Clock
    trace: JoinTrace
    challenges: ChallengeCodec | None = None
    registry: TokenRegistry | None = None
    attested: AttestedVerifier | None = None
    access_tokens: TokenVerifier | None = None
    binder: VmBinder | None = None
    # inputs
    token_name: str = ""
    role: str = ""
    challenge: str | None = None
    signature: str | None = None
    document_error: GatewayError | None = None  # inspect: the file held no usable signature
    intermediates: tuple[bytes, ...] = ()
    expected_nonce: str | None = None
    access_token: str | None = field(default=None, repr=False)
    host: HostParams | None = None
    # evidence, in the order the steps establish it
    challenge_expires: float = 0.0
    token: ProvisionToken | None = None
    doc: AttestedDocument | None = None
    inspection: Inspection | None = None
    claims: TokenClaims | None = None
    resource: ResourceId | None = None
    identity_kind: IdentityKind | None = None
    identity: VmIdentity | None = None
    rule: AllowRule | None = None
    labels: NodeLabels | None = None
    names: DecidedNames | None = None

    # Each accessor is called only by a step whose ``needs`` guarantee the field is set.
    def _token(self) -> ProvisionToken:
        assert self.token is not None
        return self.token

    def _doc(self) -> AttestedDocument:
        assert self.doc is not None
        return self.doc

    def _claims(self) -> TokenClaims:
        assert self.claims is not None
        return self.claims

    def _resource(self) -> ResourceId:
        assert self.resource is not None
        return self.resource

    def _identity_kind(self) -> IdentityKind:
        assert self.identity_kind is not None
        return self.identity_kind

    def _identity(self) -> VmIdentity:
        assert self.identity is not None
        return self.identity


# -- the steps (DESIGN §3), each an adapter over the check of its own module ---------------


async def _step_challenge(run: _Run) -> Detail:
    # 2. Challenge MAC and expiry: a forged or stale challenge costs one HMAC.
    if run.challenges is None or run.challenge is None:
        raise Skip("no challenge: inspect checks the evidence, not a join request")
    run.challenge_expires = run.challenges.verify(run.challenge)
    return "issued by this gateway, not expired"


async def _step_possession(run: _Run) -> Detail:
    # 2b. The node holds the keys it asks to have certified (when it sent the proofs):
    # pure crypto over the request, before any Azure call. The auth service checks again.
    host = run.host
    if host is None or run.challenge is None:
        raise Skip("no join request: proof of possession is checked on joins only")
    if host.csr is None and host.ssh_key_proof is None:
        return "no proof sent (optional in join API v1; auth serve --require-csr refuses)"
    try:
        if host.csr is not None:
            verify_csr(host.csr, host.public_tls_key)
        if host.ssh_key_proof is not None:
            verify_ssh_possession(host.public_ssh_key, run.challenge, host.ssh_key_proof)
    except PossessionError as exc:
        raise BadRequest(Code(exc.code), detail=str(exc)) from None
    return "the CSR and the SSH proof match the keys to certify"


async def _step_token(run: _Run) -> Detail:
    # 3. The token exists, is an azure token, is not expired, allows the role.
    if run.registry is None:
        raise Skip("no token files: the join token and its allow rules are not checked")
    token = run.registry.get(run.token_name)
    check_token(token, role=run.role, now=run.clock.now())
    run.token = token
    return lambda: f"{token.name} ({token.source}) grants {run.role}"


async def _step_document(run: _Run) -> Detail:
    # 4a. The attested document (runs beside the access token: they are independent).
    if run.document_error is not None:
        raise run.document_error
    if run.signature is None or run.attested is None or run.expected_nonce is None:
        raise Skip("no attested document or no challenge given")
    doc = run.doc = await run.attested.verify(
        run.signature, intermediates=run.intermediates, expected_nonce=run.expected_nonce
    )
    run.trace.facts.update(vm_id=doc.vm_id, subscription=doc.subscription_id or "")
    return lambda: f"vmId {doc.vm_id}, signer {doc.signer_cn}"


async def _record_document(run: _Run) -> tuple[StepResult, ...]:
    """``inspect``: the document's own step rows instead of one row."""
    if run.document_error is not None:
        err = run.document_error
        return (StepResult("document", "failed", err.detail, err.code),)
    if run.signature is None or run.attested is None:
        return (StepResult("document", "skipped", "no attested document given"),)
    inspection = run.inspection = await run.attested.inspect(
        run.signature, intermediates=run.intermediates, expected_nonce=run.expected_nonce
    )
    run.doc = inspection.document
    return inspection.checks


async def _step_access_token(run: _Run) -> Detail:
    # 4b. The managed-identity access token: signature, issuer, audience, lifetime, tenant.
    if run.access_token is None or run.access_tokens is None:
        raise Skip("no access token given")
    claims = run.claims = await run.access_tokens.verify(run.access_token)
    run.trace.facts.update(tenant=claims.tid)
    return lambda: f"tenant {claims.tid}, issuer {claims.iss}"


async def _step_identity(run: _Run) -> Detail:
    # 5a. Which VM or scale set the token speaks for (a storage account's token does not).
    run.resource, run.identity_kind = resource_from_claims(run._claims())
    rid, kind = run.resource, run.identity_kind
    return lambda: f"{kind.replace('_', '-')} identity of {rid.raw}"


async def _step_binding(run: _Run) -> Detail:
    # 5b. Offline binding: the token's resource is in the document's subscription.
    doc, rid = run._doc(), run._resource()
    if doc.subscription_id is None:
        raise JoinRejected(
            Code.ATTESTED_CONTENT_INVALID, "attested document carries no subscriptionId"
        )
    if normalize_guid(doc.subscription_id) != rid.subscription:
        raise JoinRejected(
            Code.SUBSCRIPTION_MISMATCH,
            f"token resource is in subscription {rid.subscription}, "
            f"the document in {doc.subscription_id!r}",
        )
    run.trace.facts.update(resource_id=rid.raw, resource_group=rid.resource_group)
    return f"subscription {rid.subscription} in both"


def _identities(claims: TokenClaims) -> frozenset[str]:
    """The managed identity that joined, as rules name it: principal object ID and client
    ID (``oid``, ``appid``), lowercase."""
    return frozenset(v.lower() for v in (claims.oid, claims.appid) if v)


async def _step_rules(run: _Run) -> Detail:
    # 6a. Cheap refusal first: the signed resource ID already names tenant, subscription
    # and resource group (and the token its identity), so a join no rule can admit costs
    # no Resource Manager call. Fields only ARM knows (location, tags, names, flexible
    # scale sets) are undecided here and decided in 6b.
    rid, claims = run._resource(), run._claims()
    refuse_unless_any_rule_can_match(
        run._token(),
        VmFacts(
            tenant=claims.tid,
            subscription=rid.subscription,
            resource_group=rid.resource_group,
            identities=_identities(claims),
        ),
    )
    return "a rule can admit the token's resource (Resource Manager decides the rest)"


async def _step_arm(run: _Run) -> Detail:
    # 5c. Resource Manager: the resource the token names has the document's vmId.
    if run.binder is None:
        raise Skip(
            "offline: Resource Manager is not asked, so the document's vmId is not proven "
            "to be the token's VM (the gateway asks unless azure.vm_binding is off)"
        )
    doc = run._doc()
    assert doc.subscription_id is not None  # the binding step refused a document without
    identity = run.identity = await run.binder.bind(
        doc_vm_id=doc.vm_id,
        doc_subscription=doc.subscription_id,
        claims=run._claims(),
        bearer=run.access_token or "",
        # What the identity step made of these very claims (not parsed a second time).
        resource=(run._resource(), run._identity_kind()),
    )
    run.trace.facts.update(resource_id=identity.resource_id, resource_group=identity.resource_group)
    if not identity.arm_verified:
        return "azure.vm_binding is off: the vmId is not checked with Resource Manager"
    return lambda: f"{identity.resource_id} has vmId {identity.vm_id}"


async def _step_rules_arm(run: _Run) -> Detail:
    # 6b. The same rules against what Resource Manager answered (which decides).
    identity, claims = run._identity(), run._claims()
    arm = identity.arm_verified
    run.rule = match_allow_rules(
        run._token(),
        VmFacts(
            tenant=claims.tid,
            subscription=identity.subscription_id,
            resource_group=identity.resource_group,
            identities=_identities(claims),
            location=identity.location,
            scale_set=(identity.scale_set or "") if arm else None,
            vm_name=identity.vm_name if arm else None,
            tags=identity.tags,
        ),
    )
    return f"rule {run.rule.source or run.rule} admits {identity.resource_id}"


async def _step_labels(run: _Run) -> Detail:
    # 6c. Node labels from the same verified facts the rules just admitted (no Azure call).
    identity = run._identity()
    labels = run.labels = node_labels(
        tenant=run._claims().tid,
        vm_id=run._doc().vm_id,
        identity=identity,
        tags=run._token().labels_from_tags,
    )
    run.trace.labels = labels.labels
    for why in labels.omitted:
        logger.warning("label left out for %s: %s", identity.resource_id, why)
    return lambda: ", ".join(f"{k}={v}" for k, v in sorted(labels.labels.items()))


async def _step_names(run: _Run) -> Detail:
    # 6d. What the certificates may name: only what the token's name policy renders from
    # verified attributes (the document, the token, ARM's record), never the request's
    # say-so. NIC addresses are read only when the token allows them and the request asks.
    host = run.host
    if host is None:
        raise Skip("no join request: the names a node asks for are checked on joins only")
    token, identity = run._token(), run._identity()
    rid, claims, doc = run._resource(), run._claims(), run._doc()
    # With azure.vm_binding off a uniform scale set's token names the set, not the VM.
    vm_known = identity.arm_verified or not rid.is_scale_set
    attrs = VmAttributes(
        vm_name=identity.vm_name if vm_known else None,
        scale_set=identity.scale_set,
        instance_id=identity.instance_id,
        resource_group=identity.resource_group,
        subscription=identity.subscription_id,
        tenant=claims.tid,
        location=identity.location,
        vm_id=normalize_guid(doc.vm_id),
    )
    nic_ips = None
    if wants_nic_ips(token.names, host) and run.binder is not None:
        nic_ips = await run.binder.nic_ips(identity, bearer=run.access_token or "")
    names = run.names = decide_names(token.names, attrs, host, nic_ips=nic_ips)
    run.trace.facts.update(node_name=names.node_name)  # the audit record names the decision
    extra = len(names.principals) + len(names.dns_names) + len(names.ips)
    return lambda: f"node name {names.node_name!r}, {extra} more name(s) allowed"


_C = Code
# The join's verification, as DESIGN §3 lists it, cheap first. ``verify_join`` runs it
# fail-fast (the document and the access token at once); ``inspect`` records every step.
JOIN_STEPS: StepTable[_Run] = (
    Step(
        "challenge", _step_challenge, codes=frozenset({_C.CHALLENGE_INVALID, _C.CHALLENGE_EXPIRED})
    ),
    Step(
        "possession",
        _step_possession,
        ("challenge",),
        frozenset({_C.CSR_INVALID, _C.CSR_KEY_MISMATCH, _C.SSH_KEY_PROOF_INVALID}),
    ),
    Step(
        "token",
        _step_token,
        codes=frozenset(
            {_C.UNKNOWN_TOKEN, _C.TOKEN_WRONG_METHOD, _C.TOKEN_EXPIRED, _C.ROLE_NOT_ALLOWED}
        ),
    ),
    (
        Step(
            "document",
            _step_document,
            codes=codes_of(DOCUMENT_STEPS),
            record=_record_document,
        ),
        Step(
            "access_token",
            _step_access_token,
            codes=frozenset(
                {
                    _C.ACCESS_TOKEN_MALFORMED,
                    _C.ACCESS_TOKEN_INVALID,
                    _C.ACCESS_TOKEN_EXPIRED,
                    _C.ACCESS_TOKEN_KEY_UNKNOWN,
                    _C.ACCESS_TOKEN_ISSUER_INVALID,
                    _C.ACCESS_TOKEN_AUDIENCE_INVALID,
                    _C.TENANT_NOT_ALLOWED,
                    _C.DEPENDENCY_UNAVAILABLE,  # Entra's keys cannot be fetched
                }
            ),
        ),
    ),
    Step("identity", _step_identity, ("access_token",), frozenset({_C.IDENTITY_UNSUPPORTED})),
    Step(
        "binding",
        _step_binding,
        ("document", "identity"),
        frozenset({_C.ATTESTED_CONTENT_INVALID, _C.SUBSCRIPTION_MISMATCH}),
    ),
    Step("rules", _step_rules, ("token", "binding"), frozenset({_C.NOT_ALLOWED})),
    Step(
        "arm",
        _step_arm,
        ("binding",),
        frozenset({_C.VM_BINDING_FAILED, _C.AZURE_BUDGET_EXHAUSTED, _C.DEPENDENCY_UNAVAILABLE}),
    ),
    Step("rules_arm", _step_rules_arm, ("rules", "arm"), frozenset({_C.NOT_ALLOWED})),
    Step("labels", _step_labels, ("rules_arm",)),
    Step("names", _step_names, ("rules_arm",), frozenset({_C.NAME_NOT_ALLOWED})),
)


def _run_for(req: JoinRequest, deps: JoinDeps, trace: JoinTrace) -> _Run:
    return _Run(
        clock=deps.clock,
        trace=trace,
        challenges=deps.challenges,
        registry=deps.tokens.current,
        attested=deps.attested,
        access_tokens=deps.access_tokens,
        binder=deps.binder,
        token_name=req.token_name,
        role=req.host.role,
        challenge=req.challenge,
        signature=req.attested_signature,
        intermediates=req.intermediates,
        expected_nonce=req.challenge,
        access_token=req.access_token,
        host=req.host,
    )


async def verify_join(req: JoinRequest, deps: JoinDeps, trace: JoinTrace) -> JoinAttrs:
    """Every step of :data:`JOIN_STEPS`, fail-fast: the first rejection is raised."""
    run = _run_for(req, deps, trace)
    await run_fail_fast(JOIN_STEPS, run, timer=trace.step)
    return _attrs(run)


def _attrs(run: _Run) -> JoinAttrs:
    token, claims, doc, identity = run._token(), run._claims(), run._doc(), run._identity()
    assert run.rule is not None and run.labels is not None and run.names is not None
    return JoinAttrs(
        token_name=token.name,
        role=run.role,
        tenant=claims.tid,
        subscription=identity.subscription_id,
        resource_group=identity.resource_group,
        vm_id=doc.vm_id,
        resource_id=identity.resource_id,
        identity_kind=identity.identity_kind,
        arm_verified=identity.arm_verified,
        rule=run.rule,
        challenge_expires=run.challenge_expires,
        labels=run.labels.labels,
        names=run.names,
    )


@dataclass(frozen=True)
class EvidenceReport:
    """What ``inspect_evidence`` found: one row per step, and the facts it could read."""

    checks: tuple[StepResult, ...]
    document: Inspection | None  # the document's facts, even unverified; None: none given
    claims: TokenClaims | None  # only when the token verified
    resource: ResourceId | None  # the VM or scale set the token names, when supported

    @property
    def code(self) -> Code | None:
        """The verdict: the first failed step's code (table order), None if none failed."""
        return next((c.code for c in self.checks if c.status == "failed"), None)


async def inspect_evidence(
    *,
    clock: Clock,
    attested: AttestedVerifier | None,
    access_tokens: TokenVerifier | None,
    signature: str | None,
    document_error: GatewayError | None = None,
    expected_nonce: str | None = None,
    access_token: str | None = None,
) -> EvidenceReport:
    """The join's steps over captured evidence, each recorded (``join-gateway inspect``).

    No challenge, no token files, no Resource Manager: those steps are reported skipped
    with the reason, and every other step is the gateway's own.
    """
    run = _Run(
        clock=clock,
        trace=JoinTrace(),
        attested=attested,
        access_tokens=access_tokens,
        signature=signature,
        document_error=document_error,
        expected_nonce=expected_nonce,
        access_token=access_token,
    )
    checks = await run_recording(JOIN_STEPS, run)
    return EvidenceReport(
        checks=checks, document=run.inspection, claims=run.claims, resource=run.resource
    )


@dataclass
class _AdmitRun:
    req: JoinRequest
    deps: JoinDeps
    attrs: JoinAttrs
    result: RegisterResult | None = None


async def _step_redeem(run: _AdmitRun) -> Detail:
    # 7. Single use, only now: a request that fails verification must not burn the challenge.
    ttl = max(run.attrs.challenge_expires - run.deps.clock.time(), 1.0)
    if not await run.deps.replay.redeem(run.req.challenge, ttl):
        raise JoinRejected(Code.CHALLENGE_REUSED, "challenge already redeemed")
    return "first redemption"


async def _step_upstream(run: _AdmitRun) -> Detail:
    req, attrs = run.req, run.attrs
    try:
        run.result = await run.deps.auth.register(
            Registration(
                idempotency_key=req.challenge,
                token_name=attrs.token_name,
                role=attrs.role,
                client_address=req.client_address,
                join=attrs.join_block(),
                host=attrs.names.apply(req.host),
                labels=attrs.labels,
            )
        )
    except GatewayError as err:
        if err.retryable:
            # Verified, but not forwarded (or the answer was lost): let the agent send
            # this very request again, so the auth service sees the same idempotency
            # key instead of a second registration under a new challenge.
            await run.deps.replay.release(req.challenge)
        raise
    return "registered"


ADMIT_STEPS: StepTable[_AdmitRun] = (
    Step(
        "redeem",
        _step_redeem,
        codes=frozenset({_C.CHALLENGE_REUSED, _C.REPLAY_STORE_UNAVAILABLE}),
    ),
    Step(
        "upstream",
        _step_upstream,
        # The auth service refuses a VM an operator locked (403, not retryable).
        codes=frozenset(
            {_C.UPSTREAM_UNAVAILABLE, _C.UPSTREAM_FAILED, _C.HOST_LOCKED, _C.CSR_REQUIRED}
        ),
    ),
)

# Every code a join can end with: what the pipeline's table test must reach, each one.
PIPELINE_CODES: frozenset[Code] = codes_of(JOIN_STEPS) | codes_of(ADMIT_STEPS)


async def admit_join(req: JoinRequest, deps: JoinDeps, trace: JoinTrace) -> AdmittedJoin:
    """:func:`verify_join`, then single-use redemption and forwarding (step 7)."""
    attrs = await verify_join(req, deps, trace)
    run = _AdmitRun(req, deps, attrs)
    await run_fail_fast(ADMIT_STEPS, run, timer=trace.step)
    assert run.result is not None
    return AdmittedJoin(attrs=attrs, result=run.result)
