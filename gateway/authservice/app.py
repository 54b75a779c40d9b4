"""The reference auth service's HTTP app (``POST /v1/register``, ``POST
/v1/register/batch``, ``GET /healthz``).

Registrations go to the registry (``registry/``: SQLite in the data directory, or a shared
PostgreSQL): one host per attested VM identity, so a VM that joins again gets the same host
ID with fresh certificates (a renewal), and a join matching a lock is refused (403
``host_locked``). The certificates come from a :class:`~gateway.authservice.signing.Signer`
(the CAs in the data directory, or Vault/OpenBao), awaited between the registry's two
transactions; a backend that is down answers 503 ``signing_unavailable`` with
``Retry-After``, one that refuses 502 ``signing_refused``.

It listens only over mTLS: the server context requires a client certificate signed by
the gateway client CA, so anyone else is refused during the handshake, before HTTP.
``make_auth_app`` is the app factory; ``AuthService`` runs it in-process (tests, demo,
``join-gateway auth serve``) with ``async with``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

from aiohttp import web

from gateway.authservice.admin import add_admin_routes
from gateway.authservice.authority import (
    ADMIN_COMMON_NAME,
    DEFAULT_CERT_TTL,
    AuthPaths,
    HostAuthority,
    check_trust_domain,
    ensure_authorities,
    init_auth_dir,
    sign_request,
    spiffe_id,
    write_ca_pins,
)
from gateway.authservice.registry import (
    HostLocked,
    IdempotencyConflict,
    Registry,
    RegistryUnavailable,
    open_registry,
)
from gateway.authservice.signing import (
    CaBundle,
    LocalSigner,
    Signer,
    SigningRefused,
    SigningUnavailable,
    register_result,
)
from gateway.authservice.store import RegistrationRecord
from gateway.authservice.wire import (
    AuthServiceError,
    ErrorCode,
    decode_register_batch,
    decode_registration,
    request_digest,
)
from gateway.core.clock import Clock, SystemClock
from gateway.core.files import write_atomic
from gateway.core.tlsutil import server_ssl_context
from gateway.protocol import (
    MAX_BATCH,
    REGISTER_BATCH_PATH,
    REGISTER_PATH,
    RegisterResult,
    Registration,
)
from gateway.protocol.possession import PossessionError, verify_csr, verify_ssh_possession

__all__ = [
    "AUTH_SETTINGS_KEY",
    "AUTH_STATE_KEY",
    "AuthService",
    "AuthSettings",
    "AuthState",
    "make_auth_app",
]

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class AuthSettings:
    cert_ttl: timedelta = DEFAULT_CERT_TTL
    max_body: int = MAX_BODY
    # Refuse a registration without a CSR and an SSH key proof (auth serve --require-csr).
    require_csr: bool = False
    # Add spiffe://<td>/azure/<tenant>/<subscription>/<vmId> to every X.509 certificate
    # (auth serve --spiffe-trust-domain); checked here, so a bad one stops the start.
    spiffe_trust_domain: str | None = None

    def __post_init__(self) -> None:
        if self.spiffe_trust_domain is not None:
            check_trust_domain(self.spiffe_trust_domain)

    @property
    def max_batch_body(self) -> int:
        """The cap on a batch body: room for MAX_BATCH registrations at ``max_body`` each
        (and the wrapper), so any batch of valid registrations fits; bounded all the same."""
        return MAX_BATCH * (self.max_body + 1) + 64


@dataclass(frozen=True)
class AuthState:
    """What the handlers need; one per app, built before startup and never swapped."""

    signer: Signer
    registry: Registry
    clock: Clock


AUTH_STATE_KEY = web.AppKey("auth_state", AuthState)
AUTH_SETTINGS_KEY = web.AppKey("auth_settings", AuthSettings)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as ``{"error": {"code", "message"}}``; never a bare 500 page."""
    try:
        return await handler(request)
    except AuthServiceError as exc:
        response = _error(exc.status, exc.code, exc.message)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return response
    except web.HTTPException as exc:
        if exc.status == 404:
            return _error(404, ErrorCode.NOT_FOUND, "no such endpoint")
        if exc.status == 405:
            return _error(405, ErrorCode.METHOD_NOT_ALLOWED, "method not allowed")
        if exc.status == 413:
            return _error(413, ErrorCode.BODY_TOO_LARGE, "body exceeds the size cap")
        raise
    except Exception:
        log.exception("auth service: unexpected error on %s %s", request.method, request.path)
        return _error(500, ErrorCode.INTERNAL_ERROR, "internal error")


def _peer_subject(request: web.Request) -> str:
    """The calling gateway's certificate subject CN (for the record)."""
    transport = request.transport
    peer: Any = transport.get_extra_info("peercert") if transport is not None else None
    if not peer:
        return ""
    for rdn in peer.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return ""


