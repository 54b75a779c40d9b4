"""The auth service's certificate authorities and its data directory.

Two CAs certify a joining node, as Teleport's auth service does:

* the **host CA** (X.509, ECDSA P-256 or RSA) signs a certificate for the node's public TLS
  key: subject ``CN=<host_id>, O=<role>`` (Teleport's host identity), SANs for the host ID,
  the node name and every name or IP the node asked for, usable for server and client auth
  (nodes both serve and dial inside the cluster);
* the **SSH CA** (Ed25519) signs an OpenSSH *host* certificate for the node's SSH key, with
  principals host ID, node name, additional principals and DNS names.

Two more CAs exist only for the mTLS hop from the gateways: a *cluster internal CA* that
signs the auth service's own server certificate, and a *gateway client CA* that signs the
gateways' client certificates — the auth service trusts that CA and nothing else.

``init_auth_dir`` creates whatever is missing (idempotently) and returns the paths; private
keys are written 0600, atomically.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.authservice.signing import (
    CaBundle,
    Issued,
    SigningRefused,
    SignRequest,
    load_certifiable_tls_key,
    register_result,
    ssh_ca_pin,
)
from gateway.core.clock import Clock, SystemClock
from gateway.core.files import write_atomic
from gateway.core.tlsutil import (
    CaMaterial,
    KeyType,
    generate_ca,
    issue_cert,
    load_ca,
    sign_public_key,
    spki_pin,
    write_pem_files,
)
from gateway.protocol import HostParams, JoinBlock, RegisterResult, is_dns_name

__all__ = [
    "ADMIN_COMMON_NAME",
    "DEFAULT_CERT_TTL",
    "GATEWAY_COMMON_NAME",
    "AuthPaths",
    "CaPins",
    "HostAuthority",
    "ca_pin_for_data_dir",
    "ca_pins_for_data_dir",
    "check_trust_domain",
    "ensure_authorities",
    "init_auth_dir",
    "sign_request",
    "spiffe_id",
    "write_ca_pins",
]

log = logging.getLogger(__name__)

# Client certificate subjects: the gateways register nodes, the admin manages the inventory.
GATEWAY_COMMON_NAME = "join-gateway"
ADMIN_COMMON_NAME = "join-gateway admin"

# A day: long enough that a node outlives a restart of its cluster, short enough that a
# stolen identity dies quickly. Configurable (``--cert-ttl``).
DEFAULT_CERT_TTL = timedelta(hours=24)
# Issued certificates start a little in the past to absorb clock skew between machines.
_BACKDATE = timedelta(minutes=5)


# A SPIFFE trust domain: lowercase letters, digits, '.', '-' and '_' (SPIFFE-ID §2.1,
# https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md#21-trust-domain).
_TRUST_DOMAIN = re.compile(r"\A[a-z0-9._-]{1,255}\Z")


def check_trust_domain(value: str) -> str:
    """``value`` if it is a SPIFFE trust domain name; ``ValueError`` saying why not."""
    if not _TRUST_DOMAIN.fullmatch(value):
        raise ValueError(
            f"SPIFFE trust domain {value[:80]!r} must be 1..255 of lowercase letters, "
            "digits, '.', '-' and '_' (no scheme, port or path)"
        )
    return value


def spiffe_id(trust_domain: str, join: JoinBlock) -> str:
    """The node's SPIFFE ID, ``spiffe://<td>/azure/<tenant>/<subscription>/<vmId>``: from
    the registration's verified join block (GUIDs, checked by the decoder; lowercased
    so that one VM has one ID)."""
    path = "/".join(v.lower() for v in (join.tenant, join.subscription, join.vm_id))
    return f"spiffe://{check_trust_domain(trust_domain)}/azure/{path}"


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AuthPaths:
    """Where everything lives under the auth service's ``--data-dir``."""

    data_dir: Path
    host_ca_cert: Path
    host_ca_key: Path
    ssh_ca_key: Path
    ssh_ca_pub: Path
    internal_ca_cert: Path
    internal_ca_key: Path
    server_cert: Path
    server_key: Path
    client_ca_cert: Path
    client_ca_key: Path
    gateway_client_cert: Path
    gateway_client_key: Path
    admin_cert: Path
    admin_key: Path
    registrations_dir: Path
    # What nodes trust and pin, written by the auth service at each start from its signing
    # backend (the local CAs or Vault's ca_chain and SSH public key): `status` reads it.
    ca_pins: Path

    @property
    def cluster_ca(self) -> Path:
        """The CA gateways trust for the auth service's certificate (``upstream.ca_file``)."""
        return self.internal_ca_cert

    @property
    def gateway_client_ca(self) -> Path:
        """The CA whose client certificates the auth service accepts."""
        return self.client_ca_cert

    @classmethod
    def for_dir(cls, data_dir: str | os.PathLike[str]) -> AuthPaths:
        d = Path(data_dir)
        ca = d / "ca"
        tls = d / "tls"
        return cls(
            data_dir=d,
            host_ca_cert=ca / "host-ca.pem",
            host_ca_key=ca / "host-ca-key.pem",
            ssh_ca_key=ca / "ssh-ca-key",
            ssh_ca_pub=ca / "ssh-ca.pub",
            internal_ca_cert=ca / "internal-ca.pem",
            internal_ca_key=ca / "internal-ca-key.pem",
            client_ca_cert=ca / "gateway-client-ca.pem",
            client_ca_key=ca / "gateway-client-ca-key.pem",
            server_cert=tls / "auth-server.pem",
            server_key=tls / "auth-server-key.pem",
            gateway_client_cert=tls / "gateway-client.pem",
            gateway_client_key=tls / "gateway-client-key.pem",
            admin_cert=tls / "admin.pem",
            admin_key=tls / "admin-key.pem",
            registrations_dir=d / "registrations",
            ca_pins=d / "ca-pins.json",
        )


