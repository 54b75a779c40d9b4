"""Signing through HashiCorp Vault or OpenBao (same HTTP API): the CA keys stay there.

X.509: ``POST /v1/<pki>/sign/<role>`` with the node's CSR and the names the auth service
decided (the role must set ``use_csr_common_name=false`` and ``use_csr_sans=false``, so the
CSR's own names are ignored). SSH: ``POST /v1/<ssh>/sign/<role>`` with ``cert_type=host``,
the principals the auth service decided and ``key_id`` = host ID. The trust material nodes
pin comes from Vault too (``/v1/<pki>/ca_chain``, ``/v1/<ssh>/public_key``).

Credentials: a token file (re-read whenever it changes on disk — a Vault Agent sink, say)
or AppRole (login, ``renew-self`` at two thirds of the lease, a fresh login when renewal
fails or Vault says the token is no longer valid).

Failures are translated here and nowhere else: sealed, down, 5xx, 429 (Vault's rate-limit
quotas, with ``Retry-After``) and timeouts are :class:`SigningUnavailable` (the auth service
answers 503 and the gateway ``upstream_unavailable``, so the agent retries); a refusal of a
well-formed request (``permission denied`` after a fresh login, a role that forbids a
name) is :class:`SigningRefused`. At start, ``sys/capabilities-self`` tells whether the
credentials may call both ``sign`` endpoints; a missing capability is a startup error
naming the path and the capability.

API references: https://openbao.org/api-docs/secret/pki/#sign-certificate,
https://openbao.org/api-docs/secret/ssh/#sign-ssh-key,
https://openbao.org/api-docs/auth/approle/#login-with-approle,
https://openbao.org/api-docs/system/capabilities-self/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509

from gateway.authservice.signing import (
    CaBundle,
    Issued,
    SigningRefused,
    SigningUnavailable,
    SignRequest,
    ssh_ca_pin,
)
from gateway.core.clock import Clock, SystemClock
from gateway.core.httputil import ResponseTooLarge, read_capped
from gateway.core.tlsutil import spki_pin

__all__ = [
    "AppRoleAuth",
    "TokenFileAuth",
    "VaultAuth",
    "VaultClient",
    "VaultError",
    "VaultSettings",
    "VaultSigner",
    "VaultStartupError",
]

log = logging.getLogger(__name__)

# Vault answers are small (a certificate and its chain); anything bigger is not Vault.
_MAX_BODY = 1 << 20
_DEFAULT_RETRY_AFTER = 2.0


class VaultStartupError(Exception):
    """The configuration cannot work (no permission, no such mount): do not start."""


class VaultError(Exception):
    """One Vault call failed; ``status`` 0 means no HTTP answer at all."""

    def __init__(self, status: int, errors: list[str], *, retry_after: float | None = None):
        super().__init__(f"vault answered {status}: {'; '.join(errors) or 'no detail'}")
        self.status = status
        self.errors = errors
        self.retry_after = retry_after

    @property
    def permission_denied(self) -> bool:
        return self.status == 403

    @property
    def retryable(self) -> bool:
        # 429: a rate-limit quota; 5xx: sealed (503), standby, unavailable; 0: no answer.
        return self.status == 0 or self.status == 429 or self.status >= 500


@dataclass(frozen=True)
class VaultSettings:
    """Parameters (``auth serve --ca-backend vault …``):

    * addr — ``https://vault:8200`` (``http://`` only on loopback for tests and dev).
    * namespace — Vault Enterprise/OpenBao namespace, sent as ``X-Vault-Namespace``.
    * pki_mount / pki_role, ssh_mount / ssh_role — where to sign.
    * timeout — seconds for any one call (a slow Vault becomes ``SigningUnavailable``).
    * ca_file — CA bundle to verify Vault's TLS certificate (default: the system's).
    """

    addr: str
    pki_mount: str = "pki"
    pki_role: str = "join-node"
    ssh_mount: str = "ssh"
    ssh_role: str = "join-host"
    namespace: str | None = None
    timeout: float = 5.0
    ca_file: Path | None = None


class VaultAuth:
    """How to obtain the ``X-Vault-Token``; ``invalidate`` after Vault said it is bad."""

    async def token(self, client: VaultClient) -> str:
        raise NotImplementedError

    async def invalidate(self, failed: str) -> bool:
        """Vault refused ``failed``: forget it (if it is still the current token; calls in
        flight together all see the same refusal, and one fresh token serves them all).
        True when a different token may now be obtained."""
        return False

    async def aclose(self) -> None:
        return None


class TokenFileAuth(VaultAuth):
    """A token in a file (a Vault Agent sink, a Kubernetes secret): re-read on change.

    The file's ``(mtime, size, inode)`` is checked on every use, which is one ``stat`` —
    cheap next to a signing round trip — so a rotated token is used from the next call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    def _read(self) -> str:
        try:
            st = self._path.stat()
        except OSError as exc:
            raise SigningRefused(f"vault token file {self._path}: {exc.strerror}") from exc
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            token = self._path.read_text(encoding="utf-8").strip()
            if not token:
                raise SigningRefused(f"vault token file {self._path} is empty")
            self._token, self._stamp = token, stamp
            log.info("vault token read from %s", self._path)
        return self._token

    async def token(self, client: VaultClient) -> str:
        return self._read()

    async def invalidate(self, failed: str) -> bool:
        # Only a changed file can help; reading it again is the next call's stat anyway.
        self._stamp = None
        try:
            return self._read() != failed
        except SigningRefused:
            return False

    def __repr__(self) -> str:
        return f"<TokenFileAuth {self._path}>"