def _check_possession(reg: Registration, *, required: bool) -> None:
    """The node holds the keys it asks to have certified: its CSR (signed by the TLS key)
    and its signature over the challenge (the idempotency key) with the SSH key. The
    gateway checked them already; the auth service signs, so it checks again."""
    host = reg.host
    if host.csr is None or host.ssh_key_proof is None:
        if required:
            raise AuthServiceError(
                400, ErrorCode.CSR_REQUIRED, "a CSR and an SSH key proof are required"
            )
        if host.csr is None and host.ssh_key_proof is None:
            return
    try:
        if host.csr is not None:
            verify_csr(host.csr, host.public_tls_key)
        if host.ssh_key_proof is not None:
            verify_ssh_possession(host.public_ssh_key, reg.idempotency_key, host.ssh_key_proof)
    except PossessionError as exc:
        raise AuthServiceError(400, ErrorCode(exc.code), str(exc)) from None


@dataclass(frozen=True)
class RegisterAnswer:
    """What the auth service answers one registration: ``body`` is the 200 body
    (``host_id``, ``certs``, ``renewal``) or the error's ``{"code", "message"}``."""

    status: int
    body: dict[str, Any]
    replay: bool = False
    retry_after: float | None = None

    @classmethod
    def refusal(cls, exc: AuthServiceError) -> RegisterAnswer:
        return cls(
            exc.status, {"code": exc.code, "message": exc.message}, retry_after=exc.retry_after
        )

    def batch_item(self) -> dict[str, Any]:
        """This answer as an item of ``results`` in a batch response."""
        if self.status == 200:
            return {"status": 200, **self.body, "replay": self.replay}
        retry_after = None if self.retry_after is None else max(1, math.ceil(self.retry_after))
        return {"status": self.status, **self.body, "retry_after": retry_after}


async def register_one(
    reg: Registration, *, state: AuthState, settings: AuthSettings, gateway: str
) -> RegisterAnswer:
    """One registration, for ``/v1/register`` and for each item of ``/v1/register/batch``:
    possession checks, idempotency, the registry's two phases with the signing between
    them, the audit line. A refusal is an answer (a 4xx/5xx status with a code), not an
    exception; anything else raised is a bug."""
    try:
        return await _register_one(reg, state=state, settings=settings, gateway=gateway)
    except AuthServiceError as exc:
        return RegisterAnswer.refusal(exc)


async def _register_one(
    reg: Registration, *, state: AuthState, settings: AuthSettings, gateway: str
) -> RegisterAnswer:
    _check_possession(reg, required=settings.require_csr)
    digest = request_digest(reg)
    now = state.clock.now()

    td = settings.spiffe_trust_domain
    uri_sans = (spiffe_id(td, reg.join),) if td is not None else ()

    async def issue(host_id: str) -> RegisterResult:
        # Outside any registry transaction (see Registry.register): Vault is a network call.
        request = sign_request(
            host_id=host_id,
            host=reg.host,
            now=now,
            ttl=settings.cert_ttl,
            csr_pem=reg.host.csr,
            uri_sans=uri_sans,
        )
        try:
            issued = await state.signer.sign(request)
        except SigningUnavailable as exc:
            log.warning("signing unavailable (%s backend): %s", state.signer.name, exc)
            raise AuthServiceError(
                503,
                ErrorCode.SIGNING_UNAVAILABLE,
                "the signing backend is unavailable",
                retry_after=exc.retry_after,
            ) from None
        except SigningRefused as exc:
            log.error("signing refused (%s backend): %s", state.signer.name, exc)
            raise AuthServiceError(
                502, ErrorCode.SIGNING_REFUSED, f"the signing backend refused: {exc}"
            ) from None
        return register_result(host_id, issued, state.signer.ca_bundle())

    try:
        out = await state.registry.register(
            reg,
            digest=digest,
            gateway=gateway,
            now=now,
            cert_expiry=now + settings.cert_ttl,
            issue=issue,
        )
    except IdempotencyConflict as exc:
        raise AuthServiceError(409, ErrorCode.IDEMPOTENCY_CONFLICT, str(exc)) from None
    except HostLocked as exc:
        lock = exc.lock
        log.warning(
            "refused locked join: lock %s (%s=%s) reason=%r node=%s vm=%s via %s",
            lock.lock_id,
            lock.target,
            lock.value,
            lock.reason,
            reg.host.node_name,
            reg.join.vm_id,
            gateway or "?",
        )
        raise AuthServiceError(
            403, ErrorCode.HOST_LOCKED, f"locked ({lock.target}): {lock.reason}"
        ) from None
    except RegistryUnavailable as exc:
        # 503: the gateway retries it (the idempotency key makes that safe).
        log.error("registry unavailable: %s", exc)
        raise AuthServiceError(
            503, ErrorCode.REGISTRY_UNAVAILABLE, "the registry is unavailable"
        ) from None
    record = out.record
    if not out.replay:
        # The audit line: a renewal keeps the host ID, a new host is minted once per VM.
        log.info(
            "%s host %s node=%s role=%s vm=%s via %s labels=%s",
            "renewed" if out.kind == "renewal" else "registered",
            record.host_id,
            reg.host.node_name,
            reg.role,
            reg.join.vm_id,
            gateway or "?",
            json.dumps(dict(reg.labels), sort_keys=True, separators=(",", ":")),
        )
    return RegisterAnswer(
        200,
        {
            "host_id": record.host_id,
            "certs": record.result.to_json(),
            "renewal": out.kind == "renewal",
        },
        replay=out.replay,
    )


