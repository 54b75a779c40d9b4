"""Node labels from verified attributes (DESIGN §3 step 6c): what the join forwards.

The labels say where the node runs, in the namespace of ``gateway.protocol.labels``, and
come only from verified evidence: the token's ``tid``, the signed document's ``vmId``, the
resource the token names and, when ``azure.vm_binding`` is on, Resource Manager's record
of the VM (location, name, scale set, instance, tags) — the very facts the allow rules
see. Never the request body, never what IMDS tells the node. With binding off the labels
that need Resource Manager are left out, as the rules leave out their fields (a token
naming a scale set does not say which instance asked; only ARM ties a name to the vmId).

Tags become labels only when the token lists them (``spec.azure.labels_from_tags``); tag
names compare as Azure compares them (ASCII case-insensitively), and the label key takes
the token's spelling, so one token's nodes share keys whatever case each VM's tag has. A
tag the VM lacks gives no label. A label outside Azure's bounds (which ARM should never
return) is left out and named in ``omitted``, rather than refusing the join.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

from gateway.azure.resource_id import azure_name_key
from gateway.join.binding import VmIdentity
from gateway.protocol.labels import (
    LABEL_INSTANCE_ID,
    LABEL_LOCATION,
    LABEL_RESOURCE_GROUP,
    LABEL_SCALE_SET,
    LABEL_SUBSCRIPTION,
    LABEL_TENANT,
    LABEL_VM_ID,
    LABEL_VM_NAME,
    TAG_LABEL_PREFIX,
    Labels,
    label_problem,
)

__all__ = ["NodeLabels", "node_labels"]


@dataclass(frozen=True)
class NodeLabels:
    """The labels of one join, and the ones left out for breaking Azure's bounds (why)."""

    labels: Labels
    omitted: tuple[str, ...] = ()


def node_labels(
    *, tenant: str, vm_id: str, identity: VmIdentity, tags: Sequence[str]
) -> NodeLabels:
    """Labels for a VM whose evidence verified: ``tenant`` from the token, ``vm_id`` from
    the document, ``identity`` from the binding; ``tags`` the tag names the token lists."""
    out = {
        LABEL_TENANT: tenant,
        LABEL_SUBSCRIPTION: identity.subscription_id,
        LABEL_RESOURCE_GROUP: identity.resource_group,
        LABEL_VM_ID: vm_id,
    }
    if identity.arm_verified:
        from_arm = {
            LABEL_LOCATION: identity.location,
            LABEL_VM_NAME: identity.vm_name,
            LABEL_SCALE_SET: identity.scale_set,
            LABEL_INSTANCE_ID: identity.instance_id,
        }
        out.update((k, v) for k, v in from_arm.items() if v)
        vm_tags = {azure_name_key(k): v for k, v in (identity.tags or {}).items()}
        for name in tags:
            value = vm_tags.get(azure_name_key(name))
            if value is not None:
                out[TAG_LABEL_PREFIX + name] = value
    omitted: list[str] = []
    for key, value in list(out.items()):
        problem = label_problem(key, value)
        if problem is not None:
            omitted.append(problem)
            del out[key]
    return NodeLabels(MappingProxyType(out), tuple(omitted))
