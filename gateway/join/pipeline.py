"""The Azure join, as DESIGN §3 lists it: one pipeline, cheap checks first.

``verify_join`` is the whole verification and reads top-down like the design:
challenge → token → (document ∥ access token) → binding → allow rules. Each step is a
function in its own module returning typed evidence or raising ``JoinRejected``.
``admit_join`` adds step 7: single-use redemption, then forwarding to the auth service.

Every Azure dependency arrives through :class:`JoinDeps` (our ``AzureJoinConfig``):
production code and tests fill the same dataclass; nothing here reaches for a global.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from gateway.azure.attested import AttestedDocument, AttestedVerifier
from gateway.azure.jwks import TokenVerifier
from gateway.azure.token import TokenClaims
from gateway.core.clock import Clock
from gateway.core.errors import Code, GatewayError, JoinRejected
from gateway.join.binding import VmBinder, VmIdentity, resource_from_claims
from gateway.join.challenge import ChallengeCodec
from gateway.join.forward import AuthClient
from gateway.join.replay import ReplayStore
from gateway.join.rules import (
    AllowRule,
    TokenRegistry,
    VmFacts,
    check_token,
    match_allow_rules,
    refuse_unless_any_rule_can_match,
)
from gateway.protocol import JoinBlock, JoinRequest, JoinResponse, RegisterResult, Registration

__all__ = [
    "AdmittedJoin",
    "JoinAttrs",
    "JoinDeps",
    "JoinRequest",
    "JoinTrace",
    "TokenSource",
    "admit_join",
    "verify_join",
]


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
    tenant, VM and subscription it got to). Never holds the access token."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self.facts: dict[str, str] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = time.perf_counter() - start


class TokenSource(Protocol):
    """Where the current token registry lives; SIGHUP swaps it atomically."""

    @property
    def registry(self) -> TokenRegistry: ...


@dataclass
class JoinDeps:
    clock: Clock
    challenges: ChallengeCodec
    tokens: TokenSource
    attested: AttestedVerifier
    access_tokens: TokenVerifier
    binder: VmBinder
    replay: ReplayStore
    auth: AuthClient


async def verify_join(req: JoinRequest, deps: JoinDeps, trace: JoinTrace) -> JoinAttrs:
    # 2. Challenge MAC and expiry: a forged or stale challenge costs one HMAC.
    with trace.step("challenge"):
        challenge_expires = deps.challenges.verify(req.challenge)

    # 3. The token exists, is an azure token, is not expired, allows the role.
    with trace.step("token"):
        token = deps.tokens.registry.get(req.token_name)
        check_token(token, role=req.host.role, now=deps.clock.now())

    # 4. The attested document and the access token are independent: check both at once.
    doc, claims = await _evidence(req, deps, trace)
    trace.facts.update(tenant=claims.tid, vm_id=doc.vm_id, subscription=doc.subscription_id or "")

    # 5a. Cheap refusal first: what the signed token alone says (tenant, subscription,
    # resource group, identity) already rules out every allow rule? No ARM call then.
    with trace.step("rules"):
        rid, _ = resource_from_claims(claims)
        trace.facts.update(resource_id=rid.raw, resource_group=rid.resource_group)
        refuse_unless_any_rule_can_match(
            token,
            VmFacts(
                tenant=claims.tid,
                subscription=rid.subscription,
                resource_group=rid.resource_group,
                identities=_identities(claims),
            ),
        )

    # 5b. Bind them: the token's VM is the document's VM (ARM, unless turned off).
    with trace.step("binding"):
        if doc.subscription_id is None:
            raise JoinRejected(
                Code.ATTESTED_CONTENT_INVALID, "attested document carries no subscriptionId"
            )
        identity: VmIdentity = await deps.binder.bind(
            doc_vm_id=doc.vm_id,
            doc_subscription=doc.subscription_id,
            claims=claims,
            bearer=req.access_token,
        )

    trace.facts.update(resource_id=identity.resource_id, resource_group=identity.resource_group)

    # 6. Allow rules: only signed evidence and ARM feed them, never the request body.
    with trace.step("rules"):
        rule = match_allow_rules(
            token,
            VmFacts(
                tenant=claims.tid,
                subscription=identity.subscription_id,
                resource_group=identity.resource_group,
                identities=_identities(claims),
                location=identity.location,
                scale_set=identity.scale_set or "" if identity.arm_verified else None,
                vm_name=identity.vm_name if identity.arm_verified else None,
                tags=identity.tags,
            ),
        )

    return JoinAttrs(
        token_name=token.name,
        role=req.host.role,
        tenant=claims.tid,
        subscription=identity.subscription_id,
        resource_group=identity.resource_group,
        vm_id=doc.vm_id,
        resource_id=identity.resource_id,
        identity_kind=identity.identity_kind,
        arm_verified=identity.arm_verified,
        rule=rule,
        challenge_expires=challenge_expires,
    )


def _identities(claims: TokenClaims) -> frozenset[str]:
    """The managed identity that joined, as rules name it: principal object ID and client
    ID (``oid``, ``appid``), lowercase."""
    return frozenset(v.lower() for v in (claims.oid, claims.appid) if v)


async def _evidence(
    req: JoinRequest, deps: JoinDeps, trace: JoinTrace
) -> tuple[AttestedDocument, TokenClaims]:
    async def document() -> AttestedDocument:
        with trace.step("document"):
            return await deps.attested.verify(
                req.attested_signature,
                intermediates=req.intermediates,
                expected_nonce=req.challenge,
            )

    async def access_token() -> TokenClaims:
        with trace.step("access_token"):
            return await deps.access_tokens.verify(req.access_token)

    tasks: list[asyncio.Task[object]] = []
    try:
        async with asyncio.TaskGroup() as tg:
            doc_task = tg.create_task(document())
            token_task = tg.create_task(access_token())
            tasks += [doc_task, token_task]
    except BaseExceptionGroup as group:
        raise _first_error(group, tasks) from None
    return doc_task.result(), token_task.result()


def _first_error(
    group: BaseExceptionGroup[BaseException], tasks: list[asyncio.Task[object]]
) -> BaseException:
    """The error to report when a parallel step failed.

    A bug (anything not ours) wins so that it is never disguised as a rejection;
    otherwise the first task's in DESIGN §3's order (the document before the token).
    """
    leaves = list(_leaves(group))
    for exc in leaves:
        if not isinstance(exc, GatewayError):
            return exc
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            err = task.exception()
            assert err is not None
            return err
    return leaves[0]


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


async def admit_join(req: JoinRequest, deps: JoinDeps, trace: JoinTrace) -> AdmittedJoin:
    attrs = await verify_join(req, deps, trace)

    # 7. Single use, only now: a request that fails verification must not burn the challenge.
    with trace.step("redeem"):
        ttl = max(attrs.challenge_expires - deps.clock.time(), 1.0)
        if not await deps.replay.redeem(req.challenge, ttl):
            raise JoinRejected(Code.CHALLENGE_REUSED, "challenge already redeemed")

    with trace.step("upstream"):
        try:
            result = await deps.auth.register(
                Registration(
                    idempotency_key=req.challenge,
                    token_name=attrs.token_name,
                    role=attrs.role,
                    client_address=req.client_address,
                    join=attrs.join_block(),
                    host=req.host,
                )
            )
        except GatewayError as err:
            if err.retryable:
                # Verified, but not forwarded (or the answer was lost): let the agent send
                # this very request again, so the auth service sees the same idempotency
                # key instead of a second registration under a new challenge.
                await deps.replay.release(req.challenge)
            raise
    return AdmittedJoin(attrs=attrs, result=result)