async def _registration_body(request: web.Request, cap: int) -> tuple[str, bytes]:
    """The peer rules both register endpoints share, then the body (at most ``cap``
    bytes); returns the calling gateway's certificate CN and the body."""
    if request.content_type != "application/json":
        raise AuthServiceError(
            415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json"
        )
    gateway = _peer_subject(request)
    if gateway == ADMIN_COMMON_NAME:
        # The admin certificate manages the inventory; it does not register nodes.
        raise AuthServiceError(403, ErrorCode.FORBIDDEN, "the admin certificate cannot register")
    # The app's client_max_size is the batch cap; a single registration has its own.
    too_large = AuthServiceError(413, ErrorCode.BODY_TOO_LARGE, "body exceeds the size cap")
    if request.content_length is not None and request.content_length > cap:
        raise too_large
    raw = await request.read()
    if len(raw) > cap:
        raise too_large
    return gateway, raw


async def _register(request: web.Request) -> web.Response:
    state = request.app[AUTH_STATE_KEY]
    settings = request.app[AUTH_SETTINGS_KEY]
    gateway, raw = await _registration_body(request, settings.max_body)
    reg = decode_registration(raw)
    answer = await register_one(reg, state=state, settings=settings, gateway=gateway)
    if answer.status != 200:
        raise AuthServiceError(
            answer.status,
            answer.body["code"],
            answer.body["message"],
            retry_after=answer.retry_after,
        )
    return web.json_response(
        answer.body, headers={"Idempotent-Replay": "true" if answer.replay else "false"}
    )


async def _register_batch(request: web.Request) -> web.Response:
    """``POST /v1/register/batch``: each item as ``/v1/register`` would answer it, run
    concurrently; one item's refusal (or a bug on it) never touches another's answer."""
    state = request.app[AUTH_STATE_KEY]
    settings = request.app[AUTH_SETTINGS_KEY]
    gateway, raw = await _registration_body(request, settings.max_batch_body)
    regs = decode_register_batch(raw)

    async def one(reg: Registration) -> RegisterAnswer:
        try:
            return await register_one(reg, state=state, settings=settings, gateway=gateway)
        except Exception:
            log.exception("auth service: unexpected error on a batch item")
            return RegisterAnswer(
                500, {"code": ErrorCode.INTERNAL_ERROR, "message": "internal error"}
            )

    answers = await asyncio.gather(*(one(reg) for reg in regs))
    return web.json_response({"results": [a.batch_item() for a in answers]})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_auth_app(
    *,
    signer: Signer,
    registry: Registry,
    clock: Clock | None = None,
    settings: AuthSettings | None = None,
) -> web.Application:
    """The auth service app over an open registry and a started signer (its owner
    closes both)."""
    settings = settings or AuthSettings()
    app = web.Application(middlewares=[_errors_middleware], client_max_size=settings.max_batch_body)
    app[AUTH_STATE_KEY] = AuthState(signer=signer, registry=registry, clock=clock or SystemClock())
    app[AUTH_SETTINGS_KEY] = settings
    app.router.add_post(REGISTER_PATH, _register)
    app.router.add_post(REGISTER_BATCH_PATH, _register_batch)
    app.router.add_get("/healthz", _healthz)
    add_admin_routes(app, registry=registry, clock=app[AUTH_STATE_KEY].clock)
    return app


