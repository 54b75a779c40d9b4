"""The Azure emulator (DESIGN.md section 9): IMDS, AIA, Entra ID and ARM, faithful to the byte.

Used by tests, the demo and the benchmarks; the product never imports it, and it never
imports the gateway's verification code (``gateway.azure``, ``gateway.join``): it builds
Azure's formats itself, so a verifier bug cannot hide behind the same bug here.

In-process::

    async with AzureEmulator() as emu:
        tid = emu.add_tenant()
        vm = emu.add_vm(subscription=SUB, resource_group="rg", name="web-1",
                        tenant=tid, identity="user")
        # the agent talks to vm.imds_url; the gateway trusts emu.attestation_root_pem,
        # allows emu.aia_prefix, and uses emu.https_url (TLS CA emu.tls_ca_pem) as
        # authority host and ARM endpoint.

Own process: ``join-gateway emulator --vms N --info-out INFO.json`` (see ``cli.py``).

HTTP listener (``http_url``):
  ``GET /vm/<name>/metadata/attested/document?api-version=&nonce=``,
  ``GET /vm/<name>/metadata/identity/oauth2/token?api-version=&resource=[&client_id=|
  &object_id=|&msi_res_id=]`` (both need ``Metadata: true``),
  ``GET /pkiops/certs/<file>.crt`` (AIA, DER),
  admin (never delayed or faulted): ``GET|DELETE /_emulator/counters``,
  ``GET|POST|DELETE /_emulator/faults`` (POST ``{"service": "arm"|"entra"|"imds"|"aia",
  "status": N | "hang": true | "drop": true, "times": N, "retry_after": S}`` or
  ``{"service": ..., "clear": true}``), ``POST /_emulator/latency`` (``{"arm": 0.08, ...}``
  seconds), ``POST /_emulator/tenants/<tid>/rotate|retire``.

HTTPS listener (``https_url``): ``/<tid>/.well-known/openid-configuration``,
``/<tid>/discovery/keys``, ``/common/discovery/keys`` (and the v2.0 paths), and ARM's
``/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines[/<name>]``
and ``.../virtualMachineScaleSets/<ss>/virtualMachines[/<instanceId>]``.
"""

from __future__ import annotations

from .attested import AttestedSigner, attested_content, format_azure_date
from .fleet import Fleet, apply_fleet_spec, build_fleet
from .imds import ImdsError
from .model import SERVICES, ArmLimits, EmulatedVm, Fault, Latency, Service
from .server import AzureEmulator

__all__ = [
    "SERVICES",
    "ArmLimits",
    "AttestedSigner",
    "AzureEmulator",
    "EmulatedVm",
    "Fault",
    "Fleet",
    "ImdsError",
    "Latency",
    "Service",
    "apply_fleet_spec",
    "attested_content",
    "build_fleet",
    "format_azure_date",
]