# Seconds a fresh AppRole token must have lived before a refusal of it means logging in
# again (see AppRoleAuth): at most one login per interval while a permission is missing.
RELOGIN_INTERVAL = 10.0


class AppRoleAuth(VaultAuth):
    """AppRole: ``role_id`` + a ``secret_id`` read from a file at each login.

    The token is renewed (``auth/token/renew-self``) once two thirds of its lease have
    passed; when renewal fails, or Vault refuses the token, the next call logs in again —
    but not when the refused token is younger than :data:`RELOGIN_INTERVAL`: a token Vault
    refuses seconds after issuing it lacks a permission (a narrowed policy) rather than
    being revoked, and logging in again for every refused signing of a storm would mint
    a token per join. Such a refusal is :class:`SigningRefused` at once."""

    def __init__(
        self,
        *,
        role_id: str,
        secret_id_file: Path,
        mount: str = "approle",
        clock: Clock | None = None,
    ) -> None:
        self._role_id = role_id
        self._secret_id_file = secret_id_file
        self._mount = mount.strip("/")
        self._clock = clock if clock is not None else SystemClock()
        self._token: str | None = None
        self._renew_at = 0.0
        self._expires_at = 0.0
        self._renewable = False
        self._logged_in_at = float("-inf")
        self._lock = asyncio.Lock()
        self.logins = 0
        self.renewals = 0

    def _stamp(self, auth: Mapping[str, Any]) -> None:
        ttl = float(auth.get("lease_duration") or 0)
        now = self._clock.monotonic()
        self._token = str(auth["client_token"])
        self._renewable = bool(auth.get("renewable"))
        # A zero lease (root-like tokens) never needs renewing.
        self._expires_at = now + ttl if ttl else float("inf")
        self._renew_at = now + ttl * 2 / 3 if ttl else float("inf")

    async def _login(self, client: VaultClient) -> None:
        try:
            secret_id = self._secret_id_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SigningRefused(
                f"vault approle secret-id file {self._secret_id_file}: {exc.strerror}"
            ) from exc
        data = await client.call(
            "POST",
            f"auth/{self._mount}/login",
            {"role_id": self._role_id, "secret_id": secret_id},
            token=None,
        )
        auth = data.get("auth")
        if not isinstance(auth, Mapping) or "client_token" not in auth:
            raise VaultError(200, ["login answer without auth.client_token"])
        self._stamp(auth)
        self._logged_in_at = self._clock.monotonic()
        self.logins += 1
        log.info("vault approle login (lease %ss)", auth.get("lease_duration"))

    async def token(self, client: VaultClient) -> str:
        async with self._lock:
            now = self._clock.monotonic()
            if self._token is None or now >= self._expires_at:
                await self._login(client)
            elif now >= self._renew_at:
                try:
                    if not self._renewable:
                        raise VaultError(400, ["token is not renewable"])
                    data = await client.call("POST", "auth/token/renew-self", {}, token=self._token)
                    auth = data.get("auth")
                    if not isinstance(auth, Mapping) or "client_token" not in auth:
                        raise VaultError(200, ["renewal answer without auth"])
                    self._stamp(auth)
                    self.renewals += 1
                except VaultError as exc:
                    if exc.retryable:
                        raise
                    log.info("vault token renewal failed (%s): logging in again", exc)
                    await self._login(client)
            assert self._token is not None
            return self._token

    async def invalidate(self, failed: str) -> bool:
        async with self._lock:
            if self._token != failed:
                return True  # another call logged in already: try its token
            if self._clock.monotonic() - self._logged_in_at < RELOGIN_INTERVAL:
                return False  # a fresh token refused: a permission, not a lost token
            self._token = None
        return True

    async def aclose(self) -> None:
        # Revoking on close would cut off a sibling replica sharing nothing with us — no:
        # each replica has its own token; leave it to expire (short TTL by vault-setup).
        return None

    def __repr__(self) -> str:
        return f"<AppRoleAuth role_id={self._role_id[:8]}… logins={self.logins}>"