class AuthService:
    """The reference auth service, running in this process on one mTLS listener.

    Parameters:

    * data_dir — CA keys, and the SQLite registry unless ``database`` is given; missing
      CAs are created. JSON records of earlier versions (``registrations/``) are imported
      into the registry at its first start.
    * database — ``postgresql://...`` for a registry shared by several replicas (or
      ``sqlite:///PATH``); None: ``<data_dir>/registry.sqlite3``.
    * host, port — where to listen (``port=0`` picks a free port; see ``url``).
    * tls_cert, tls_key, client_ca — the server certificate and the CA whose client
      certificates are accepted; by default those ``init_auth_dir`` makes in ``data_dir``.
    * clock — for certificate validity and record times.
    * signer — the signing backend (``VaultSigner``, say); None: a ``LocalSigner`` over
      the CAs in ``data_dir``. The service starts it and closes it.
    * settings — certificate lifetime and body cap.
    * shutdown_timeout — seconds to drain requests when closing.
    """

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        client_ca: str | os.PathLike[str] | None = None,
        clock: Clock | None = None,
        settings: AuthSettings | None = None,
        shutdown_timeout: float = 5.0,
        database: str | None = None,
        signer: Signer | None = None,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._host = host
        self._port = port
        self._tls_cert = tls_cert
        self._tls_key = tls_key
        self._client_ca = client_ca
        self._clock = clock or SystemClock()
        self._settings = settings or AuthSettings()
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._authority: HostAuthority | None = None
        self._signer_arg = signer
        self._signer: Signer | None = None
        self._database = database
        self._registry: Registry | None = None
        self._url: str | None = None
        self.paths: AuthPaths | None = None

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("AuthService already started")
        if None in (self._tls_cert, self._tls_key, self._client_ca):
            paths = await asyncio.to_thread(init_auth_dir, self._data_dir, clock=self._clock)
        else:
            paths = await asyncio.to_thread(ensure_authorities, self._data_dir, clock=self._clock)
        self.paths = paths
        tls_cert = self._tls_cert or paths.server_cert
        tls_key = self._tls_key or paths.server_key
        client_ca = self._client_ca or paths.client_ca_cert
        ssl_ctx = server_ssl_context(
            tls_cert, tls_key, client_ca_file=client_ca, require_client_cert=True
        )
        signer = self._signer_arg
        if signer is None:
            self._authority = await asyncio.to_thread(HostAuthority.load, paths)
            signer = LocalSigner(self._authority)
        # Checks credentials and permissions (a startup error names what is missing).
        try:
            await signer.start()
        except BaseException:
            await signer.aclose()
            raise
        try:
            # Opens, migrates and (once) imports the JSON records: fails on an unreadable one.
            registry = await open_registry(
                self._database, data_dir=self._data_dir, import_from=paths.registrations_dir
            )
        except BaseException:
            await signer.aclose()
            raise
        app = make_auth_app(
            signer=signer,
            registry=registry,
            clock=self._clock,
            settings=self._settings,
        )
        runner = web.AppRunner(app, shutdown_timeout=self._shutdown_timeout, access_log=None)
        try:
            await runner.setup()
            site = web.TCPSite(runner, self._host, self._port, ssl_context=ssl_ctx)
            await site.start()
        except BaseException:
            await runner.cleanup()
            await registry.aclose()
            await signer.aclose()
            raise
        self._signer = signer
        self._registry = registry
        self._runner = runner
        port = runner.addresses[0][1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._url = f"https://{host}:{port}"
        # Where `join-gateway nodes --data-dir` finds this service (the admin API).
        await asyncio.to_thread(
            write_atomic, self._data_dir / "auth.url", (self._url + "\n").encode(), mode=0o644
        )
        # What `join-gateway status --auth-data-dir` prints: this backend's pins.
        await asyncio.to_thread(write_ca_pins, paths, signer.ca_bundle(), backend=signer.name)
        log.info("auth service listening on %s (CA pin %s)", self._url, self.ca_pin())

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        registry, self._registry = self._registry, None
        signer, self._signer = self._signer, None
        try:
            if runner is not None:
                await runner.cleanup()
        finally:
            try:
                if registry is not None:
                    await registry.aclose()
            finally:
                if signer is not None:
                    await signer.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("AuthService not started")
        return self._url

    @property
    def authority(self) -> HostAuthority:
        """The local CAs (the default backend only)."""
        if self._authority is None:
            raise RuntimeError("AuthService not started, or not on the local backend")
        return self._authority

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            raise RuntimeError("AuthService not started")
        return self._signer

    def ca_bundle(self) -> CaBundle:
        """What nodes trust and pin, from the signing backend."""
        return self.signer.ca_bundle()

    def ca_pin(self) -> str:
        """``sha256:<hex>`` of the host CA's SubjectPublicKeyInfo."""
        return self.ca_bundle().ca_pin

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise RuntimeError("AuthService not started")
        return self._registry

    async def records(self) -> list[RegistrationRecord]:
        """Every registration, oldest first."""
        return await self.registry.registrations()

    def __repr__(self) -> str:
        return f"<AuthService url={self._url} data_dir={self._data_dir}>"
