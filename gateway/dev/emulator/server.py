"""The Azure emulator: IMDS, AIA and admin on HTTP; Entra ID and ARM on HTTPS.

``AzureEmulator`` is usable in-process (``async with AzureEmulator() as emu``) by tests,
the demo and the benchmarks, and as its own process through ``gateway/dev/emulator/cli.py``.
It is Azure, not the gateway: it never imports ``gateway.azure`` or ``gateway.join`` and
builds Azure's formats itself, so a bug in the verifier cannot be cancelled out by the same
bug here.

Listeners:

* ``http_url``: ``/vm/<name>/metadata/...`` (IMDS per VM), ``/pkiops/certs/<file>`` (AIA),
  ``/_emulator/...`` (counters, faults, latency, key rotation; never faulted or delayed).
* ``https_url`` (own TLS CA, :attr:`AzureEmulator.tls_ca_pem`): ``/<tid>/...`` (Entra ID
  discovery and keys, v1 and v2.0 paths; ``/common/discovery/keys`` has every tenant's) and
  ``/subscriptions/...`` (ARM Compute reads).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import socket
import ssl
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote, unquote

from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.core.clock import Clock, SystemClock

from .arm import (
    ArmPath,
    TokenBucket,
    arm_error,
    arm_name_key,
    parse_arm_path,
    vm_json,
    vmss_vm_json,
)
from .attested import AttestedSigner, attested_content
from .entra import (
    EntraTenant,
    InvalidToken,
    ec_jwk,
    generate_ec_jwk_key,
    verify_emulated_token,
)
from .imds import ImdsError, check_attested_request, check_token_request
from .model import (
    SERVICES,
    ArmLimits,
    EmulatedVm,
    Fault,
    IdentityKind,
    Latency,
    ManagedIdentity,
    Service,
)
from .pki import (
    INTERMEDIATE_CN,
    ROOT_CN,
    AttestationCas,
    AttestationPki,
    TlsPki,
    aia_file_name,
    generate_attestation_cas,
    generate_attestation_pki,
    generate_tls_pki,
)

__all__ = ["AzureEmulator"]

log = logging.getLogger(__name__)

# Per metadata domain: (v1 issuer template, ARM audience). Kept here rather than imported
# from gateway.core.cloud so the emulator states Azure's facts independently of the product.
_CLOUD_FACTS: dict[str, tuple[str, str]] = {
    "metadata.azure.com": ("https://sts.windows.net/{tid}/", "https://management.azure.com/"),
    "metadata.azure.us": (
        "https://sts.windows.net/{tid}/",
        "https://management.usgovcloudapi.net/",
    ),
    "metadata.azure.cn": (
        "https://sts.chinacloudapi.cn/{tid}/",
        "https://management.chinacloudapi.cn/",
    ),
}

_JSON = "application/json; charset=utf-8"


def _json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=body, status=status, headers=headers, content_type="application/json", charset="utf-8"
    )


class AzureEmulator:
    """An emulated Azure: IMDS per VM, AIA, Entra ID per tenant, ARM.

    Parameters:
        host: listen address (loopback).
        http_port, https_port: 0 picks free ports.
        latency: added delay per service (default :class:`Latency` ()).
        page_size: ARM list page size (``nextLink`` paging).
        cloud_domain: the attested leaf's CN (``metadata.azure.com|.us|.cn``); also picks
            the cloud's issuer and ARM audience.
        clock: time for documents, tokens and rate limits (default the system clock).
        arm_limits: ARM throttling (default Azure's).
        region: the leaf's first SAN is ``<region>.<cloud_domain>``.
        ca_key_size: RSA size of the attestation root and intermediate.
        state_dir: keep the attestation root and intermediate and the TLS material here and
            reuse them on the next start (so pinned trust survives restarts). Default: in
            memory only.
        signing_threads: sign IMDS documents and tokens on this many threads (OpenSSL
            releases the GIL while signing, so a separate emulator process uses more than
            one core). 0 signs inline on the event loop.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        https_port: int = 0,
        latency: Latency | None = None,
        page_size: int = 50,
        cloud_domain: str = "metadata.azure.com",
        clock: Clock | None = None,
        arm_limits: ArmLimits | None = None,
        region: str = "westeurope",
        ca_key_size: int = 2048,
        state_dir: Path | None = None,
        signing_threads: int = 0,
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        if cloud_domain not in _CLOUD_FACTS:
            raise ValueError(f"cloud_domain must be one of {sorted(_CLOUD_FACTS)}")
        self._host = host
        self._ports = (http_port, https_port)
        self._latency = latency or Latency()
        self._page_size = page_size
        self._domain = cloud_domain
        self._issuer_template, self._arm_audience = _CLOUD_FACTS[cloud_domain]
        self._clock: Clock = clock or SystemClock()
        self._limits = arm_limits or ArmLimits()
        self._region = region
        self._ca_key_size = ca_key_size
        self._state_dir = state_dir
        if signing_threads < 0:
            raise ValueError("signing_threads must be >= 0")
        self._signing_threads = signing_threads
        self._executor: ThreadPoolExecutor | None = None

        self._counters: Counter[str] = Counter()
        self._faults: dict[Service, Fault] = {}
        self._tenants: dict[str, EntraTenant] = {}
        self._ec_key = generate_ec_jwk_key()
        self._ec_jwk = ec_jwk(self._ec_key)
        self._vms: dict[str, EmulatedVm] = {}
        self._vm_identity: dict[str, ManagedIdentity] = {}
        self._vm_text: dict[str, str] = {}
        self._identities: dict[str, ManagedIdentity] = {}  # by client_id
        self._rg_vms: dict[tuple[str, str], list[EmulatedVm]] = {}
        self._scale_sets: dict[tuple[str, str, str], list[EmulatedVm]] = {}
        self._grants: dict[str, set[str]] = {}
        self._read_buckets: dict[tuple[str, str], TokenBucket] = {}
        self._list_buckets: dict[str, TokenBucket] = {}
        self._time_created = ""

        self._pki: AttestationPki | None = None
        self._tls: TlsPki | None = None
        self._signer: AttestedSigner | None = None
        self._runners: list[web.AppRunner] = []
        self._closing = asyncio.Event()
        self.http_url = ""
        self.https_url = ""

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> AzureEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind both listeners, then generate the PKIs (the AIA URL needs the port)."""
        if self._runners:
            raise RuntimeError("emulator already started")
        http_sock = self._bind(self._ports[0])
        https_sock = self._bind(self._ports[1])
        http_port = http_sock.getsockname()[1]
        https_port = https_sock.getsockname()[1]
        self.http_url = f"http://{self._host}:{http_port}"
        self.https_url = f"https://{self._host}:{https_port}"
        now = self._clock.now()
        self._time_created = now.strftime("%Y-%m-%dT%H:%M:%S.0000000+00:00")
        pki, tls = await asyncio.to_thread(self._generate, now)
        self._pki, self._tls = pki, tls
        self._signer = AttestedSigner(pki.leaf_key, pki.leaf_cert)
        if self._signing_threads:
            self._executor = ThreadPoolExecutor(
                self._signing_threads, thread_name_prefix="emulator-sign"
            )

        http_app = web.Application()
        http_app.router.add_get("/vm/{vm}/metadata/attested/document", self._imds_attested)
        http_app.router.add_get("/vm/{vm}/metadata/identity/oauth2/token", self._imds_token)
        http_app.router.add_get("/pkiops/certs/{file}", self._aia)
        http_app.router.add_get("/_emulator/counters", self._admin_counters)
        http_app.router.add_delete("/_emulator/counters", self._admin_counters_reset)
        http_app.router.add_get("/_emulator/faults", self._admin_faults)
        http_app.router.add_post("/_emulator/faults", self._admin_faults_set)
        http_app.router.add_delete("/_emulator/faults", self._admin_faults_clear)
        http_app.router.add_post("/_emulator/latency", self._admin_latency)
        http_app.router.add_post("/_emulator/tenants/{tid}/rotate", self._admin_rotate)
        http_app.router.add_post("/_emulator/tenants/{tid}/retire", self._admin_retire)

        https_app = web.Application()
        https_app.router.add_get("/{tid}/.well-known/openid-configuration", self._entra_discovery)
        https_app.router.add_get(
            "/{tid}/v2.0/.well-known/openid-configuration", self._entra_discovery
        )
        https_app.router.add_get("/{tid}/discovery/keys", self._entra_keys)
        https_app.router.add_get("/{tid}/discovery/v2.0/keys", self._entra_keys)
        https_app.router.add_route("*", "/{tail:.*}", self._arm)

        ssl_ctx = self._server_ssl_context(tls)
        try:
            for app, sock, ctx in ((http_app, http_sock, None), (https_app, https_sock, ssl_ctx)):
                runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
                await runner.setup()
                self._runners.append(runner)
                await web.SockSite(runner, sock, ssl_context=ctx).start()
        except BaseException:
            await self.aclose()
            raise
        log.info("azure emulator listening on %s and %s", self.http_url, self.https_url)

    async def aclose(self) -> None:
        """Release hung handlers, stop the sites, close the sockets."""
        self._closing.set()
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, port))
        sock.setblocking(False)
        return sock

    def _generate(self, now: datetime) -> tuple[AttestationPki, TlsPki]:
        cas = AttestationCas.load(self._state_dir) if self._state_dir else None
        if cas is None:
            cas = generate_attestation_cas(now=now, ca_key_size=self._ca_key_size)
            if self._state_dir:
                cas.save(self._state_dir)
        pki = generate_attestation_pki(
            now=now,
            aia_prefix=self.aia_prefix,
            domain=self._domain,
            region=self._region,
            cas=cas,
        )
        tls = TlsPki.load(self._state_dir) if self._state_dir else None
        if tls is None:
            hosts = (self._host, "localhost") if self._host != "localhost" else ("localhost",)
            tls = generate_tls_pki(now=now, hosts=hosts)
            if self._state_dir:
                tls.save(self._state_dir)
        return pki, tls

    @staticmethod
    def _server_ssl_context(tls: TlsPki) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # load_cert_chain wants files; the key never outlives this block on disk.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert.write_bytes(tls.cert_pem)
            key.write_bytes(tls.key_pem)
            key.chmod(0o600)
            ctx.load_cert_chain(cert, key)
        return ctx

    # ---------------------------------------------------------------- public attributes

    @property
    def aia_prefix(self) -> str:
        return self.http_url + "/pkiops/certs/"

    @property
    def arm_audience(self) -> str:
        return self._arm_audience

    @property
    def cloud_domain(self) -> str:
        return self._domain

    def _require_started(self) -> tuple[AttestationPki, TlsPki, AttestedSigner]:
        if self._pki is None or self._tls is None or self._signer is None:
            raise RuntimeError("emulator not started")
        return self._pki, self._tls, self._signer

    @property
    def attestation_pki(self) -> AttestationPki:
        return self._require_started()[0]

    @property
    def tls_ca_pem(self) -> bytes:
        return self._require_started()[1].ca_pem

    @property
    def attestation_root_pem(self) -> bytes:
        return self._require_started()[0].root_pem

    @property
    def intermediate_pem(self) -> bytes:
        return self._require_started()[0].intermediate_pem

    @property
    def tenants(self) -> tuple[str, ...]:
        return tuple(self._tenants)

    @property
    def vms(self) -> tuple[EmulatedVm, ...]:
        return tuple(self._vms.values())

    @property
    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def reset_counters(self) -> None:
        self._counters.clear()

    def issuer_for(self, tid: str) -> str:
        return self._issuer_template.format(tid=tid)

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context trusting the HTTPS listener (for tests and the demo)."""
        return ssl.create_default_context(cadata=self.tls_ca_pem.decode("ascii"))

    def __repr__(self) -> str:
        return (
            f"AzureEmulator(http={self.http_url!r}, https={self.https_url!r}, "
            f"tenants={len(self._tenants)}, vms={len(self._vms)}, faults={sorted(self._faults)})"
        )

    # ---------------------------------------------------------------- world building

    def add_tenant(self, tid: str | None = None) -> str:
        tid = str(uuid.UUID(tid)) if tid else str(uuid.uuid4())
        if tid not in self._tenants:
            self._tenants[tid] = EntraTenant(
                tid, issuer=self.issuer_for(tid), now=self._clock.now()
            )
        return tid

    def _tenant(self, tid: str) -> EntraTenant:
        try:
            return self._tenants[tid]
        except KeyError:
            raise ValueError(f"unknown tenant {tid!r}; add_tenant() first") from None

    def rotate_signing_key(self, tid: str) -> str:
        """A new key signs from now on and is published; old keys stay published.

        Returns the new key's kid."""
        return self._tenant(tid).rotate(self._clock.now()).kid

    def retire_old_keys(self, tid: str) -> None:
        """Unpublish every key of the tenant but the current signer."""
        self._tenant(tid).retire_old_keys()

    def signing_kids(self, tid: str) -> tuple[str, ...]:
        """Published kids, current signer first."""
        return tuple(k.kid for k in self._tenant(tid).published)

    def _identity(
        self,
        *,
        kind: IdentityKind,
        tenant: str,
        subscription: str,
        resource_group: str,
        client_id: str | None,
        compute_rid: str,
        default_name: str,
    ) -> ManagedIdentity:
        if kind == "system":
            return ManagedIdentity(
                kind="system",
                tenant=tenant,
                client_id=str(uuid.uuid4()),
                principal_oid=str(uuid.uuid4()),
                resource_id=compute_rid,
                subscription=subscription,
                resource_group=resource_group,
            )
        if client_id is not None:
            client_id = str(uuid.UUID(client_id))
            known = self._identities.get(client_id)
            if known is not None:
                if known.tenant != tenant:
                    raise ValueError(f"client_id {client_id} belongs to tenant {known.tenant}")
                return known
        identity = ManagedIdentity(
            kind="user",
            tenant=tenant,
            client_id=client_id or str(uuid.uuid4()),
            principal_oid=str(uuid.uuid4()),
            resource_id=(
                f"/subscriptions/{subscription}/resourcegroups/{resource_group}/providers/"
                f"Microsoft.ManagedIdentity/userAssignedIdentities/{default_name}"
            ),
            subscription=subscription,
            resource_group=resource_group,
        )
        self._identities[identity.client_id] = identity
        return identity

    def _register(self, vm: EmulatedVm, identity: ManagedIdentity) -> None:
        self._vms[vm.name] = vm
        self._vm_identity[vm.name] = identity
        if vm.scale_set is None:
            self._vm_text[vm.name] = vm_json(vm, identity, time_created=self._time_created)
        else:
            self._vm_text[vm.name] = vmss_vm_json(vm, time_created=self._time_created)
        # Default role assignment: a VM's identity may read the VMs of its resource group.
        self.grant_read(
            vm.principal_oid, f"/subscriptions/{vm.subscription}/resourceGroups/{vm.resource_group}"
        )

    def add_vm(
        self,
        *,
        subscription: str,
        resource_group: str,
        name: str,
        tenant: str,
        identity: IdentityKind,
        client_id: str | None = None,
        location: str = "westeurope",
        identity_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        flexible_scale_set: str | None = None,
    ) -> EmulatedVm:
        """A standalone VM. ``identity="user"`` with a known ``client_id`` shares that
        user-assigned identity (as operators attach one identity to many VMs).
        ``flexible_scale_set`` makes it a member of that flexible-orchestration set."""
        self._require_started()
        self._check_new_name(name)
        tenant = self._tenant(tenant).tid
        subscription = str(uuid.UUID(subscription))
        sub_key = arm_name_key(subscription)
        rid = (
            f"/subscriptions/{subscription}/resourceGroups/{resource_group}"
            f"/providers/Microsoft.Compute/virtualMachines/{name}"
        )
        mi = self._identity(
            kind=identity,
            tenant=tenant,
            subscription=subscription,
            resource_group=resource_group,
            client_id=client_id,
            compute_rid=rid.replace("/resourceGroups/", "/resourcegroups/", 1),
            default_name=identity_name or f"id-{name}",
        )
        vm = EmulatedVm(
            name=name,
            vm_id=str(uuid.uuid4()),
            resource_id=rid,
            subscription=subscription,
            resource_group=resource_group,
            tenant=tenant,
            identity=identity,
            client_id=mi.client_id if identity == "user" else None,
            principal_oid=mi.principal_oid,
            scale_set=None,
            instance_id=None,
            imds_url=f"{self.http_url}/vm/{quote(name, safe='')}",
            location=location,
            tags=dict(tags or {}),
            flexible_scale_set=flexible_scale_set,
        )
        self._rg_vms.setdefault((sub_key, arm_name_key(resource_group)), []).append(vm)
        self._register(vm, mi)
        return vm

    def add_scale_set(
        self,
        *,
        subscription: str,
        resource_group: str,
        name: str,
        tenant: str,
        capacity: int,
        identity: IdentityKind,
        client_id: str | None = None,
        location: str = "westeurope",
        identity_name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[EmulatedVm]:
        """A uniform scale set of ``capacity`` instances sharing the scale set's identity.
        Instance ``i`` is named ``<name>_<i>`` (its IMDS path) and has instanceId ``i``."""
        self._require_started()
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        tenant = self._tenant(tenant).tid
        subscription = str(uuid.UUID(subscription))
        sub_key = arm_name_key(subscription)
        key = (sub_key, arm_name_key(resource_group), arm_name_key(name))
        if key in self._scale_sets:
            raise ValueError(f"scale set {name!r} already exists in {resource_group!r}")
        names = [f"{name}_{i}" for i in range(capacity)]
        for n in names:
            self._check_new_name(n)
        ss_rid = (
            f"/subscriptions/{subscription}/resourceGroups/{resource_group}"
            f"/providers/Microsoft.Compute/virtualMachineScaleSets/{name}"
        )
        mi = self._identity(
            kind=identity,
            tenant=tenant,
            subscription=subscription,
            resource_group=resource_group,
            client_id=client_id,
            compute_rid=ss_rid.replace("/resourceGroups/", "/resourcegroups/", 1),
            default_name=identity_name or f"id-{name}",
        )
        out: list[EmulatedVm] = []
        for i, vm_name in enumerate(names):
            vm = EmulatedVm(
                name=vm_name,
                vm_id=str(uuid.uuid4()),
                resource_id=f"{ss_rid}/virtualMachines/{i}",
                subscription=subscription,
                resource_group=resource_group,
                tenant=tenant,
                identity=identity,
                client_id=mi.client_id if identity == "user" else None,
                principal_oid=mi.principal_oid,
                scale_set=name,
                instance_id=str(i),
                imds_url=f"{self.http_url}/vm/{quote(vm_name, safe='')}",
                location=location,
                tags=dict(tags or {}),
            )
            self._register(vm, mi)
            out.append(vm)
        self._scale_sets[key] = out
        self._rg_vms.setdefault((sub_key, arm_name_key(resource_group)), [])
        return out

    def add_flexible_scale_set(
        self,
        *,
        subscription: str,
        resource_group: str,
        name: str,
        tenant: str,
        capacity: int,
        identity: IdentityKind,
        client_id: str | None = None,
        location: str = "westeurope",
        tags: Mapping[str, str] | None = None,
    ) -> list[EmulatedVm]:
        """A flexible-orchestration scale set: ``capacity`` ordinary VMs named
        ``<name>_<8 hex>`` (as Azure names them), each naming the set in
        ``properties.virtualMachineScaleSet``. Their tokens look like standalone VMs':
        a system-assigned identity is each VM's own (``xms_mirid`` = the VM); a
        user-assigned one is shared (``xms_az_rid`` = the VM) — only Resource Manager
        tells that they belong to a set."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        out: list[EmulatedVm] = []
        for _ in range(capacity):
            vm = self.add_vm(
                subscription=subscription,
                resource_group=resource_group,
                name=f"{name}_{uuid.uuid4().hex[:8]}",
                tenant=tenant,
                identity=identity,
                client_id=client_id,
                location=location,
                identity_name=f"id-{name}",
                tags=tags,
                flexible_scale_set=name,
            )
            if identity == "user" and client_id is None:
                client_id = vm.client_id  # the set's one user-assigned identity
            out.append(vm)
        return out

    def set_tags(self, name: str, tags: Mapping[str, str]) -> EmulatedVm:
        """Replace a VM's tags (``az tag update --operation replace``): Resource Manager
        answers with the new ones from now on, in reads and listings."""
        old = self._vms[name]
        vm = replace(old, tags=dict(tags))
        group = self._rg_vms[(arm_name_key(old.subscription), arm_name_key(old.resource_group))]
        group[group.index(old)] = vm
        self._register(vm, self._vm_identity[name])
        return vm

    def _check_new_name(self, name: str) -> None:
        if not name or "/" in name:
            raise ValueError(f"invalid VM name {name!r}")
        if name in self._vms:
            raise ValueError(f"VM name {name!r} already used (IMDS URLs are keyed by name)")

    def grant_read(self, principal_oid: str, scope: str) -> None:
        """Role assignment: ``principal_oid`` may read VMs under ``scope`` (a subscription,
        resource group or resource ID; compared case-insensitively)."""
        self._grants.setdefault(principal_oid, set()).add(arm_name_key(scope.rstrip("/")))

    def revoke_read(self, principal_oid: str, scope: str | None = None) -> None:
        """Remove one role assignment, or every one of the principal when ``scope`` is None."""
        if scope is None:
            self._grants.pop(principal_oid, None)
        else:
            self._grants.get(principal_oid, set()).discard(arm_name_key(scope.rstrip("/")))

    def _may_read(self, oid: str, path: ArmPath) -> bool:
        target = arm_name_key(path.scope)
        return any(target == s or target.startswith(s + "/") for s in self._grants.get(oid, ()))

    # ---------------------------------------------------------------- knobs

    def set_fault(
        self,
        service: Service,
        *,
        status: int | None = None,
        hang: bool = False,
        drop: bool = False,
        times: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Make ``service`` fail: answer ``status``, ``hang`` or ``drop`` the connection,
        for the next ``times`` requests (None = until :meth:`clear_fault`)."""
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; one of {SERVICES}")
        self._faults[service] = Fault(
            status=status, hang=hang, drop=drop, remaining=times, retry_after=retry_after
        )

    def clear_fault(self, service: Service | None = None) -> None:
        if service is None:
            self._faults.clear()
        else:
            self._faults.pop(service, None)

    @property
    def faults(self) -> dict[Service, Fault]:
        return dict(self._faults)

    @property
    def latency(self) -> Latency:
        return self._latency

    def set_latency(
        self,
        latency: Latency | None = None,
        *,
        arm: float | None = None,
        entra: float | None = None,
        aia: float | None = None,
        imds: float | None = None,
    ) -> None:
        """Replace the whole setting, or the given services' delays (seconds)."""
        base = latency or self._latency
        changes = {
            k: v
            for k, v in {"arm": arm, "entra": entra, "aia": aia, "imds": imds}.items()
            if v is not None
        }
        if any(v < 0 for v in changes.values()):
            raise ValueError("latency must be >= 0")
        self._latency = replace(base, **changes)

    # ---------------------------------------------------------------- direct minting

    def _vm(self, vm: EmulatedVm | str) -> EmulatedVm:
        name = vm if isinstance(vm, str) else vm.name
        try:
            return self._vms[name]
        except KeyError:
            raise ValueError(f"unknown VM {name!r}") from None

    def attested_document_for(
        self, vm: EmulatedVm | str, nonce: str | None = None
    ) -> dict[str, str]:
        """What IMDS answers ``/metadata/attested/document?nonce=`` (same code path)."""
        return json.loads(self._attested_body(self._vm(vm), nonce))  # type: ignore[no-any-return]

    def attested_der_for(self, vm: EmulatedVm | str, nonce: str | None = None) -> bytes:
        return base64.b64decode(self.attested_document_for(vm, nonce)["signature"])

    def _attested_body(self, vm: EmulatedVm, nonce: str | None) -> bytes:
        signer = self._require_started()[2]
        content = attested_content(
            vm_id=vm.vm_id,
            subscription_id=vm.subscription,
            created_on=self._clock.now(),
            nonce=nonce,
        )
        return signer.response(content)

    def token_response_for(
        self,
        vm: EmulatedVm | str,
        resource: str | None = None,
        *,
        client_id: str | None = None,
        object_id: str | None = None,
        msi_res_id: str | None = None,
    ) -> dict[str, str]:
        """What IMDS answers ``/metadata/identity/oauth2/token`` (same code path).

        Raises :class:`~gateway.dev.emulator.imds.ImdsError` when the identity does not match.
        """
        the_vm = self._vm(vm)
        mi = self._vm_identity[the_vm.name]
        if client_id is not None and client_id.lower() != mi.client_id:
            raise ImdsError(
                400, {"error": "invalid_request", "error_description": "Identity not found"}
            )
        if object_id is not None and object_id.lower() != mi.principal_oid:
            raise ImdsError(
                400, {"error": "invalid_request", "error_description": "Identity not found"}
            )
        if msi_res_id is not None and arm_name_key(msi_res_id) != arm_name_key(mi.resource_id):
            raise ImdsError(
                400, {"error": "invalid_request", "error_description": "Identity not found"}
            )
        resource = resource or self._arm_audience
        now = self._clock.time()
        if mi.kind == "user":
            mirid, az_rid = mi.resource_id, the_vm.compute_resource_id
        else:
            mirid, az_rid = mi.resource_id, None
        jwt, iat, exp = self._tenants[mi.tenant].mint(
            now=now,
            audience=resource,
            oid=mi.principal_oid,
            appid=mi.client_id,
            xms_mirid=mirid,
            xms_az_rid=az_rid,
        )
        return {
            "access_token": jwt,
            "client_id": mi.client_id,
            "expires_in": str(exp - iat),
            "expires_on": str(exp),
            "ext_expires_in": str(exp - iat),
            "not_before": str(iat),
            "resource": resource,
            "token_type": "Bearer",
        }

    def token_for(self, vm: EmulatedVm | str, resource: str | None = None) -> str:
        """A managed-identity access token for ``vm`` (the JWT only)."""
        return self.token_response_for(vm, resource)["access_token"]

    def info(self) -> dict[str, Any]:
        """Everything a separate process needs to use this emulator (``--info-out``)."""
        pki, tls, _ = self._require_started()
        return {
            "http_url": self.http_url,
            "https_url": self.https_url,
            "aia_prefix": self.aia_prefix,
            "cloud_domain": self._domain,
            "arm_audience": self._arm_audience,
            "tls_ca_pem": tls.ca_pem.decode("ascii"),
            "attestation_root_pem": pki.root_pem.decode("ascii"),
            "intermediate_pem": pki.intermediate_pem.decode("ascii"),
            "tenants": list(self._tenants),
            "vms": [asdict(vm) for vm in self._vms.values()],
        }

    # ---------------------------------------------------------------- request plumbing

    async def _gate(self, service: Service, request: web.Request) -> web.StreamResponse | None:
        """Latency, then the service's fault switch. A response means: send this instead."""
        delay = self._latency.for_service(service)
        if delay > 0:
            await asyncio.sleep(delay)
        fault = self._faults.get(service)
        if fault is None:
            return None
        if fault.remaining is not None:
            if fault.remaining <= 1:
                self._faults.pop(service, None)
            else:
                self._faults[service] = replace(fault, remaining=fault.remaining - 1)
        self._counters[f"{service}.fault"] += 1
        if fault.hang:
            # Hold the request until the client gives up or the emulator closes.
            await self._closing.wait()
            fault = Fault(drop=True)
        if fault.drop:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)  # never written: the connection is gone
        status = fault.status or 500
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
        if service == "arm":
            code = {429: "TooManyRequests", 503: "ServiceUnavailable"}.get(
                status, "InternalServerError" if status >= 500 else "BadRequest"
            )
            body = arm_error(code, f"Emulated fault {status}.")
        elif service == "imds":
            body = json.dumps({"error": f"Emulated fault {status}"}).encode()
        elif service == "entra":
            body = json.dumps(
                {
                    "error": "temporarily_unavailable",
                    "error_description": f"Emulated fault {status}",
                }
            ).encode()
        else:
            return web.Response(status=status, text=f"Emulated fault {status}", headers=headers)
        return _json_response(body, status, headers)

    # ---------------------------------------------------------------- IMDS

    async def _imds_attested(self, request: web.Request) -> web.StreamResponse:
        self._counters["imds.attested"] += 1
        faulted = await self._gate("imds", request)
        if faulted is not None:
            return faulted
        vm = self._vms.get(request.match_info["vm"])
        if vm is None:
            return web.Response(status=404, text="no such emulated VM")
        try:
            nonce = check_attested_request(request.headers, request.query)
        except ImdsError as exc:
            self._counters["imds.400"] += 1
            return _json_response(exc.body, exc.status)
        if self._executor is None:
            return _json_response(self._attested_body(vm, nonce))
        loop = asyncio.get_running_loop()
        return _json_response(
            await loop.run_in_executor(self._executor, self._attested_body, vm, nonce)
        )

    async def _imds_token(self, request: web.Request) -> web.StreamResponse:
        self._counters["imds.token"] += 1
        faulted = await self._gate("imds", request)
        if faulted is not None:
            return faulted
        vm = self._vms.get(request.match_info["vm"])
        if vm is None:
            return web.Response(status=404, text="no such emulated VM")
        q = request.query
        try:
            resource = check_token_request(request.headers, q)
            mint = functools.partial(
                self.token_response_for,
                vm,
                resource,
                client_id=q.get("client_id"),
                object_id=q.get("object_id"),
                msi_res_id=q.get("msi_res_id") or q.get("mi_res_id"),
            )
            if self._executor is None:
                body = mint()
            else:
                body = await asyncio.get_running_loop().run_in_executor(self._executor, mint)
        except ImdsError as exc:
            self._counters["imds.400"] += 1
            return _json_response(exc.body, exc.status)
        return _json_response(json.dumps(body, separators=(",", ":")).encode())

    # ---------------------------------------------------------------- AIA

    async def _aia(self, request: web.Request) -> web.StreamResponse:
        self._counters["aia"] += 1
        faulted = await self._gate("aia", request)
        if faulted is not None:
            return faulted
        pki = self._require_started()[0]
        file = request.match_info["file"]
        served = {
            unquote(aia_file_name(INTERMEDIATE_CN)): pki.intermediate_cert,
            unquote(aia_file_name(ROOT_CN)): pki.root_cert,
        }
        cert = served.get(unquote(file))
        if cert is None:
            return web.Response(
                status=404, text="The resource you are looking for has been removed."
            )
        return web.Response(
            body=cert.public_bytes(Encoding.DER), content_type="application/pkix-cert"
        )

    # ---------------------------------------------------------------- Entra ID

    async def _entra_discovery(self, request: web.Request) -> web.StreamResponse:
        self._counters["entra.discovery"] += 1
        faulted = await self._gate("entra", request)
        if faulted is not None:
            return faulted
        tenant = self._tenants.get(request.match_info["tid"].lower())
        if tenant is None:
            return self._entra_unknown_tenant(request.match_info["tid"])
        v2 = "/v2.0/" in request.path
        doc = tenant.openid_configuration(self.https_url, v2=v2)
        return _json_response(json.dumps(doc).encode())

    async def _entra_keys(self, request: web.Request) -> web.StreamResponse:
        self._counters["entra.jwks"] += 1
        faulted = await self._gate("entra", request)
        if faulted is not None:
            return faulted
        tid = request.match_info["tid"].lower()
        tenants: Iterable[EntraTenant]
        if tid == "common":
            tenants = self._tenants.values()
        elif tid in self._tenants:
            tenants = (self._tenants[tid],)
        else:
            return self._entra_unknown_tenant(tid)
        keys = [k.jwk for t in tenants for k in t.published]
        keys.append(self._ec_jwk)
        return _json_response(json.dumps({"keys": keys}).encode())

    @staticmethod
    def _entra_unknown_tenant(tid: str) -> web.Response:
        body = {
            "error": "invalid_tenant",
            "error_description": f"AADSTS90002: Tenant '{tid}' not found. Check to make sure you "
            "have the correct tenant ID and are signing into the correct cloud.",
            "error_codes": [90002],
        }
        return _json_response(json.dumps(body).encode(), 400)

    # ---------------------------------------------------------------- ARM

    def _arm_headers(self, sub: str | None, oid: str | None) -> dict[str, str]:
        now = self._clock.monotonic()
        reads = self._limits.read_burst
        if sub is not None and oid is not None:
            bucket = self._read_buckets.get((sub, oid))
            if bucket is not None:
                reads = bucket.remaining(now)
        lists = self._limits.list_per_minute
        if sub is not None and sub in self._list_buckets:
            lists = self._list_buckets[sub].remaining(now)
        return {
            "x-ms-ratelimit-remaining-subscription-reads": str(reads),
            "x-ms-ratelimit-remaining-resource": f"{self._limits.list_policy};{lists}",
            "x-ms-request-id": str(uuid.uuid4()),
        }

    async def _arm(self, request: web.Request) -> web.StreamResponse:
        path = parse_arm_path(request.path)
        self._counters[f"arm.{path.kind if path else 'unknown'}"] += 1
        faulted = await self._gate("arm", request)
        if faulted is not None:
            return faulted
        sub = arm_name_key(path.subscription) if path else None
        if path is None or request.method != "GET":
            headers = self._arm_headers(None, None)
            if path is not None:
                return _json_response(
                    arm_error("MethodNotAllowed", "The emulator serves reads only."), 405, headers
                )
            return _json_response(
                arm_error(
                    "InvalidResourceType",
                    f"The resource type could not be found for '{request.path}'.",
                ),
                404,
                headers,
            )
        if not request.query.get("api-version"):
            return _json_response(
                arm_error(
                    "MissingApiVersionParameter",
                    "The api-version query parameter (?api-version=) is required for all requests.",
                ),
                400,
                self._arm_headers(sub, None),
            )
        # Authentication: a bearer token from our own Entra ID, for ARM, unexpired.
        auth = request.headers.get("Authorization", "")
        scheme, _, jwt = auth.partition(" ")
        try:
            if not auth:
                raise InvalidToken(
                    "AuthenticationFailed",
                    "Authentication failed. The 'Authorization' header is missing.",
                )
            if scheme.lower() != "bearer" or not jwt.strip():
                raise InvalidToken(
                    "AuthenticationFailedInvalidHeader",
                    "Authentication failed. The 'Authorization' header is provided in an "
                    "invalid format.",
                )
            claims = verify_emulated_token(
                jwt.strip(),
                tenants=self._tenants,
                audiences=(self._arm_audience, self._arm_audience.rstrip("/")),
                now=self._clock.time(),
            )
        except InvalidToken as exc:
            self._counters["arm.401"] += 1
            headers = self._arm_headers(sub, None)
            headers["WWW-Authenticate"] = (
                'Bearer authorization_uri="https://login.windows.net/", error="invalid_token", '
                f'error_description="{exc.message}"'
            )
            return _json_response(arm_error(exc.code, exc.message), 401, headers)
        oid = str(claims.get("oid", ""))
        assert sub is not None
        now = self._clock.monotonic()
        bucket = self._read_buckets.get((sub, oid))
        if bucket is None:
            bucket = self._read_buckets[(sub, oid)] = TokenBucket(
                self._limits.read_burst, self._limits.read_per_second, now
            )
        wait = bucket.take(now)
        if wait is not None:
            self._counters["arm.429"] += 1
            headers = self._arm_headers(sub, oid)
            headers["Retry-After"] = str(wait)
            msg = (
                f"Number of 'read' requests for subscription '{path.subscription}' actor '{oid}' "
                f"exceeded. Please try again after '{wait}' seconds after the additional tokens "
                "are available. Refer to https://aka.ms/arm-throttling"
            )
            return _json_response(arm_error("SubscriptionRequestsThrottled", msg), 429, headers)
        if not self._may_read(oid, path):
            self._counters["arm.403"] += 1
            msg = (
                f"The client '{oid}' with object id '{oid}' does not have authorization to perform "
                f"action 'Microsoft.Compute/virtualMachines/read' over scope '{path.scope}' or the "
                "scope is invalid. If access was recently granted, please refresh your credentials."
            )
            return _json_response(
                arm_error("AuthorizationFailed", msg), 403, self._arm_headers(sub, oid)
            )
        if path.kind in ("list_vms", "list_vmss_vms"):
            lb = self._list_buckets.get(sub)
            if lb is None:
                per_min = self._limits.list_per_minute
                lb = self._list_buckets[sub] = TokenBucket(per_min, per_min / 60.0, now)
            wait = lb.take(now)
            if wait is not None:
                self._counters["arm.429"] += 1
                headers = self._arm_headers(sub, oid)
                headers["Retry-After"] = str(wait)
                policy = self._limits.list_policy.rsplit("/", 1)[-1]
                detail = json.dumps(
                    {"operationGroup": policy, "allowedRequestCount": self._limits.list_per_minute}
                )
                body = arm_error(
                    "OperationNotAllowed",
                    "The server rejected the request because too many requests have been "
                    "received for this subscription.",
                    [{"code": "TooManyRequests", "target": policy, "message": detail}],
                )
                return _json_response(body, 429, headers)
        status, body = self._arm_lookup(path, request)
        if status == 404:
            self._counters["arm.404"] += 1
        return _json_response(body, status, self._arm_headers(sub, oid))

    def _arm_lookup(self, path: ArmPath, request: web.Request) -> tuple[int, bytes]:
        sub, rg = arm_name_key(path.subscription), arm_name_key(path.resource_group)
        if (sub, rg) not in self._rg_vms:
            known_sub = any(s == sub for s, _ in self._rg_vms)
            if not known_sub:
                return 404, arm_error(
                    "SubscriptionNotFound",
                    f"The subscription '{path.subscription}' could not be found.",
                )
            return 404, arm_error(
                "ResourceGroupNotFound",
                f"Resource group '{path.resource_group}' could not be found.",
            )
        if path.kind == "get_vm":
            assert path.name is not None
            vm = self._vms.get(path.name)
            if (
                vm is None
                or vm.scale_set is not None
                or (arm_name_key(vm.subscription), arm_name_key(vm.resource_group)) != (sub, rg)
            ):
                # ARM names are case-insensitive: fall back to a scan of the group
                vm = next(
                    (
                        v
                        for v in self._rg_vms[(sub, rg)]
                        if arm_name_key(v.name) == arm_name_key(path.name)
                    ),
                    None,
                )
            if vm is None:
                return 404, self._not_found("virtualMachines", path.name, path.resource_group)
            return 200, self._vm_text[vm.name].encode()
        if path.kind == "list_vms":
            return 200, self._page(self._rg_vms[(sub, rg)], request)
        assert path.scale_set is not None
        instances = self._scale_sets.get((sub, rg, arm_name_key(path.scale_set)))
        if instances is None:
            return 404, self._not_found(
                "virtualMachineScaleSets", path.scale_set, path.resource_group
            )
        if path.kind == "list_vmss_vms":
            return 200, self._page(instances, request)
        vm = next((v for v in instances if v.instance_id == path.instance_id), None)
        if vm is None:
            return 404, self._not_found(
                f"virtualMachineScaleSets/{path.scale_set}/virtualMachines",
                str(path.instance_id),
                path.resource_group,
            )
        return 200, self._vm_text[vm.name].encode()

    @staticmethod
    def _not_found(kind: str, name: str, rg: str) -> bytes:
        return arm_error(
            "ResourceNotFound",
            f"The Resource 'Microsoft.Compute/{kind}/{name}' under resource group '{rg}' was not "
            "found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
        )

    def _page(self, vms: list[EmulatedVm], request: web.Request) -> bytes:
        token = request.query.get("$skiptoken", "0")
        start = int(token) if token.isdigit() else 0
        chunk = vms[start : start + self._page_size]
        out = '{"value":[' + ",".join(self._vm_text[v.name] for v in chunk) + "]"
        nxt = start + self._page_size
        if nxt < len(vms):
            link = (
                f"{self.https_url}{request.path}?api-version={quote(request.query['api-version'])}"
                f"&$skiptoken={nxt}"
            )
            out += ',"nextLink":' + json.dumps(link)
        return (out + "}").encode()

    # ---------------------------------------------------------------- admin

    async def _admin_counters(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.counters)

    async def _admin_counters_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset_counters()
        return web.json_response({})

    def _faults_json(self) -> dict[str, Any]:
        return {service: asdict(fault) for service, fault in self._faults.items()}

    async def _admin_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._faults_json())

    async def _admin_faults_set(self, request: web.Request) -> web.StreamResponse:
        """Body: ``{"service": "arm", "status": 503 | "hang": true | "drop": true,
        "times": N, "retry_after": S}`` or ``{"service": "arm", "clear": true}``."""
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            service = body.get("service")
            if service not in SERVICES:
                raise ValueError(f"service must be one of {SERVICES}")
            svc: Service = service
            if body.get("clear"):
                self.clear_fault(svc)
            else:
                self.set_fault(
                    svc,
                    status=_opt_int(body.get("status")),
                    hang=bool(body.get("hang", False)),
                    drop=bool(body.get("drop", False)),
                    times=_opt_int(body.get("times")),
                    retry_after=_opt_int(body.get("retry_after")),
                )
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self._faults_json())

    async def _admin_faults_clear(self, request: web.Request) -> web.StreamResponse:
        self.clear_fault()
        return web.json_response({})

    async def _admin_latency(self, request: web.Request) -> web.StreamResponse:
        """Body: seconds per service, e.g. ``{"arm": 0.2, "imds": 0}``."""
        try:
            body = await request.json()
            if not isinstance(body, dict) or set(body) - set(SERVICES):
                raise ValueError(f"body must map some of {SERVICES} to seconds")
            secs = {k: float(v) for k, v in body.items()}
            self.set_latency(
                arm=secs.get("arm"),
                entra=secs.get("entra"),
                aia=secs.get("aia"),
                imds=secs.get("imds"),
            )
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self._latency))

    async def _admin_rotate(self, request: web.Request) -> web.StreamResponse:
        return self._admin_tenant_op(request, "rotate")

    async def _admin_retire(self, request: web.Request) -> web.StreamResponse:
        return self._admin_tenant_op(request, "retire")

    def _admin_tenant_op(
        self, request: web.Request, op: Literal["rotate", "retire"]
    ) -> web.Response:
        tid = request.match_info["tid"].lower()
        if tid not in self._tenants:
            return web.json_response({"error": "unknown tenant"}, status=404)
        if op == "rotate":
            self.rotate_signing_key(tid)
        else:
            self.retire_old_keys(tid)
        return web.json_response({"kids": list(self.signing_kids(tid))})


def _opt_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value
