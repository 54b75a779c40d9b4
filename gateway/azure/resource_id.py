"""Azure Resource Manager resource IDs: parse strictly, classify, compare case-insensitively.

The access token names the joining resource by ID (``xms_az_rid`` / ``xms_mirid``), and
that ID decides which subscription and resource group the allow rules see, and which ARM
URL the binding reads. So the parser refuses anything that is not plainly
``/subscriptions/<guid>/resourceGroups/<rg>/providers/<ns>/<type>/<name>[/<type>/<name>]…``:
no ``..``, no empty segments, no characters that would change a URL's meaning.

ARM itself is case-insensitive in segment names and spells them inconsistently (tokens
carry ``resourcegroups``, API responses ``resourceGroups``, ``virtualMachines`` vs
``virtualmachines``): https://learn.microsoft.com/azure/azure-resource-manager/management/
resource-name-rules ("resource names are case-insensitive"). Comparisons use ``key``.

"Case-insensitive" there means ASCII case only. Python's ``str.lower()``/``casefold()``
fold far more: U+212A KELVIN SIGN and U+017F LONG S become ``k`` and ``s``, ``ß``
becomes ``ss``, U+0130 becomes ``i̇``. A group named ``\u212aube`` is a different group
from ``kube`` to Resource Manager (both can exist side by side), so folding it onto
``kube`` would let a rule for one admit the other. Every comparison of Azure names (allow
rules, cache keys) goes through :func:`azure_name_key`: ASCII letters fold, nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.azure.token import normalize_guid
from gateway.core.errors import Code, JoinRejected

__all__ = [
    "ResourceId",
    "azure_name_key",
    "parse_resource_id",
    "parse_vm_resource_id",
    "same_azure_name",
]

_MAX_ID_CHARS = 2048
# Segments are resource names: ARM allows letters (Unicode), digits, '-', '_', '.', '(', ')'.
# Refuse whatever could reshape a URL or a log line instead of listing every legal char.
_BAD_SEGMENT = re.compile(r"[\s/\\?#%&=+:;@\"'<>`|*\x00-\x1f\x7f]")
# The same characters but '/': one search over the whole ID finds whether any segment has one.
_BAD_IN_ID = re.compile(r"[\s\\?#%&=+:;@\"'<>`|*\x00-\x1f\x7f]")

# A-Z -> a-z and nothing else (str.translate leaves unmapped code points alone).
_ASCII_FOLD = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def azure_name_key(name: str) -> str:
    """The comparison form of an Azure name: ASCII letters lowercased, every other code
    point kept exactly (no Unicode case folding, no normalization)."""
    # On an all-ASCII string ``lower()`` is exactly this fold (and a fraction of the cost
    # of ``translate``); anything else goes through the table, which folds A-Z only.
    return name.lower() if name.isascii() else name.translate(_ASCII_FOLD)


def same_azure_name(a: str, b: str) -> bool:
    """Whether Resource Manager treats ``a`` and ``b`` as one name."""
    return azure_name_key(a) == azure_name_key(b)


_COMPUTE = "microsoft.compute"
_VM = "virtualmachines"
_VMSS = "virtualmachinescalesets"
_MI = "microsoft.managedidentity"
_UAI = "userassignedidentities"
_SHAPE_VM = (_COMPUTE, (_VM,))
_SHAPE_VMSS = (_COMPUTE, (_VMSS,))
_SHAPE_VMSS_VM = (_COMPUTE, (_VMSS, _VM))
_SHAPE_UAI = (_MI, (_UAI,))


@dataclass(frozen=True, slots=True)
class ResourceId:
    """A parsed resource ID. Fields keep ARM's spelling; ``key`` is the comparison form.

    ``types``/``names`` pair up: ``types[0]`` is the top-level type (``virtualMachines``)
    and ``name`` its name; nested resources (a scale set's ``virtualMachines/<instance>``)
    continue in ``types[1:]`` and ``child_names``.
    """

    raw: str
    subscription: str  # lowercase GUID
    resource_group: str
    provider: str
    types: tuple[str, ...]
    name: str
    child_names: tuple[str, ...] = ()

    # The derived forms, worked out once when the ID is made (a join and every record of
    # an ARM listing read them: ``key`` and ``group_key`` are cache keys, the shape says
    # what the ID names). Not compared: they follow from the fields above.
    # Canonical form (``azure_name_key`` of each segment), for cache keys and equality
    # across spellings.
    key: str = field(init=False, repr=False, compare=False)
    # Comparison form of the resource's resource group (cache keys per group).
    group_key: str = field(init=False, repr=False, compare=False)
    _shape: tuple[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = (self.name, *self.child_names)
        parts = ["subscriptions", self.subscription, "resourcegroups", self.resource_group]
        parts += ["providers", self.provider]
        for typ, name in zip(self.types, names, strict=True):
            parts += [typ, name]
        # One fold of the joined ID is the per-segment one: it maps code points one by one
        # and leaves "/" alone.
        key = azure_name_key("/" + "/".join(parts))
        types = tuple(azure_name_key(t) for t in self.types)
        setattr_ = object.__setattr__
        setattr_(self, "key", key)
        setattr_(self, "group_key", f"{self.subscription}/{azure_name_key(self.resource_group)}")
        setattr_(self, "_shape", (azure_name_key(self.provider), types))

    @property
    def is_vm(self) -> bool:
        return self._shape == _SHAPE_VM

    @property
    def is_scale_set(self) -> bool:
        return self._shape == _SHAPE_VMSS

    @property
    def is_scale_set_vm(self) -> bool:
        return self._shape == _SHAPE_VMSS_VM

    @property
    def is_user_assigned_identity(self) -> bool:
        return self._shape == _SHAPE_UAI

    @property
    def names_vm_or_scale_set(self) -> bool:
        return self.is_vm or self.is_scale_set or self.is_scale_set_vm

    @property
    def scale_set(self) -> str | None:
        """The scale set's name for a scale set or one of its VMs, else None."""
        return self.name if self.is_scale_set or self.is_scale_set_vm else None

    @property
    def instance_id(self) -> str | None:
        return self.child_names[0] if self.is_scale_set_vm else None

    def __str__(self) -> str:
        return self.raw


def _unsupported(raw: str, why: str) -> JoinRejected:
    # The ID is attacker-influenced only through a signed token, but keep the detail short.
    return JoinRejected(Code.IDENTITY_UNSUPPORTED, f"resource ID {raw[:300]!r}: {why}")


def parse_resource_id(raw: str) -> ResourceId:
    """Parse any provider resource ID (strictly); raise ``JoinRejected(IDENTITY_UNSUPPORTED)``."""
    if not isinstance(raw, str) or not raw or len(raw) > _MAX_ID_CHARS:
        raise _unsupported(str(raw), "empty or too long")
    if not raw.startswith("/"):
        raise _unsupported(raw, "does not start with '/'")
    segments = raw[1:].split("/")
    # One search over the ID and three list scans say whether a segment is bad; only then
    # is each looked at, for the message naming the first bad one.
    if _BAD_IN_ID.search(raw) or "" in segments or "." in segments or ".." in segments:
        for seg in segments:
            if not seg:
                raise _unsupported(raw, "empty segment")
            if seg in (".", ".."):
                raise _unsupported(raw, "dot segment")
            if _BAD_SEGMENT.search(seg):
                raise _unsupported(raw, "forbidden character")
    if len(segments) < 8 or len(segments) % 2 != 0:
        raise _unsupported(raw, "not a provider resource ID")
    # The fold maps code points one by one and leaves "/" alone: folding the whole ID
    # folds every segment, and it is the key (below).
    key = azure_name_key(raw)
    folded = key[1:].split("/")
    if folded[0] != "subscriptions" or folded[2] != "resourcegroups" or folded[4] != "providers":
        raise _unsupported(raw, "not /subscriptions/…/resourceGroups/…/providers/…")
    subscription = normalize_guid(segments[1])
    if subscription is None:
        raise _unsupported(raw, "subscription is not a GUID")
    names = segments[7::2]
    # What ``ResourceId(...)`` would make of these fields, without working the derived
    # forms out again: ``key`` is the folded ID (its subscription, an ASCII GUID, folds to
    # the lowercase ``subscription``; the three fixed names fold to themselves).
    rid = object.__new__(ResourceId)
    set_ = object.__setattr__
    set_(rid, "raw", raw)
    set_(rid, "subscription", subscription)
    set_(rid, "resource_group", segments[3])
    set_(rid, "provider", segments[5])
    set_(rid, "types", tuple(segments[6::2]))
    set_(rid, "name", names[0])
    set_(rid, "child_names", tuple(names[1:]))
    set_(rid, "key", key)
    set_(rid, "group_key", f"{subscription}/{folded[3]}")
    set_(rid, "_shape", (folded[5], tuple(folded[6::2])))
    return rid


def parse_vm_resource_id(raw: str) -> ResourceId:
    """Parse an ID that must name a VM, a scale set or a scale set's VM."""
    rid = parse_resource_id(raw)
    if not rid.names_vm_or_scale_set:
        raise _unsupported(raw, "names neither a VM nor a scale set")
    return rid
