"""One node's join, start to finish: keys, attempts with backoff, checks, files.

An attempt is the whole protocol (DESIGN §1): a fresh challenge, then the attested document
for that nonce and an access token (concurrently: they are independent IMDS calls), then the
join. Failures a fresh attempt can cure (load shedding, an expired or reused challenge, a
token signed by a key the gateway has not seen yet) are retried with exponential backoff and
full jitter, honouring ``Retry-After``; anything else ends the join at once.

What comes back is checked before anything is written: the TLS certificate must be for our
key, the SSH certificate for our SSH key, and when the operator pinned the cluster CA
(``teleport.ca_pin``) the TLS certificate must be issued by a CA with a pinned public key;
when the operator pinned the SSH CA (``teleport.ssh_ca_pin``) the SSH certificate's signature
must verify under the pinned SSH CA key. Only pinned CAs are written to the node's trust
files. Otherwise a machine in the middle could hand the node a rogue identity.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import SSHCertificate

from gateway.agent.backoff import Backoff
from gateway.agent.client import GatewayClient, HostParams, build_join_body
from gateway.agent.errors import AgentCode, AgentError, JoinError, JoinFailed
from gateway.agent.identity import (
    DATA_FILES,
    HOST_ID_FILE,
    SSH_CA_FILE,
    SSH_CERT_FILE,
    TLS_CA_FILE,
    TLS_CERT_FILE,
    write_identity_set,
)
from gateway.agent.imds import ImdsClient
from gateway.agent.intermediates import IntermediateCollector
from gateway.agent.keys import NodeKeys, load_or_create_keys
from gateway.agent.nodeconfig import AgentSettings
from gateway.agent.transport import make_session, make_ssl_context
from gateway.core.clock import Clock, SystemClock
from gateway.core.tlsutil import spki_pin, ssh_key_pin
from gateway.protocol.possession import make_csr, sign_ssh_possession

__all__ = [
    "DATA_FILES",
    "IssuedCerts",
    "JoinInfo",
    "JoinOutcome",
    "check_issued",
    "parse_join_response",
    "run_join",
    "spki_pin",
    "warn_unpinned",
    "write_node_files",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")
Sleep = Callable[[float], Awaitable[None]]

SSH_CERT_TYPE = "ssh-ed25519-cert-v01@openssh.com"


@dataclass(frozen=True)
class JoinInfo:
    """The ``join`` block of the response: who the gateway decided this VM is."""

    method: str = ""
    tenant: str = ""
    subscription: str = ""
    resource_group: str = ""
    vm_id: str = ""
    resource_id: str = ""


@dataclass(frozen=True)
class IssuedCerts:
    host_id: str
    ssh_cert: str
    tls_cert_pem: str
    tls_ca_pems: tuple[str, ...]
    ssh_ca_keys: tuple[str, ...]
    join: JoinInfo


@dataclass(frozen=True)
class JoinOutcome:
    host_id: str
    attempts: int
    files: tuple[Path, ...]
    join: JoinInfo
    elapsed: float


def _bad(message: str) -> JoinFailed:
    return JoinFailed(AgentCode.BAD_RESPONSE, 200, message)


def parse_join_response(body: dict[str, Any]) -> IssuedCerts:
    """The ``200`` body → :class:`IssuedCerts`, or :class:`JoinFailed` ``bad_response``."""
    host_id = body.get("host_id")
    certs = body.get("certs")
    if not isinstance(host_id, str) or not host_id or "/" in host_id or "\n" in host_id:
        raise _bad("response lacks a usable host_id")
    if not isinstance(certs, dict):
        raise _bad("response lacks certs")
    ssh, tls = certs.get("ssh"), certs.get("tls")
    cas, ssh_cas = certs.get("tls_ca_certs"), certs.get("ssh_ca_keys")
    if not isinstance(ssh, str) or not isinstance(tls, str):
        raise _bad("certs.ssh and certs.tls must be strings")
    if not isinstance(cas, list) or not cas or not all(isinstance(c, str) for c in cas):
        raise _bad("certs.tls_ca_certs must be a non-empty list of PEM strings")
    if not isinstance(ssh_cas, list) or not all(isinstance(k, str) for k in ssh_cas):
        raise _bad("certs.ssh_ca_keys must be a list of strings")
    raw_join = body.get("join")
    join = JoinInfo()
    if isinstance(raw_join, dict):
        join = JoinInfo(
            **{
                f: str(raw_join[f])
                for f in JoinInfo.__dataclass_fields__
                if isinstance(raw_join.get(f), str)
            }
        )
    return IssuedCerts(
        host_id=host_id,
        ssh_cert=ssh.strip(),
        tls_cert_pem=tls.strip() + "\n",
        tls_ca_pems=tuple(c.strip() + "\n" for c in cas),
        ssh_ca_keys=tuple(k.strip() for k in ssh_cas),
        join=join,
    )


def check_issued(
    issued: IssuedCerts,
    keys: NodeKeys,
    *,
    ca_pins: tuple[str, ...],
    ssh_ca_pins: tuple[str, ...] = (),
) -> IssuedCerts:
    """Refuse certificates that are not for our keys or (with pins) not from a pinned CA.

    Returns what may be written: with ``ca_pins`` only the pinned CAs go into the node's
    trust file, with ``ssh_ca_pins`` only the pinned SSH CAs into ``ssh_ca.pub`` — an extra
    CA in the response is the gateway's word alone, and the node trusts only what it pinned.
    """
    try:
        leaf = x509.load_pem_x509_certificate(issued.tls_cert_pem.encode())
        cas = [x509.load_pem_x509_certificate(p.encode()) for p in issued.tls_ca_pems]
    except ValueError as exc:
        raise _bad(f"certificates do not parse: {exc}") from exc
    tls_ca_pems = issued.tls_ca_pems
    if ca_pins:
        pins = {p.lower() for p in ca_pins}
        pinned = [
            (ca, pem)
            for ca, pem in zip(cas, issued.tls_ca_pems, strict=True)
            if spki_pin(ca) in pins
        ]
        if not any(_issued_by(leaf, ca) for ca, _ in pinned):
            raise JoinFailed(
                AgentCode.CA_PIN_MISMATCH,
                200,
                "the returned certificate is not issued by a CA matching teleport.ca_pin",
            )
        if len(pinned) < len(cas):
            log.warning(
                "left %d unpinned CA certificate(s) out of the trust file",
                len(cas) - len(pinned),
            )
        tls_ca_pems = tuple(pem for _, pem in pinned)
    ours = keys.tls_public_pem()
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ours != theirs:
        raise JoinFailed(AgentCode.TLS_KEY_MISMATCH, 200, "the TLS certificate is not for our key")
    if not issued.ssh_cert.startswith(SSH_CERT_TYPE + " "):
        raise _bad(f"certs.ssh is not an {SSH_CERT_TYPE} line")
    try:
        ssh_cert = serialization.load_ssh_public_identity(issued.ssh_cert.encode())
    except (ValueError, TypeError) as exc:
        raise _bad(f"certs.ssh does not parse: {exc}") from exc
    ssh_pub = keys.ssh_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    if (
        not isinstance(ssh_cert, SSHCertificate)
        or ssh_cert.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        != ssh_pub
    ):
        raise JoinFailed(AgentCode.SSH_KEY_MISMATCH, 200, "the SSH certificate is not for our key")
    ssh_ca_keys = issued.ssh_ca_keys
    if ssh_ca_pins:
        ssh_ca_keys = _check_ssh_ca(ssh_cert, issued.ssh_ca_keys, ssh_ca_pins)
    return dataclasses.replace(issued, tls_ca_pems=tls_ca_pems, ssh_ca_keys=ssh_ca_keys)


def _check_ssh_ca(
    cert: SSHCertificate, ca_lines: tuple[str, ...], ssh_ca_pins: tuple[str, ...]
) -> tuple[str, ...]:
    """The pinned SSH CA lines; the host certificate must carry a valid signature by one."""
    pins = {p.lower() for p in ssh_ca_pins}
    pinned: list[str] = []
    for line in ca_lines:
        try:
            key = serialization.load_ssh_public_key(line.encode())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue  # an unparseable extra key cannot be pinned; it is left out
        if ssh_key_pin(key) in pins:
            pinned.append(line)
    if not pinned:
        raise JoinFailed(
            AgentCode.SSH_CA_PIN_MISMATCH,
            200,
            "no SSH CA in the response matches teleport.ssh_ca_pin",
        )
    try:
        # The signature over the certificate by the key it names as signer; that key must
        # then be the pinned CA (a certificate naming the CA but signed by another fails here).
        cert.verify_cert_signature()
    except InvalidSignature as exc:
        raise JoinFailed(
            AgentCode.SSH_CA_PIN_MISMATCH, 200, "the SSH certificate's signature does not verify"
        ) from exc
    if ssh_key_pin(cert.signature_key()) not in pins:
        raise JoinFailed(
            AgentCode.SSH_CA_PIN_MISMATCH,
            200,
            "the SSH certificate is not signed by the SSH CA matching teleport.ssh_ca_pin",
        )
    if cert.type != serialization.SSHCertificateType.HOST:
        raise _bad("certs.ssh is not a host certificate")
    if len(pinned) < len(ca_lines):
        log.warning("left %d unpinned SSH CA key(s) out of ssh_ca.pub", len(ca_lines) - len(pinned))
    return tuple(pinned)


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def warn_unpinned(settings: AgentSettings) -> None:
    """Without pins the node trusts whatever CA the gateway hands out: say so, every join."""
    if not settings.ca_pins:
        log.warning(
            "teleport.ca_pin is not set: the node trusts whichever cluster CA the gateway "
            "returns (set it to the pin join-gateway status prints)"
        )
    if not settings.ssh_ca_pins:
        log.warning(
            "teleport.ssh_ca_pin is not set: the SSH host certificate's signer is not checked "
            "(set it to the SSH CA pin join-gateway status prints)"
        )


def write_node_files(data_dir: Path, issued: IssuedCerts) -> tuple[Path, ...]:
    """Write the certificates into ``data_dir`` as one set (see :mod:`gateway.agent.identity`)."""
    return write_identity_set(
        data_dir,
        {
            TLS_CERT_FILE: issued.tls_cert_pem.encode(),
            TLS_CA_FILE: "".join(issued.tls_ca_pems).encode(),
            SSH_CERT_FILE: (issued.ssh_cert + "\n").encode(),
            SSH_CA_FILE: "".join(k + "\n" for k in issued.ssh_ca_keys).encode(),
            HOST_ID_FILE: (issued.host_id + "\n").encode(),
        },
    )


async def _both(a: Coroutine[Any, Any, T], b: Coroutine[Any, Any, U]) -> tuple[T, U]:
    """Run two calls concurrently; the first failure cancels the other and is raised as is."""
    try:
        async with asyncio.TaskGroup() as tg:
            ta, tb = tg.create_task(a), tg.create_task(b)
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return ta.result(), tb.result()


# The gateway's codes for "verified, but the auth service failed": it released the
# challenge, so the same request may be sent again.
UPSTREAM_CODES = frozenset({"upstream_failed", "upstream_unavailable"})


class _Joiner:
    """The state one join carries across attempts (the cached intermediates)."""

    def __init__(
        self,
        settings: AgentSettings,
        keys: NodeKeys,
        gateway: GatewayClient,
        imds: ImdsClient,
        collector: IntermediateCollector | None,
    ) -> None:
        self._s = settings
        self._keys = keys
        self._gateway = gateway
        self._imds = imds
        self._collector = collector
        self._intermediates: tuple[str, ...] | None = None
        # A join the gateway verified but could not forward: resent as it is (same
        # challenge = same idempotency key at the auth service) while the challenge lives,
        # so a registration whose answer was lost is not made twice.
        self._pending: dict[str, Any] | None = None
        self._csr_pem: str | None = None

    async def attempt(self) -> dict[str, Any]:
        if self._pending is not None:
            body, self._pending = self._pending, None
            log.info("resending the verified join (same challenge) after an upstream failure")
            return await self._submit(body)
        challenge = await self._gateway.challenge()
        document, token = await _both(
            self._imds.attested_document(challenge),
            self._imds.access_token(client_id=self._s.client_id),
        )
        if self._intermediates is None:
            self._intermediates = ()
            if self._collector is not None:
                ders = await self._collector.collect(str(document["signature"]))
                self._intermediates = tuple(base64.b64encode(d).decode() for d in ders)
        body = build_join_body(
            token_name=self._s.token_name,
            challenge=challenge,
            attested_data=document,
            access_token=token,
            intermediates=self._intermediates,
            host=HostParams(
                node_name=self._s.node_name,
                role=self._s.role,
                public_ssh_key=self._keys.public_ssh_key,
                public_tls_key=self._keys.public_tls_key,
                additional_principals=self._s.additional_principals,
                dns_names=self._s.dns_names,
                # Proof that this node holds both private keys (the CSR is made once per
                # key set: its signature does not depend on the challenge).
                csr=self._csr(),
                ssh_key_proof=sign_ssh_possession(self._keys.ssh_key, challenge),
            ),
        )
        return await self._submit(body)

    def _csr(self) -> str:
        if self._csr_pem is None:
            self._csr_pem = make_csr(self._keys.tls_key)
        return self._csr_pem

    async def _submit(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._gateway.join(body)
        except JoinError as exc:
            if exc.code in UPSTREAM_CODES:
                self._pending = body
            raise


async def run_join(
    settings: AgentSettings,
    *,
    session: aiohttp.ClientSession | None = None,
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
    clock: Clock | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> JoinOutcome:
    """Join the cluster through the gateway; :class:`JoinFailed` when it cannot.

    Raises :class:`JoinFailed` for every failure of the join itself, :class:`NodeConfigError`
    when ``settings.ca_file`` cannot be loaded.

    ``session`` lets the demo and benchmarks share a connector; without one the agent makes
    its own (TLS trust from ``settings.ca_file``, source address ``settings.local_addr``).
    With a caller's session, its connector decides the source address. ``ssl_context``
    (default: built from ``settings.ca_file``, about 20 ms of loading the system store) lets
    a benchmark running thousands of agents build it once.
    """
    clock = clock or SystemClock()
    started = clock.monotonic()
    warn_unpinned(settings)
    try:
        keys = load_or_create_keys(settings.data_dir)
    except AgentError as exc:
        raise JoinFailed(exc.code, 0, exc.message) from exc
    ssl_context = ssl_context or make_ssl_context(settings.ca_file)
    own_session = session is None
    http = session or make_session(ssl_context=ssl_context, local_addr=settings.local_addr)
    backoff = Backoff(base=settings.backoff_base, cap=settings.backoff_cap, rng=rng)
    try:
        joiner = _Joiner(
            settings,
            keys,
            GatewayClient(
                http,
                base_url=settings.gateway_url,
                ssl_context=ssl_context,
                timeout=settings.request_timeout,
                clock=clock,
            ),
            ImdsClient(http, base_url=settings.imds_url, sleep=sleep, backoff=backoff),
            IntermediateCollector(http, allowed_prefixes=settings.aia_allowed_prefixes)
            if settings.collect_intermediates
            else None,
        )
        body, attempts = await _attempts(joiner, settings, backoff, sleep, clock, started)
    finally:
        if own_session:
            await http.close()
    try:
        issued = parse_join_response(body)
        issued = check_issued(
            issued, keys, ca_pins=settings.ca_pins, ssh_ca_pins=settings.ssh_ca_pins
        )
        files = write_node_files(settings.data_dir, issued)
    except JoinFailed as exc:
        log.error("join refused by the agent: %s", exc)
        raise JoinFailed(exc.code, exc.status, exc.message, attempts=attempts) from exc
    except AgentError as exc:
        raise JoinFailed(exc.code, 0, exc.message, attempts=attempts) from exc
    elapsed = clock.monotonic() - started
    log.info(
        "joined as host %s (%s) after %d attempt(s) in %.2fs",
        issued.host_id,
        issued.join.resource_id or settings.node_name,
        attempts,
        elapsed,
    )
    return JoinOutcome(
        host_id=issued.host_id, attempts=attempts, files=files, join=issued.join, elapsed=elapsed
    )


async def _attempts(
    joiner: _Joiner,
    settings: AgentSettings,
    backoff: Backoff,
    sleep: Sleep,
    clock: Clock,
    started: float,
) -> tuple[dict[str, Any], int]:
    attempt = 0
    while True:
        attempt += 1
        remaining = settings.total_timeout - (clock.monotonic() - started)
        try:
            async with asyncio.timeout(remaining):
                log.info("join attempt %d via %s", attempt, settings.gateway_url)
                return await joiner.attempt(), attempt
        except TimeoutError as exc:
            raise JoinFailed(
                AgentCode.DEADLINE_EXCEEDED,
                0,
                f"no join within total_timeout={settings.total_timeout}s",
                attempts=attempt,
            ) from exc
        except AgentError as exc:
            status: int = getattr(exc, "status", 0)
            if not exc.retryable:
                log.error("join failed: %s", exc)
                raise JoinFailed(exc.code, status, exc.message, attempts=attempt) from exc
            if attempt >= settings.max_attempts:
                log.error("join failed after %d attempts: %s", attempt, exc)
                raise JoinFailed(
                    exc.code,
                    status,
                    f"gave up after {attempt} attempts: {exc.message}",
                    attempts=attempt,
                ) from exc
            retry_after = exc.retry_after if isinstance(exc, JoinError) else None
            delay = backoff.delay(attempt, retry_after=retry_after)
            if clock.monotonic() - started + delay > settings.total_timeout:
                raise JoinFailed(
                    AgentCode.DEADLINE_EXCEEDED,
                    status,
                    f"next retry would pass total_timeout={settings.total_timeout}s "
                    f"(last error {exc.code})",
                    attempts=attempt,
                ) from exc
            log.warning("attempt %d failed (%s); retrying in %.2fs", attempt, exc.code, delay)
            await sleep(delay)