class VaultClient:
    """One Vault server: JSON calls with the namespace header and a timeout each."""

    def __init__(
        self,
        settings: VaultSettings,
        auth: VaultAuth,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._settings = settings
        self._auth = auth
        self._base = settings.addr.rstrip("/") + "/v1/"
        self._own_session = session is None
        self._session = session
        self.calls = 0

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            ssl_ctx: Any = None
            if self._settings.ca_file is not None:
                ssl_ctx = ssl.create_default_context(cafile=str(self._settings.ca_file))
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32, ssl=ssl_ctx),
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            )
        return self._session

    async def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | None,
        raw: bool = False,
    ) -> dict[str, Any]:
        """One request. Returns the JSON object (``{"text": …}`` when ``raw``)."""
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["X-Vault-Token"] = token
        if self._settings.namespace:
            headers["X-Vault-Namespace"] = self._settings.namespace
        self.calls += 1
        try:
            async with self._get_session().request(
                method,
                self._base + path,
                json=dict(body) if body is not None else None,
                headers=headers,
            ) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                # The whole answer: ``content.read(n)`` returns what has arrived so far,
                # and a reply that came in two segments read as {} (an empty mount list
                # made a re-run of vault-setup mount pki again and fail).
                try:
                    payload = await read_capped(resp, _MAX_BODY)
                except ResponseTooLarge:
                    raise VaultError(status, ["answer larger than 1 MiB"]) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise VaultError(0, [f"{type(exc).__name__}: {exc}"]) from exc
        if raw and status == 200:
            return {"text": payload.decode("utf-8", "replace")}
        try:
            data = json.loads(payload) if payload else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        if status in (200, 204):
            return data
        errors = data.get("errors")
        messages = [str(e).strip() for e in errors] if isinstance(errors, list) else []
        raise VaultError(status, messages, retry_after=retry_after)

    async def authed(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A call with our token; on 403 one fresh token (revoked, expired) and a retry."""
        token = await self._auth.token(self)
        try:
            return await self.call(method, path, body, token=token)
        except VaultError as exc:
            if not exc.permission_denied or not await self._auth.invalidate(token):
                raise
            log.info("vault refused our token (%s): authenticating again", exc)
        return await self.call(method, path, body, token=await self._auth.token(self))

    async def aclose(self) -> None:
        await self._auth.aclose()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"<VaultClient {self._settings.addr} calls={self.calls} auth={self._auth!r}>"


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(float(value), 0.0)
    return None


def _translate(exc: VaultError, what: str) -> Exception:
    if exc.retryable:
        return SigningUnavailable(
            f"{what}: {exc}", retry_after=exc.retry_after or _DEFAULT_RETRY_AFTER
        )
    return SigningRefused(f"{what}: {exc}")


class VaultSigner:
    """The ``vault`` signing backend (see the module docstring)."""

    name = "vault"

    def __init__(self, client: VaultClient, settings: VaultSettings) -> None:
        self._client = client
        self._settings = settings
        self._pki = settings.pki_mount.strip("/")
        self._ssh = settings.ssh_mount.strip("/")
        self._bundle: CaBundle | None = None
        self.sign_calls = 0

    @property
    def client(self) -> VaultClient:
        return self._client

    async def start(self) -> None:
        """Check capabilities, then load the CA chain and the SSH CA key; startup errors
        name what is missing."""
        need = {
            f"{self._pki}/sign/{self._settings.pki_role}": "update",
            f"{self._ssh}/sign/{self._settings.ssh_role}": "update",
        }
        try:
            data = await self._client.authed(
                "POST", "sys/capabilities-self", {"paths": sorted(need)}
            )
        except (VaultError, SigningRefused) as exc:
            raise VaultStartupError(f"vault at {self._settings.addr}: {exc}") from exc
        missing = []
        for path, capability in need.items():
            granted = data.get(path, data.get("capabilities", []))
            if not isinstance(granted, list):
                granted = []
            if "root" not in granted and capability not in granted and "create" not in granted:
                missing.append(f"'{capability}' on {path}")
        if missing:
            raise VaultStartupError(
                "vault credentials lack " + ", ".join(missing) + " (see `join-gateway auth "
                "vault-setup`, which prints the policy the auth service needs)"
            )
        try:
            await self.refresh_bundle()
        except (VaultError, SigningRefused) as exc:
            raise VaultStartupError(f"vault at {self._settings.addr}: {exc}") from exc

    async def refresh_bundle(self) -> CaBundle:
        chain = await self._client.call("GET", f"{self._pki}/ca_chain", token=None, raw=True)
        ssh_key = await self._client.call("GET", f"{self._ssh}/public_key", token=None, raw=True)
        pems = _split_pems(chain["text"])
        if not pems:
            raise VaultStartupError(f"{self._pki}/ca_chain is empty: is the PKI mount set up?")
        line = ssh_key["text"].strip()
        if not line.startswith(("ssh-", "ecdsa-")):
            raise VaultStartupError(f"{self._ssh}/public_key is not an SSH public key")
        anchor = x509.load_pem_x509_certificate(pems[-1].encode("ascii"))
        self._bundle = CaBundle(
            tls_ca_certs=tuple(pems),
            ssh_ca_keys=(line,),
            ca_pin=spki_pin(anchor),
            ssh_ca_pin=ssh_ca_pin(line),
        )
        return self._bundle

    def ca_bundle(self) -> CaBundle:
        if self._bundle is None:
            raise RuntimeError("VaultSigner.start() was not awaited")
        return self._bundle

    async def sign(self, request: SignRequest) -> Issued:
        if request.csr_pem is None:
            # Vault's PKI signs CSRs only: a node must prove it holds its key.
            raise SigningRefused("the vault backend needs the node's CSR")
        ttl = f"{max(int(request.ttl.total_seconds()), 1)}s"
        self.sign_calls += 1
        x509_body = {
            "csr": request.csr_pem,
            "common_name": request.host_id,
            "alt_names": ",".join(request.dns_names),
            "ip_sans": ",".join(request.ip_addresses),
            "uri_sans": ",".join(request.uri_sans),
            "ttl": ttl,
            "format": "pem",
        }
        ssh_body = {
            "public_key": request.ssh_public_key,
            "cert_type": "host",
            "valid_principals": ",".join(request.principals),
            "key_id": request.host_id,
            "ttl": ttl,
        }
        tls, ssh = await asyncio.gather(
            self._sign_at(f"{self._pki}/sign/{self._settings.pki_role}", x509_body),
            self._sign_at(f"{self._ssh}/sign/{self._settings.ssh_role}", ssh_body),
        )
        cert = (tls.get("data") or {}).get("certificate")
        signed = (ssh.get("data") or {}).get("signed_key")
        if not isinstance(cert, str) or not isinstance(signed, str):
            raise SigningUnavailable("vault answered without a certificate")
        return Issued(tls_cert_pem=cert.strip() + "\n", ssh_cert=signed.strip())

    async def _sign_at(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        # The error names the path: "permission denied" alone does not say which of the
        # two the operator must fix.
        try:
            return await self._client.authed("POST", path, body)
        except VaultError as exc:
            raise _translate(exc, f"vault signing ({path})") from exc

    async def aclose(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"<VaultSigner {self._settings.addr} pki={self._pki} ssh={self._ssh}>"


def _split_pems(text: str) -> list[str]:
    marker = "-----END CERTIFICATE-----"
    out = []
    for part in text.split(marker):
        start = part.find("-----BEGIN CERTIFICATE-----")
        if start >= 0:
            out.append(part[start:] + marker + "\n")
    return out
