"""``join-gateway rules explain``: which allow rule admits a VM, or why none does.

Input is what the gateway itself would see: the VM as Resource Manager returns it
(``GET …/virtualMachines/<name>``, or ``az vm show -o json``, which lifts ``properties``
to the top level) and, optionally, the access token's claims (the decoded payload:
``tid``, ``oid``, ``appid``). Without claims the tenant is the VM identity's
``tenantId`` and the identities are every managed identity attached to the VM (any of
them could join; the claims name the one that does). The answer names the rule that
matched, or for each rule the first field that did not — the same evaluation the gateway
runs (gateway/join/allow.py), with the same token files (``-c gateway.yaml``).

Exit codes: 0 a rule matched, 1 none did, 2 usage or unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.azure.arm import vm_record_from_model
from gateway.core.config import ConfigError, load_config
from gateway.core.errors import GatewayError
from gateway.join.allow import Verdict, VmFacts, evaluate
from gateway.join.names import VmAttributes
from gateway.join.rules import ProvisionToken, load_token_files

__all__ = ["add_arguments", "arm_model", "claims_from_vm", "explain", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="rules_command", required=True, metavar="{explain}")
    e = sub.add_parser("explain", help="which rule admits this VM, or why none does")
    e.add_argument("--config", "-c", required=True, help="gateway.yaml (for its token files)")
    e.add_argument("--token", required=True, help="the token's name")
    e.add_argument("--vm-json", required=True, type=Path, help="the VM as ARM returns it")
    e.add_argument(
        "--claims-json",
        type=Path,
        help="the access token's claims (tid, oid, appid); default: the VM's identities",
    )
    e.add_argument("--json", action="store_true", help="print the answer as JSON")


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def arm_model(vm: dict[str, Any]) -> dict[str, Any]:
    """ARM's VM model: ``az vm show -o json`` prints it with ``properties`` lifted to the
    top level (``vmId``, ``networkProfile`` beside ``id`` and ``name``)."""
    if "properties" not in vm and "vmId" in vm:
        return {**vm, "properties": vm}
    return vm


def claims_from_vm(vm: dict[str, Any]) -> dict[str, Any]:
    """Claims standing in for a token's when none is given: the VM identity's tenant, and
    every identity attached to the VM (system-assigned principal; each user-assigned
    identity's principal and client IDs) — which any of them could present."""
    identity = vm.get("identity")
    identity = identity if isinstance(identity, dict) else {}
    tid = identity.get("tenantId")
    if not isinstance(tid, str):
        raise ValueError(
            "the VM JSON has no identity.tenantId (a VM with user-assigned identities "
            "only): pass --claims-json"
        )
    ids = [identity.get("principalId")]
    users = identity.get("userAssignedIdentities")
    for user in (users or {}).values() if isinstance(users, dict) else ():
        if isinstance(user, dict):
            ids += [user.get("principalId"), user.get("clientId")]
    return {"tid": tid, "identities": [i for i in ids if isinstance(i, str)]}


def facts_from(vm: dict[str, Any], claims: dict[str, Any]) -> VmFacts:
    """The facts the gateway would use, from ARM's VM model and the token's claims (or
    ``claims_from_vm``'s, whose ``identities`` lists every attached identity)."""
    record = vm_record_from_model(arm_model(vm))
    tid = claims.get("tid")
    if not isinstance(tid, str):
        raise ValueError("claims: 'tid' is missing")
    ids = [claims.get(k) for k in ("oid", "appid")] + list(claims.get("identities", []))
    identities = frozenset(i.lower() for i in ids if isinstance(i, str))
    return VmFacts(
        tenant=tid.lower(),
        subscription=record.subscription,
        resource_group=record.resource_group,
        identities=identities,
        location=record.location,
        scale_set=record.scale_set or "",
        vm_name=record.name,
        tags=record.tags,
    )


def attributes_from(vm: dict[str, Any], claims: dict[str, Any]) -> VmAttributes:
    """What the name templates render from, as the gateway would have it."""
    record = vm_record_from_model(arm_model(vm))
    tid = claims.get("tid")
    return VmAttributes(
        vm_name=record.name,
        scale_set=record.scale_set,
        instance_id=record.instance_id,
        resource_group=record.resource_group,
        subscription=record.subscription,
        tenant=tid.lower() if isinstance(tid, str) else None,
        location=record.location,
        vm_id=record.vm_id,
    )


def explain(
    token: ProvisionToken, facts: VmFacts, attrs: VmAttributes | None = None
) -> dict[str, Any]:
    """The rules evaluated in order up to the first match (as the gateway stops there),
    and the token's name policy: in words and, given ``attrs``, what it names this VM."""
    index, checks = evaluate(token.allow, facts)
    report: dict[str, Any] = {"token": token.name, "matched_rule": index, "rules": []}
    report["names"] = {"policy": token.names.describe()}
    if attrs is not None:
        rendered = [token.names.node_name.render(attrs)]
        rendered += [t.render(attrs) for t in token.names.host_names]
        report["names"]["node_name"] = rendered[0]  # None: no valid name, joins refused
        report["names"]["host_names"] = [n for n in rendered[1:] if n is not None]
    for i, (rule, check) in enumerate(zip(token.allow, checks, strict=False)):
        entry: dict[str, Any] = {"rule": i, "source": rule.source, "says": rule.describe()}
        if check.verdict is Verdict.MATCH:
            entry["outcome"] = "matched"
        else:
            entry["outcome"] = "no match"
            entry["first_field_not_matching"] = check.field
            entry["vm_has"] = check.actual
        report["rules"].append(entry)
    return report


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        registry = load_token_files(
            [config.path(p) for p in config.tokens.files], vm_binding=config.azure.vm_binding
        )
        vm = _read_json(args.vm_json)
        claims = (
            _read_json(args.claims_json) if args.claims_json is not None else claims_from_vm(vm)
        )
        facts, attrs = facts_from(vm, claims), attributes_from(vm, claims)
    except (ConfigError, OSError, ValueError, GatewayError) as exc:
        print(f"rules explain: {exc}", file=sys.stderr)
        return 2
    if args.token not in registry:
        print(f"rules explain: no token named {args.token!r}", file=sys.stderr)
        return 2
    token = registry.get(args.token)
    report = explain(token, facts, attrs)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if args.claims_json is None:
            print("identities: every one attached to the VM (--claims-json names the one)")
        for entry in report["rules"]:
            print(f"rule {entry['rule']} ({entry['source']}): {entry['says']}")
            if entry["outcome"] == "matched":
                print("  -> matches: this rule admits the VM")
            else:
                print(
                    f"  -> no match: {entry['first_field_not_matching']} "
                    f"(the VM has {entry['vm_has']})"
                )
        if report["matched_rule"] is None:
            print(f"token {token.name!r}: no rule admits this VM (not_allowed)")
        names = report["names"]
        print(f"names: {names['policy']}")
        node = names["node_name"]
        print(
            f"  -> this VM's node name: {node}"
            if node is not None
            else "  -> this VM gets no valid node name: joins are refused (name_not_allowed)"
        )
        if names["host_names"]:
            print(f"  -> other names it may ask for: {', '.join(names['host_names'])}")
    return 0 if report["matched_rule"] is not None else 1
