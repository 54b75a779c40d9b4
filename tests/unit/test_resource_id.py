"""Resource ID parsing: what names a VM or scale set, and what is refused."""

from __future__ import annotations

import pytest

from gateway.azure.resource_id import (
    ResourceId,
    azure_name_key,
    parse_resource_id,
    parse_vm_resource_id,
    same_azure_name,
)
from gateway.core.errors import Code, JoinRejected

SUB = "11111111-1111-1111-1111-111111111111"
BASE = f"/subscriptions/{SUB}/resourceGroups/Group1/providers"

# (id, raw, kind, resource_group, name, scale_set, instance)
ACCEPTED: list[tuple[str, str, str, str, str, str | None, str | None]] = [
    (
        "a VM as ARM spells it",
        f"{BASE}/Microsoft.Compute/virtualMachines/web-1",
        "vm",
        "Group1",
        "web-1",
        None,
        None,
    ),
    (
        "a VM as a token spells it (lowercase resourcegroups)",
        f"/subscriptions/{SUB}/resourcegroups/group1/providers/Microsoft.Compute/virtualMachines/web-1",
        "vm",
        "group1",
        "web-1",
        None,
        None,
    ),
    (
        "a VM with every segment in upper case",
        f"/SUBSCRIPTIONS/{SUB.upper()}/RESOURCEGROUPS/G/PROVIDERS/MICROSOFT.COMPUTE/VIRTUALMACHINES/VM",
        "vm",
        "G",
        "VM",
        None,
        None,
    ),
    (
        "a scale set",
        f"{BASE}/Microsoft.Compute/virtualMachineScaleSets/pool",
        "scale_set",
        "Group1",
        "pool",
        "pool",
        None,
    ),
    (
        "a scale set VM",
        f"{BASE}/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/7",
        "scale_set_vm",
        "Group1",
        "pool",
        "pool",
        "7",
    ),
    (
        "a resource group name with dots and parentheses",
        f"/subscriptions/{SUB}/resourceGroups/rg.prod(eu)/providers/Microsoft.Compute/virtualMachines/a",
        "vm",
        "rg.prod(eu)",
        "a",
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("raw", "kind", "group", "name", "scale_set", "instance"),
    [a[1:] for a in ACCEPTED],
    ids=[a[0] for a in ACCEPTED],
)
def test_vm_resource_ids_parse(
    raw: str, kind: str, group: str, name: str, scale_set: str | None, instance: str | None
) -> None:
    rid = parse_vm_resource_id(raw)
    assert rid.subscription == SUB
    assert rid.resource_group == group
    assert rid.name == name
    assert rid.scale_set == scale_set
    assert rid.instance_id == instance
    assert (rid.is_vm, rid.is_scale_set, rid.is_scale_set_vm) == (
        kind == "vm",
        kind == "scale_set",
        kind == "scale_set_vm",
    )
    assert str(rid) == raw


def test_key_is_the_same_across_spellings() -> None:
    a = parse_resource_id(f"{BASE}/Microsoft.Compute/virtualMachines/web-1")
    b = parse_resource_id(
        f"/subscriptions/{SUB.upper()}/resourcegroups/GROUP1/providers/microsoft.compute/virtualmachines/WEB-1"
    )
    assert a.key == b.key
    assert a.key == (
        f"/subscriptions/{SUB}/resourcegroups/group1/providers/"
        "microsoft.compute/virtualmachines/web-1"
    )


def test_derived_forms_are_worked_out_once_per_parsed_id() -> None:
    # A join asks for the token's key and shape several times: each is computed once and
    # kept on the (frozen) ID, which still compares and hashes by its fields only.
    rid = parse_resource_id(
        f"{BASE}/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/3"
    )
    assert rid.key is rid.key
    assert rid.group_key is rid.group_key
    assert rid.is_scale_set_vm and not rid.is_vm and not rid.is_scale_set
    again = parse_resource_id(rid.raw)
    assert again == rid and hash(again) == hash(rid)
    assert again.key == rid.key


# (id, one spelling, another spelling, same name to Resource Manager?)
NAMES: list[tuple[str, str, str, bool]] = [
    ("ASCII letters fold", "Kube-Prod", "kube-PROD", True),
    ("a Kelvin sign stays apart from K", "\u212aube", "kube", False),
    ("a long s stays apart from s", "ea\u017ft", "east", False),
    ("a dotless i stays apart from i", "\u0131nfra", "infra", False),
    ("a capital I with dot stays apart from i", "\u0130nfra", "infra", False),
    ("a sharp s stays apart from ss", "stra\u00dfe", "strasse", False),
    ("a capital sharp s stays apart from a sharp s", "STRA\u1e9eE", "stra\u00dfe", False),
    ("fullwidth letters stay apart from ASCII", "\uff4b\uff55\uff42\uff45", "kube", False),
    ("fullwidth capitals stay apart from fullwidth lowercase", "\uff2b", "\uff4b", False),
    ("Greek capital sigma stays apart from small sigma", "\u03a3", "\u03c3", False),
]


@pytest.mark.parametrize(("a", "b", "same"), [n[1:] for n in NAMES], ids=[n[0] for n in NAMES])
def test_names_compare_as_resource_manager_compares_them(a: str, b: str, same: bool) -> None:
    assert same_azure_name(a, b) is same
    assert (azure_name_key(a) == azure_name_key(b)) is same
    # Resource IDs, and so every cache key derived from them, compare the same way.
    vm_a = parse_resource_id(
        f"/subscriptions/{SUB}/resourceGroups/{a}/providers/Microsoft.Compute/virtualMachines/web-1"
    )
    vm_b = parse_resource_id(
        f"/subscriptions/{SUB}/resourceGroups/{b}/providers/Microsoft.Compute/virtualMachines/web-1"
    )
    assert (vm_a.key == vm_b.key) is same
    assert (vm_a.group_key == vm_b.group_key) is same
    named_a = parse_resource_id(f"{BASE}/Microsoft.Compute/virtualMachines/{a}")
    named_b = parse_resource_id(f"{BASE}/Microsoft.Compute/virtualMachines/{b}")
    assert (named_a.key == named_b.key) is same


def test_a_user_assigned_identity_parses_but_is_not_a_vm() -> None:
    raw = f"{BASE}/Microsoft.ManagedIdentity/userAssignedIdentities/joiner"
    rid = parse_resource_id(raw)
    assert rid.is_user_assigned_identity
    assert not rid.names_vm_or_scale_set
    with pytest.raises(JoinRejected) as info:
        parse_vm_resource_id(raw)
    assert info.value.code == Code.IDENTITY_UNSUPPORTED


REFUSED: list[tuple[str, str]] = [
    ("an empty string", ""),
    (
        "a relative ID",
        f"subscriptions/{SUB}/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/a",
    ),
    (
        "a subscription that is not a GUID",
        "/subscriptions/prod/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/a",
    ),
    ("a dot-dot segment", f"{BASE}/Microsoft.Compute/virtualMachines/../virtualMachines/a"),
    ("a single-dot segment", f"{BASE}/Microsoft.Compute/virtualMachines/."),
    ("an empty segment", f"{BASE}/Microsoft.Compute//virtualMachines/a"),
    ("a trailing slash", f"{BASE}/Microsoft.Compute/virtualMachines/a/"),
    ("a query string", f"{BASE}/Microsoft.Compute/virtualMachines/a?x=1"),
    ("a percent-encoded slash", f"{BASE}/Microsoft.Compute/virtualMachines/a%2Fb"),
    ("a backslash", f"{BASE}/Microsoft.Compute/virtualMachines/a\\b"),
    ("a newline", f"{BASE}/Microsoft.Compute/virtualMachines/a\nb"),
    ("a resource group ID", f"/subscriptions/{SUB}/resourceGroups/g"),
    ("a subscription ID", f"/subscriptions/{SUB}"),
    ("a type without a name", f"{BASE}/Microsoft.Compute/virtualMachines"),
    (
        "resourceGroups misspelt",
        f"/subscriptions/{SUB}/resourceGroup/g/providers/Microsoft.Compute/virtualMachines/a",
    ),
    ("a storage account", f"{BASE}/Microsoft.Storage/storageAccounts/data"),
    ("a VM extension", f"{BASE}/Microsoft.Compute/virtualMachines/a/extensions/x"),
    ("a classic VM", f"{BASE}/Microsoft.ClassicCompute/virtualMachines/a"),
    ("an app service", f"{BASE}/Microsoft.Web/sites/app"),
    ("an ID longer than 2 KiB", f"{BASE}/Microsoft.Compute/virtualMachines/{'a' * 2100}"),
]


@pytest.mark.parametrize("raw", [r[1] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_other_ids_are_unsupported(raw: str) -> None:
    with pytest.raises(JoinRejected) as info:
        parse_vm_resource_id(raw)
    assert info.value.code == Code.IDENTITY_UNSUPPORTED


@pytest.mark.parametrize(
    "raw",
    [a[1] for a in ACCEPTED]
    + [
        f"/subscriptions/{SUB.upper()}/resourcegroups/\u212aube/providers/Microsoft.Compute/virtualMachines/\u0130x",
        f"/Subscriptions/{SUB}/ResourceGroups/Gr\u00dfp/PROVIDERS/Microsoft.ManagedIdentity/userAssignedIdentities/Id",
    ],
)
def test_a_parsed_id_is_the_id_made_from_its_fields(raw: str) -> None:
    # The parser builds its IDs without recomputing the derived forms; they must be what
    # the constructor works out from the same fields.
    rid = parse_resource_id(raw)
    made = ResourceId(
        raw=rid.raw,
        subscription=rid.subscription,
        resource_group=rid.resource_group,
        provider=rid.provider,
        types=rid.types,
        name=rid.name,
        child_names=rid.child_names,
    )
    assert made == rid and hash(made) == hash(rid)
    assert (made.key, made.group_key, made._shape) == (rid.key, rid.group_key, rid._shape)
    assert repr(made) == repr(rid)
