"""Node labels: the verified Azure attributes the gateway forwards with a registration.

One fixed namespace, defined once here for both ends: the gateway builds labels only
under these keys (``gateway/join/labels.py``), the auth service refuses any other key.

==========================  ===========================================================
``azure/tenant``            the access token's ``tid``
``azure/subscription``      the VM's subscription (token resource ID, then ARM)
``azure/resource_group``    the VM's resource group (token resource ID, then ARM)
``azure/vm_id``             the signed attested document's ``vmId``
``azure/location``          the VM's region                                      [ARM]
``azure/vm_name``           the VM's name (a uniform instance: ``<set>_<id>``)   [ARM]
``azure/scale_set``         its scale set, uniform or flexible                   [ARM]
``azure/instance_id``       a uniform scale set instance's ID                    [ARM]
``azure/tag/<name>``        a VM tag a token lists in ``spec.azure.labels_from_tags``
                            (keyed by the token's spelling of the name)          [ARM]
==========================  ===========================================================

Bounds are Azure's (https://learn.microsoft.com/azure/azure-resource-manager/management/
tag-resources#limitations): at most 50 tags on a resource, a tag name at most 512
characters without ``<>%&\\?/``, a value at most 256. A value never holds a control
character (labels end up in log lines and tables).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from gateway.protocol.validators import invalid

__all__ = [
    "FIXED_LABEL_KEYS",
    "LABEL_INSTANCE_ID",
    "LABEL_LOCATION",
    "LABEL_RESOURCE_GROUP",
    "LABEL_SCALE_SET",
    "LABEL_SUBSCRIPTION",
    "LABEL_TENANT",
    "LABEL_VM_ID",
    "LABEL_VM_NAME",
    "MAX_LABELS",
    "MAX_TAG_LABELS",
    "MAX_TAG_NAME",
    "MAX_TAG_VALUE",
    "TAG_LABEL_PREFIX",
    "Labels",
    "decode_labels",
    "label_problem",
    "tag_name_problem",
]

Labels = Mapping[str, str]

LABEL_TENANT = "azure/tenant"
LABEL_SUBSCRIPTION = "azure/subscription"
LABEL_RESOURCE_GROUP = "azure/resource_group"
LABEL_VM_ID = "azure/vm_id"
LABEL_LOCATION = "azure/location"
LABEL_VM_NAME = "azure/vm_name"
LABEL_SCALE_SET = "azure/scale_set"
LABEL_INSTANCE_ID = "azure/instance_id"
TAG_LABEL_PREFIX = "azure/tag/"

FIXED_LABEL_KEYS = frozenset(
    {
        LABEL_TENANT,
        LABEL_SUBSCRIPTION,
        LABEL_RESOURCE_GROUP,
        LABEL_VM_ID,
        LABEL_LOCATION,
        LABEL_VM_NAME,
        LABEL_SCALE_SET,
        LABEL_INSTANCE_ID,
    }
)
# Azure's limits on a resource's tags.
MAX_TAG_LABELS = 50
MAX_TAG_NAME = 512
MAX_TAG_VALUE = 256
MAX_LABELS = len(FIXED_LABEL_KEYS) + MAX_TAG_LABELS

_TAG_NAME_FORBIDDEN = re.compile(r"[<>%&\\?/\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def tag_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an Azure tag name, or None when it can."""
    if not name or len(name) > MAX_TAG_NAME:
        return f"a tag name is 1..{MAX_TAG_NAME} characters"
    if name != name.strip():
        return "a tag name has no surrounding whitespace"
    if _TAG_NAME_FORBIDDEN.search(name):
        return "a tag name has none of < > % & \\ ? / nor control characters"
    return None


def label_problem(key: str, value: str) -> str | None:
    """Why (key, value) is not a label of the namespace, or None when it is one."""
    if key not in FIXED_LABEL_KEYS:
        if not key.startswith(TAG_LABEL_PREFIX):
            return f"label key {key[:60]!r} is outside the azure/ namespace"
        problem = tag_name_problem(key[len(TAG_LABEL_PREFIX) :])
        if problem is not None:
            return f"label key {key[:60]!r}: {problem}"
    if len(value) > MAX_TAG_VALUE:
        return f"label {key[:60]!r}: a value is at most {MAX_TAG_VALUE} characters"
    # Printable ASCII holds none of _CONTROL's characters: the search only for the rest.
    if not (value.isascii() and value.isprintable()) and _CONTROL.search(value):
        return f"label {key[:60]!r}: a value has no control characters"
    return None


def decode_labels(value: object, where: str) -> Labels:
    """A ``labels`` object, strictly: string → string, namespace keys, Azure's bounds;
    raises ``WireError`` (invalid_request)."""
    if not isinstance(value, dict):
        raise invalid(f"{where} must be an object")
    if len(value) > MAX_LABELS:
        raise invalid(f"{where} has more than {MAX_LABELS} labels")
    tags = 0
    for key, item in value.items():
        if not isinstance(item, str):
            raise invalid(f"{where} values must be strings")
        problem = label_problem(key, item)
        if problem is not None:
            raise invalid(f"{where}: {problem}")
        tags += key.startswith(TAG_LABEL_PREFIX)
    if tags > MAX_TAG_LABELS:
        raise invalid(f"{where} has more than {MAX_TAG_LABELS} tag labels")
    return MappingProxyType(dict(value))