def _ensure_ca(
    cert: Path, key: Path, common_name: str, key_type: KeyType, clock: Clock
) -> CaMaterial:
    if cert.exists() and key.exists():
        return load_ca(cert, key)
    ca = generate_ca(common_name, key_type=key_type, organization="join-gateway", clock=clock)
    write_pem_files(ca, cert.parent, cert.name.removesuffix(".pem"))
    log.info("created %s at %s", common_name, cert)
    return ca


def _ensure_ssh_ca(paths: AuthPaths) -> None:
    if paths.ssh_ca_key.exists() and paths.ssh_ca_pub.exists():
        return
    key = ed25519.Ed25519PrivateKey.generate()
    write_atomic(
        paths.ssh_ca_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_atomic(paths.ssh_ca_pub, pub + b" join-gateway-ssh-host-ca\n", mode=0o644)
    log.info("created SSH host CA at %s", paths.ssh_ca_key)


def ensure_authorities(
    data_dir: str | os.PathLike[str],
    *,
    host_ca_key_type: KeyType = "ecdsa-p256",
    clock: Clock | None = None,
) -> AuthPaths:
    """Create the host CA and the SSH CA under ``data_dir`` if they are missing."""
    paths = AuthPaths.for_dir(data_dir)
    paths.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths.registrations_dir.mkdir(exist_ok=True, mode=0o700)
    _ensure_ca(
        paths.host_ca_cert,
        paths.host_ca_key,
        "join-gateway host CA",
        host_ca_key_type,
        clock or SystemClock(),
    )
    _ensure_ssh_ca(paths)
    return paths


@dataclass(frozen=True)
class CaPins:
    """The pins ``join-gateway status`` prints, and where they come from."""

    backend: str
    ca_pin: str
    ssh_ca_pin: str


def write_ca_pins(paths: AuthPaths, bundle: CaBundle, *, backend: str) -> None:
    doc = {
        "backend": backend,
        "ca_pin": bundle.ca_pin,
        "ssh_ca_pin": bundle.ssh_ca_pin,
        "tls_ca_certs": list(bundle.tls_ca_certs),
        "ssh_ca_keys": list(bundle.ssh_ca_keys),
    }
    write_atomic(paths.ca_pins, json.dumps(doc, indent=2).encode() + b"\n", mode=0o644)


def ca_pins_for_data_dir(data_dir: str | os.PathLike[str]) -> CaPins:
    """The pins of the auth service's signing backend, as it wrote them at its last start
    (``ca-pins.json``); before any start, the local CAs' own. Creates nothing."""
    paths = AuthPaths.for_dir(data_dir)
    if paths.ca_pins.exists():
        doc = json.loads(paths.ca_pins.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError(f"{paths.ca_pins}: not a JSON object")
        return CaPins(
            backend=str(doc["backend"]),
            ca_pin=str(doc["ca_pin"]),
            ssh_ca_pin=str(doc["ssh_ca_pin"]),
        )
    return CaPins(
        backend="local",
        ca_pin=ca_pin_for_data_dir(data_dir),
        ssh_ca_pin=ssh_ca_pin(paths.ssh_ca_pub.read_text(encoding="ascii")),
    )


def ca_pin_for_data_dir(data_dir: str | os.PathLike[str]) -> str:
    """The host CA's pin (``sha256:<hex>`` of its SPKI) from an auth data dir, for
    ``join-gateway status``. Reads only the certificate; creates nothing."""
    paths = AuthPaths.for_dir(data_dir)
    return spki_pin(x509.load_pem_x509_certificate(paths.host_ca_cert.read_bytes()))


def init_auth_dir(
    data_dir: str | os.PathLike[str],
    *,
    gateway_hosts: Iterable[str] = ("127.0.0.1", "localhost"),
    host_ca_key_type: KeyType = "ecdsa-p256",
    clock: Clock | None = None,
) -> AuthPaths:
    """Create (idempotently) everything the auth service and its gateways need.

    ``gateway_hosts`` are the names and IPs by which gateways reach the auth service: they
    become the SANs of its server certificate. Existing files are kept; only missing ones
    are made, so re-running never invalidates certificates already handed out.
    """
    clock = clock or SystemClock()
    paths = ensure_authorities(data_dir, host_ca_key_type=host_ca_key_type, clock=clock)
    internal = _ensure_ca(
        paths.internal_ca_cert,
        paths.internal_ca_key,
        "join-gateway cluster internal CA",
        "ecdsa-p256",
        clock,
    )
    client_ca = _ensure_ca(
        paths.client_ca_cert,
        paths.client_ca_key,
        "join-gateway gateway client CA",
        "ecdsa-p256",
        clock,
    )
    if not (paths.server_cert.exists() and paths.server_key.exists()):
        names = list(gateway_hosts)
        server = issue_cert(
            internal,
            common_name="join-gateway auth service",
            dns_names=[n for n in names if not _is_ip(n)],
            ip_addresses=[n for n in names if _is_ip(n)],
            server=True,
            clock=clock,
        )
        write_pem_files(server, paths.server_cert.parent, "auth-server")
    if not (paths.gateway_client_cert.exists() and paths.gateway_client_key.exists()):
        client = issue_cert(
            client_ca, common_name=GATEWAY_COMMON_NAME, server=False, client=True, clock=clock
        )
        write_pem_files(client, paths.gateway_client_cert.parent, "gateway-client")
    if not (paths.admin_cert.exists() and paths.admin_key.exists()):
        # The admin API's caller (join-gateway nodes): same client CA, its own subject;
        # the auth service tells the two apart by the certificate's CN.
        admin = issue_cert(
            client_ca, common_name=ADMIN_COMMON_NAME, server=False, client=True, clock=clock
        )
        write_pem_files(admin, paths.admin_cert.parent, "admin")
    return paths


class HostAuthority:
    """Signs nodes' certificates with the host CA and the SSH CA (pure, no I/O after load)."""

    def __init__(self, *, host_ca: CaMaterial, ssh_ca: ed25519.Ed25519PrivateKey) -> None:
        self._host_ca = host_ca
        self._ssh_ca = ssh_ca
        self._host_ca_pem = host_ca.cert_pem().decode("ascii")
        self._ssh_ca_line = (
            ssh_ca.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode("ascii")
        )

    @classmethod
    def load(cls, paths: AuthPaths) -> HostAuthority:
        host_ca = load_ca(paths.host_ca_cert, paths.host_ca_key)
        ssh_key = serialization.load_ssh_private_key(paths.ssh_ca_key.read_bytes(), None)
        if not isinstance(ssh_key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{paths.ssh_ca_key}: SSH CA key must be Ed25519")
        return cls(host_ca=host_ca, ssh_ca=ssh_key)

    @property
    def host_ca_cert(self) -> x509.Certificate:
        return self._host_ca.cert

    @property
    def ssh_ca_public_key(self) -> str:
        """The SSH CA's ``ssh-ed25519 AAAA...`` line (for ``@cert-authority`` entries)."""
        return self._ssh_ca_line

    def ca_pin(self) -> str:
        return spki_pin(self._host_ca.cert)

    def issue(
        self,
        *,
        host_id: str,
        host: HostParams,
        now: datetime,
        ttl: timedelta,
        uri_sans: tuple[str, ...] = (),
    ) -> RegisterResult:
        """Certify ``host``'s keys; ``host`` must already be validated (keys parse).
        ``uri_sans``: URI SANs of the X.509 certificate (the node's SPIFFE ID)."""
        issued = self.sign(
            sign_request(host_id=host_id, host=host, now=now, ttl=ttl, uri_sans=uri_sans)
        )
        return register_result(host_id, issued, self.ca_bundle())

    def sign(self, request: SignRequest) -> Issued:
        """The local backend's signing (:class:`~gateway.authservice.signing.LocalSigner`):
        the names are the request's; the key is the node's public key (its CSR, when
        present, was checked by the caller and adds nothing here)."""
        tls_key = load_certifiable_tls_key(request.tls_public_key_pem)
        ssh_key = serialization.load_ssh_public_key(request.ssh_public_key.encode("ascii"))
        if not isinstance(
            ssh_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
        ):
            raise SigningRefused("unsupported SSH key type")
        tls_cert = sign_public_key(
            self._host_ca,
            tls_key,
            common_name=request.host_id,
            organization=request.role,
            dns_names=list(request.dns_names),
            ip_addresses=list(request.ip_addresses),
            uri_names=list(request.uri_sans),
            server=True,
            client=True,
            not_before=request.not_before,
            not_after=request.not_after,
        )
        ssh_cert = (
            serialization.SSHCertificateBuilder()
            .public_key(ssh_key)
            .serial(secrets.randbits(64))
            .type(serialization.SSHCertificateType.HOST)
            .key_id(f"{request.host_id} {request.node_name}".encode())
            .valid_principals([p.encode() for p in request.principals])
            .valid_after(int(request.not_before.timestamp()))
            .valid_before(int(request.not_after.timestamp()))
            .sign(self._ssh_ca)
        )
        return Issued(
            tls_cert_pem=tls_cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            ssh_cert=ssh_cert.public_bytes().decode("ascii"),
        )

    def ca_bundle(self) -> CaBundle:
        return CaBundle(
            tls_ca_certs=(self._host_ca_pem,),
            ssh_ca_keys=(self._ssh_ca_line,),
            ca_pin=self.ca_pin(),
            ssh_ca_pin=ssh_ca_pin(self._ssh_ca_line),
        )

    def __repr__(self) -> str:
        return f"<HostAuthority pin={self.ca_pin()}>"


def sign_request(
    *,
    host_id: str,
    host: HostParams,
    now: datetime,
    ttl: timedelta,
    csr_pem: str | None = None,
    uri_sans: tuple[str, ...] = (),
) -> SignRequest:
    """What a node's certificates say, decided here for every backend: SSH principals are
    the host ID, the node name, additional principals and DNS names; the X.509 SANs are
    those of them an X.509 SAN can carry (IP literals as iPAddress, hostnames as dNSName —
    a principal like ``web_1`` stays SSH-only)."""
    principals = tuple(
        _dedup([host_id, host.node_name, *host.additional_principals, *host.dns_names])
    )
    return SignRequest(
        host_id=host_id,
        role=host.role,
        node_name=host.node_name,
        tls_public_key_pem=host.public_tls_key,
        ssh_public_key=host.public_ssh_key,
        principals=principals,
        dns_names=tuple(p for p in principals if not _is_ip(p) and is_dns_name(p)),
        ip_addresses=tuple(p for p in principals if _is_ip(p)),
        uri_sans=uri_sans,
        not_before=now - _BACKDATE,
        not_after=now + ttl,
        csr_pem=csr_pem,
    )


def _dedup(values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out
