"""Client for the Azure Instance Metadata Service (IMDS), as seen from inside the VM.

Two calls: the attested document (signed by Azure, carrying our nonce) and a managed-identity
access token for Resource Manager. Both need ``Metadata: true``, which IMDS requires so that a
server-side request forgery cannot reach it. IMDS throttles and restarts under maintenance, so
429/5xx (and 410, "retry after 70 s" during updates) are retried a few times, as
https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#errors-and-debugging
recommends. The access token is a live credential: never logged, never stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from gateway.agent.backoff import Backoff
from gateway.agent.errors import ImdsError, JoinError
from gateway.agent.transport import read_capped

__all__ = ["ARM_RESOURCE", "ImdsClient"]

log = logging.getLogger(__name__)

ARM_RESOURCE = "https://management.azure.com/"
ATTESTED_API_VERSION = "2021-02-01"
TOKEN_API_VERSION = "2018-02-01"  # noqa: S105 - an API version, not a secret
MAX_NONCE = 32  # IMDS rejects longer nonces
_MAX_BODY = 256 * 1024
_NONCE_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _transient(status: int) -> bool:
    return status in (410, 429) or status >= 500


class ImdsClient:
    """IMDS as the VM sees it: attested document and managed-identity token.

    Parameters:
        session: the HTTP session (IMDS is plain HTTP on the link-local address).
        base_url: ``http://169.254.169.254`` on Azure; the emulator serves one per VM.
        timeout: seconds per request.
        max_attempts: tries per call for transient failures.
        sleep, backoff: injected so tests do not wait.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        timeout: float = 10.0,
        max_attempts: int = 4,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff: Backoff | None = None,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_attempts = max(1, max_attempts)
        self._sleep = sleep
        self._backoff = backoff or Backoff(base=0.5, cap=5.0)

    def __repr__(self) -> str:
        return f"ImdsClient(base_url={self._base!r})"

    async def attested_document(self, nonce: str) -> dict[str, Any]:
        """The attested-data response exactly as IMDS returned it (``encoding``, ``signature``)."""
        if not nonce or len(nonce) > MAX_NONCE or not set(nonce) <= _NONCE_ALPHABET:
            raise ImdsError(f"nonce must be 1..{MAX_NONCE} base64url characters")
        url = (
            f"{self._base}/metadata/attested/document"
            f"?api-version={ATTESTED_API_VERSION}&nonce={quote(nonce, safe='')}"
        )
        doc = await self._get_json(url, what="attested document")
        if (
            doc.get("encoding") != "pkcs7"
            or not isinstance(doc.get("signature"), str)
            or not (doc["signature"])
        ):
            raise ImdsError("attested document lacks encoding=pkcs7 and a signature")
        log.debug("got attested document (%d base64 chars)", len(doc["signature"]))
        return doc

    async def access_token(self, *, client_id: str | None) -> str:
        """A managed-identity token for Resource Manager (``client_id`` None: system-assigned)."""
        url = (
            f"{self._base}/metadata/identity/oauth2/token?api-version={TOKEN_API_VERSION}"
            f"&resource={quote(ARM_RESOURCE, safe='')}"
        )
        if client_id is not None:
            url += f"&client_id={quote(client_id, safe='')}"
        body = await self._get_json(url, what="access token")
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise ImdsError("token response lacks access_token")
        log.debug("got access token for %s", client_id or "the system-assigned identity")
        return token

    async def _get_json(self, url: str, *, what: str) -> dict[str, Any]:
        last: ImdsError | None = None
        for attempt in range(1, self._max_attempts + 1):
            try:
                return await self._get_once(url, what=what)
            except ImdsError as exc:
                if not exc.retryable:
                    raise
                last = exc
                if attempt < self._max_attempts:
                    delay = self._backoff.delay(attempt)
                    log.info("IMDS %s failed (%s); retrying in %.2fs", what, exc.message, delay)
                    await self._sleep(delay)
        assert last is not None
        raise last

    async def _get_once(self, url: str, *, what: str) -> dict[str, Any]:
        try:
            async with self._session.get(
                URL(url, encoded=True),
                headers={"Metadata": "true"},
                timeout=self._timeout,
                allow_redirects=False,  # IMDS never redirects; refuse to follow one elsewhere
            ) as resp:
                try:
                    raw = await read_capped(resp, _MAX_BODY)
                except JoinError as exc:
                    raise ImdsError(f"{what}: {exc.message}", status=resp.status) from exc
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ImdsError(
                f"{what}: cannot reach IMDS: {type(exc).__name__}", transient=True
            ) from exc
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if status != 200:
            raise ImdsError(
                f"{what}: IMDS answered {status}{_describe_error(body)}",
                status=status,
                transient=_transient(status),
            )
        if not isinstance(body, dict):
            raise ImdsError(
                f"{what}: IMDS answered 200 with a body that is not a JSON object", status=status
            )
        return body


def _describe_error(body: object) -> str:
    """IMDS error bodies carry ``error``/``error_description``; keep them short and token-free."""
    if not isinstance(body, dict):
        return ""
    parts = [
        str(body[k])[:200] for k in ("error", "error_description") if isinstance(body.get(k), str)
    ]
    return (": " + " - ".join(parts)) if parts else ""
