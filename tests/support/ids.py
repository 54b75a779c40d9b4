"""One set of Azure identifiers for unit tests: tenant, subscriptions, group, VM, vmId.

The document (``tests.support.cms_forge.azure_content``) and the access token
(``tests.support.minter``) default to these, so a test changes exactly the one it is about.
"""

from __future__ import annotations

from tests.support.tokens import SUBSCRIPTION

__all__ = [
    "OTHER_SUBSCRIPTION",
    "OTHER_TENANT",
    "RESOURCE_GROUP",
    "SUBSCRIPTION",
    "TENANT",
    "VM_ID",
    "VM_NAME",
    "identity_rid",
    "storage_rid",
    "vm_rid",
    "vmss_rid",
]

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
OTHER_TENANT = "33333333-3333-3333-3333-333333333333"
# SUBSCRIPTION is the token files' (tests.support.tokens); the allow rules name it.
OTHER_SUBSCRIPTION = "22222222-2222-2222-2222-222222222222"
RESOURCE_GROUP = "kube"
VM_NAME = "node-0"
VM_ID = "b1310a36-d400-46f6-82cb-6217df846586"


def vm_rid(
    subscription: str = SUBSCRIPTION, group: str = RESOURCE_GROUP, name: str = VM_NAME
) -> str:
    return (
        f"/subscriptions/{subscription}/resourceGroups/{group}"
        f"/providers/Microsoft.Compute/virtualMachines/{name}"
    )


def vmss_rid(
    subscription: str = SUBSCRIPTION, group: str = RESOURCE_GROUP, name: str = "ss"
) -> str:
    return (
        f"/subscriptions/{subscription}/resourceGroups/{group}"
        f"/providers/Microsoft.Compute/virtualMachineScaleSets/{name}"
    )


def storage_rid(subscription: str = SUBSCRIPTION, group: str = RESOURCE_GROUP) -> str:
    return (
        f"/subscriptions/{subscription}/resourceGroups/{group}"
        "/providers/Microsoft.Storage/storageAccounts/logs"
    )


def identity_rid(subscription: str = SUBSCRIPTION, group: str = RESOURCE_GROUP) -> str:
    return (
        f"/subscriptions/{subscription}/resourceGroups/{group}"
        "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/joiner"
    )
