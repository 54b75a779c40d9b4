"""Who signs a node's certificates: the auth service decides, a backend signs.

The auth service decides *what* a node's certificates say (host ID, role, names, TTL);
a :class:`Signer` only turns that decision into an X.509 certificate and an OpenSSH host
certificate. Two backends:

* :class:`LocalSigner` — today's CAs in files under the auth service's data directory
  (``ca/host-ca*.pem``, ``ca/ssh-ca-key``); the default, and what ``make demo`` uses.
* :class:`~gateway.authservice.vault.VaultSigner` — HashiCorp Vault or OpenBao: the PKI
  engine's ``sign/<role>`` and the SSH engine's ``sign/<role>``, so the CA keys never
  leave the secrets manager.

Names in a certificate come from the :class:`SignRequest` only — never from the node's
CSR (Vault is configured with ``use_csr_common_name=false``/``use_csr_sans=false`` for the
same reason; ``vault-setup`` writes such a role).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.core.tlsutil import ssh_key_pin
from gateway.protocol import RegisterResult

__all__ = [
    "CaBundle",
    "Issued",
    "LocalSigner",
    "SignRequest",
    "Signer",
    "SigningError",
    "SigningRefused",
    "SigningUnavailable",
    "load_certifiable_tls_key",
    "register_result",
    "ssh_ca_pin",
]


class SigningError(Exception):
    """A backend could not sign. Subclasses say whether trying again can help."""


class SigningUnavailable(SigningError):
    """The backend is down, sealed, rate-limited or slow: retry after ``retry_after`` s.

    The auth service answers ``503 signing_unavailable`` with ``Retry-After``; the gateway
    turns that into ``503 upstream_unavailable`` for the agent, which retries."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SigningRefused(SigningError):
    """The backend refused a well-formed request (its policy, its role, our credentials):
    retrying the same request cannot help; an operator must act."""


@dataclass(frozen=True)
class SignRequest:
    """Everything the auth service decided for one node's certificates.

    ``principals`` are the SSH principals; ``dns_names``/``ip_addresses`` the X.509 SANs
    (the auth service derives both from the same verified names). ``csr_pem`` is the
    node's PKCS#10 request for ``tls_public_key_pem`` (already checked by the auth
    service); the local backend certifies the public key directly, Vault needs the CSR.
    """

    host_id: str
    role: str
    node_name: str
    tls_public_key_pem: str
    ssh_public_key: str
    principals: tuple[str, ...]
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    uri_sans: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    csr_pem: str | None = None

    @property
    def ttl(self) -> timedelta:
        return self.not_after - self.not_before


@dataclass(frozen=True)
class Issued:
    """The two certificates, PEM and OpenSSH text."""

    tls_cert_pem: str
    ssh_cert: str


@dataclass(frozen=True)
class CaBundle:
    """What nodes must trust: the X.509 CA chain (PEM, issuing CA first) and the SSH CA
    public key lines, plus the host CA pin (``sha256:<hex>`` of the trust anchor's SPKI
    that ``join-gateway status`` prints)."""

    tls_ca_certs: tuple[str, ...]
    ssh_ca_keys: tuple[str, ...]
    ca_pin: str
    ssh_ca_pin: str


class Signer(Protocol):
    """A signing backend. ``sign`` may raise :class:`SigningUnavailable` or
    :class:`SigningRefused`; nothing else escapes a backend."""

    name: str

    async def start(self) -> None:
        """Check credentials and permissions, load the CA bundle (startup errors here)."""

    async def sign(self, request: SignRequest) -> Issued: ...

    def ca_bundle(self) -> CaBundle: ...

    async def aclose(self) -> None: ...


def register_result(host_id: str, issued: Issued, bundle: CaBundle) -> RegisterResult:
    """The registration API's answer: the node's two certificates and what to trust."""
    return RegisterResult(
        host_id=host_id,
        ssh_cert=issued.ssh_cert,
        tls_cert=issued.tls_cert_pem,
        tls_ca_certs=bundle.tls_ca_certs,
        ssh_ca_keys=bundle.ssh_ca_keys,
    )


def ssh_ca_pin(public_key_line: str) -> str:
    """``sha256:<hex>`` of an SSH CA key's blob: what a node's ``teleport.ssh_ca_pin`` holds
    (the digest ``ssh-keygen -l -E sha256`` prints, in hex rather than base64)."""
    return ssh_key_pin(serialization.load_ssh_public_key(public_key_line.encode("ascii")))


def load_certifiable_tls_key(
    pem: str,
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode("ascii"))
    if not isinstance(
        key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    ):
        raise SigningRefused("unsupported TLS key type")
    return key


class LocalSigner:
    """The CAs in files (the default backend): signing is CPU work on this process."""

    name = "local"

    def __init__(self, authority: LocalAuthority) -> None:
        self._authority = authority

    async def start(self) -> None:
        return None

    async def sign(self, request: SignRequest) -> Issued:
        # On the event loop: an ECDSA X.509 plus an Ed25519 SSH certificate is ~0.8 ms of
        # CPU (measured on the 2-core dev machine), and the GIL-bound work would not run
        # any sooner in a thread; the hop would only add its own cost.
        return self._authority.sign(request)

    def ca_bundle(self) -> CaBundle:
        return self._authority.ca_bundle()

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<LocalSigner {self._authority!r}>"


class LocalAuthority(Protocol):
    """What :class:`LocalSigner` needs of the file-based CAs (``HostAuthority``)."""

    def sign(self, request: SignRequest) -> Issued: ...

    def ca_bundle(self) -> CaBundle: ...
