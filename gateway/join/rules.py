"""Token files (the seed's ``kind: token`` / ``version: v2`` format) and the allow rules.

Operators already write these files for Teleport, so the loader accepts them unchanged,
and is strict about everything else: an unknown key, a rule that would match too much, or
a malformed GUID is a ``ConfigError`` naming the file and line, at load time, rather than
a silent hole at join time. Tokens whose ``join_method`` is not ``azure`` are loaded too,
so that a join naming one is told ``token_wrong_method`` instead of ``unknown_token``.

Matching (DESIGN §3 step 6): a rule matches when its ``tenant`` (if set) equals the
token's ``tid``, its ``subscription`` (if set) equals the VM's subscription (GUIDs compared
case-insensitively), and ``resource_groups`` is empty or contains the VM's group (names
compared as Resource Manager compares them, ``azure_name_key``: ASCII case-insensitively,
since ARM returns them in varying case, and exactly outside ASCII, so that ``\u212aube``
with a Kelvin sign is not the group ``kube``). The first match wins.
Callers pass only values from signed evidence or ARM, never from the request body.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.azure.resource_id import azure_name_key
from gateway.azure.token import normalize_guid
from gateway.core.config import ConfigError
from gateway.core.errors import Code, JoinRejected, UnknownToken
from gateway.join.allow import (
    ARM_FIELDS,
    AllowRule,
    Glob,
    RuleCheck,
    Verdict,
    VmFacts,
    evaluate,
)
from gateway.protocol import TOKEN_ROLES, canonical_role
from gateway.protocol.labels import MAX_TAG_LABELS, tag_name_problem

__all__ = [
    "AllowRule",
    "ConfigError",
    "ProvisionToken",
    "TokenFileError",
    "TokenRegistry",
    "VmFacts",
    "check_token",
    "could_any_rule_match",
    "load_token_files",
    "match_allow_rules",
    "refuse_unless_any_rule_can_match",
]

logger = logging.getLogger(__name__)


_TOP_KEYS = frozenset({"kind", "version", "metadata", "spec"})
_METADATA_KEYS = frozenset({"name", "description", "labels", "expires", "namespace", "revision"})
# Teleport's token spec: the keys other join methods use are accepted (and ignored), so a
# file shared with Teleport loads; anything else is a typo worth failing on.
_SPEC_KEYS = frozenset(
    {
        "roles",
        "join_method",
        "azure",
        "bot_name",
        "suggested_labels",
        "suggested_agent_matcher_labels",
        "allow",
        "aws_iid_ttl",
        "gcp",
        "github",
        "gitlab",
        "circleci",
        "kubernetes",
        "spacelift",
        "tpm",
        "terraform_cloud",
        "bitbucket",
        "oracle",
        "azure_devops",
        "bound_keypair",
    }
)
_AZURE_KEYS = frozenset({"allow", "labels_from_tags"})
_RULE_KEYS = frozenset(
    {
        "subscription",
        "resource_groups",
        "tenant",
        "locations",
        "scale_sets",
        "vm_names",
        "identities",
        "tags",
    }
)
# Azure's own limits: resource group 90, VM 64, scale set 64 characters; a tag name 512, a
# tag value 256; a region is a short ASCII word. Longer patterns can never match.
_GLOB_MAX = {"resource_groups": 90, "scale_sets": 64, "vm_names": 64}
_LOCATION_RE = re.compile(r"[A-Za-z0-9]{1,64}")
_JOIN_METHOD_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_NAME_MAX = 256

_STR_TAG = "tag:yaml.org,2002:str"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


class TokenFileError(ConfigError):
    """A token file is wrong; the message starts with ``file:line:``.

    A ``gateway.core.config.ConfigError``, so everything that handles a bad config (startup,
    ``check-config``, the SIGHUP reload that keeps the old tokens) handles it too."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class ProvisionToken:
    name: str
    roles: tuple[str, ...]
    join_method: str
    allow: tuple[AllowRule, ...] = ()
    expires: datetime | None = None  # aware, UTC
    source: str = ""  # "file:line", for the audit log and error messages
    # spec.azure.labels_from_tags: VM tags forwarded as ``azure/tag/<name>`` labels
    # (names as the token spells them), and where the list is ("file:line").
    labels_from_tags: tuple[str, ...] = ()
    labels_from_tags_source: str = ""


class TokenRegistry:
    """Tokens by name, as loaded from the token files (an immutable snapshot: a reload
    builds a new registry and swaps it in)."""

    def __init__(self, tokens: Mapping[str, ProvisionToken]) -> None:
        self._tokens = dict(tokens)

    def get(self, name: str) -> ProvisionToken:
        token = self._tokens.get(name)
        if token is None:
            raise UnknownToken(f"no token named {name[:100]!r}")
        return token

    def names(self) -> list[str]:
        return sorted(self._tokens)

    def __contains__(self, name: object) -> bool:
        return name in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def __iter__(self) -> Iterator[ProvisionToken]:
        return iter(self._tokens.values())

    def __repr__(self) -> str:
        return f"<TokenRegistry {len(self._tokens)} tokens>"


# -- loading ----------------------------------------------------------------------------


class _Doc:
    """Walks one YAML document's node tree, raising ``ConfigError`` with file:line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, node: Node, message: str) -> ConfigError:
        return TokenFileError(self.path, node.start_mark.line + 1, message)

    def mapping(self, node: Node, where: str, allowed: frozenset[str]) -> dict[str, Node]:
        if not isinstance(node, MappingNode):
            raise self.error(node, f"{where} must be a mapping")
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STR_TAG:
                raise self.error(key_node, f"{where}: keys must be strings")
            key = str(key_node.value)
            if key in out:
                raise self.error(key_node, f"{where}: duplicate key {key!r}")
            if key not in allowed:
                raise self.error(
                    key_node,
                    f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})",
                )
            out[key] = value_node
        return out

    def string(self, node: Node, where: str) -> str:
        if not isinstance(node, ScalarNode) or node.tag != _STR_TAG:
            raise self.error(node, f"{where} must be a string")
        value = str(node.value)
        if not value.strip():
            raise self.error(node, f"{where} must not be empty")
        return value

    def strings(self, node: Node, where: str) -> tuple[str, ...]:
        if not isinstance(node, SequenceNode):
            raise self.error(node, f"{where} must be a list")
        return tuple(self.string(item, f"{where}[{i}]") for i, item in enumerate(node.value))

    def guid(self, node: Node, where: str) -> str:
        value = normalize_guid(self.string(node, where))
        if value is None:
            raise self.error(node, f"{where} must be a GUID")
        return value

    def timestamp(self, node: Node, where: str) -> datetime:
        if isinstance(node, ScalarNode) and node.tag == _TIMESTAMP_TAG:
            loader = yaml.SafeLoader("")
            try:
                value = loader.construct_object(node, deep=True)
            finally:
                loader.dispose()
        else:
            text = self.string(node, where)
            try:
                value = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise self.error(node, f"{where} must be an RFC 3339 timestamp") from None
        if isinstance(value, date) and not isinstance(value, datetime):
            value = datetime(value.year, value.month, value.day)
        if not isinstance(value, datetime):
            raise self.error(node, f"{where} must be an RFC 3339 timestamp")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _globs(doc: _Doc, node: Node, where: str, key: str) -> tuple[Glob, ...]:
    values = doc.strings(node, where)
    if not values:
        raise doc.error(node, f"{where} must not be empty (leave the key out instead)")
    for value in values:
        if len(value) > _GLOB_MAX[key]:
            raise doc.error(node, f"{where}: {value[:40]!r}… is longer than Azure allows")
    return tuple(Glob(v) for v in values)


def _tags(doc: _Doc, node: Node, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(node, MappingNode) or not node.value:
        raise doc.error(node, f"{where} must be a non-empty mapping of tag name to values")
    out: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = doc.string(key_node, f"{where} key")
        if len(key) > 512:
            raise doc.error(key_node, f"{where}: a tag name is at most 512 characters")
        if azure_name_key(key) in seen:
            raise doc.error(key_node, f"{where}: duplicate tag {key!r} (tag names ignore case)")
        seen.add(azure_name_key(key))
        if isinstance(value_node, SequenceNode):
            values = doc.strings(value_node, f"{where}.{key}")
            if not values:
                raise doc.error(value_node, f"{where}.{key} must not be an empty list")
        else:
            values = (doc.string(value_node, f"{where}.{key}"),)
        out.append((key, values))
    return tuple(out)


def _labels_from_tags(doc: _Doc, node: Node, where: str) -> tuple[str, ...]:
    """Tag names, each a name Azure allows, no two equal as Azure compares tag names."""
    names = doc.strings(node, where)
    assert isinstance(node, SequenceNode)  # doc.strings refused anything else
    if not names:
        raise doc.error(node, f"{where} must not be empty (leave the key out instead)")
    if len(names) > MAX_TAG_LABELS:
        raise doc.error(node, f"{where}: a VM has at most {MAX_TAG_LABELS} tags")
    seen: set[str] = set()
    for i, name in enumerate(names):
        problem = tag_name_problem(name)
        if problem is not None:
            raise doc.error(node.value[i], f"{where}[{i}]: {problem}")
        if azure_name_key(name) in seen:
            raise doc.error(
                node.value[i], f"{where}: duplicate tag {name!r} (tag names ignore case)"
            )
        seen.add(azure_name_key(name))
    return names


def _parse_rule(doc: _Doc, node: Node, where: str) -> AllowRule:
    fields = doc.mapping(node, where, _RULE_KEYS)
    subscription = (
        doc.guid(fields["subscription"], f"{where}.subscription")
        if "subscription" in fields
        else None
    )
    tenant = doc.guid(fields["tenant"], f"{where}.tenant") if "tenant" in fields else None
    if subscription is None and tenant is None:
        # A rule with neither would admit every VM of every tenant that can reach us.
        raise doc.error(node, f"{where}: a rule must set subscription or tenant")
    globs = {
        key: _globs(doc, fields[key], f"{where}.{key}", key)
        for key in ("resource_groups", "scale_sets", "vm_names")
        if key in fields
    }
    locations: tuple[str, ...] = ()
    if "locations" in fields:
        locations = doc.strings(fields["locations"], f"{where}.locations")
        bad = [loc for loc in locations if not _LOCATION_RE.fullmatch(loc)]
        if bad or not locations:
            raise doc.error(fields["locations"], f"{where}.locations: not Azure regions: {bad}")
    identities: tuple[str, ...] = ()
    if "identities" in fields:
        seq = fields["identities"]
        if not isinstance(seq, SequenceNode) or not seq.value:
            raise doc.error(seq, f"{where}.identities must be a non-empty list of GUIDs")
        identities = tuple(
            doc.guid(item, f"{where}.identities[{i}]") for i, item in enumerate(seq.value)
        )
    tags = _tags(doc, fields["tags"], f"{where}.tags") if "tags" in fields else ()
    return AllowRule(
        subscription=subscription,
        tenant=tenant,
        resource_groups=globs.get("resource_groups", ()),
        scale_sets=globs.get("scale_sets", ()),
        vm_names=globs.get("vm_names", ()),
        locations=locations,
        identities=identities,
        tags=tags,
        source=f"{doc.path}:{node.start_mark.line + 1}",
    )


def _parse_token(doc: _Doc, node: Node) -> ProvisionToken:
    top = doc.mapping(node, "token", _TOP_KEYS)
    for key in ("kind", "version", "metadata", "spec"):
        if key not in top:
            raise doc.error(node, f"token: missing {key!r}")
    kind = doc.string(top["kind"], "kind")
    if kind != "token":
        raise doc.error(top["kind"], f"kind must be 'token', not {kind!r}")
    version = doc.string(top["version"], "version")
    if version != "v2":
        raise doc.error(top["version"], f"version must be 'v2', not {version!r}")

    meta = doc.mapping(top["metadata"], "metadata", _METADATA_KEYS)
    if "name" not in meta:
        raise doc.error(top["metadata"], "metadata: missing 'name'")
    name = doc.string(meta["name"], "metadata.name")
    if len(name) > _NAME_MAX:
        raise doc.error(meta["name"], f"metadata.name is longer than {_NAME_MAX} characters")
    expires = doc.timestamp(meta["expires"], "metadata.expires") if "expires" in meta else None

    spec = doc.mapping(top["spec"], "spec", _SPEC_KEYS)
    if "roles" not in spec:
        raise doc.error(top["spec"], "spec: missing 'roles'")
    roles_node = spec["roles"]
    if not isinstance(roles_node, SequenceNode) or not roles_node.value:
        raise doc.error(roles_node, "spec.roles must be a non-empty list")
    roles: list[str] = []
    for i, item in enumerate(roles_node.value):
        raw = doc.string(item, f"spec.roles[{i}]")
        role = canonical_role(raw)
        if role is None:
            raise doc.error(
                item, f"spec.roles[{i}]: unknown role {raw!r} (one of {', '.join(TOKEN_ROLES)})"
            )
        if role not in roles:
            roles.append(role)

    # Teleport's default join method for a v2 token is "token".
    join_method = "token"
    if "join_method" in spec:
        join_method = doc.string(spec["join_method"], "spec.join_method")
        if not _JOIN_METHOD_RE.fullmatch(join_method):
            raise doc.error(spec["join_method"], f"spec.join_method {join_method!r} is malformed")

    allow: tuple[AllowRule, ...] = ()
    allow_where: Node = spec.get("azure", top["spec"])
    labels_from_tags: tuple[str, ...] = ()
    labels_source = ""
    if "azure" in spec:
        azure = doc.mapping(spec["azure"], "spec.azure", _AZURE_KEYS)
        if "labels_from_tags" in azure:
            labels_node = azure["labels_from_tags"]
            labels_from_tags = _labels_from_tags(doc, labels_node, "spec.azure.labels_from_tags")
            labels_source = f"{doc.path}:{labels_node.start_mark.line + 1}"
        if "allow" not in azure:
            raise doc.error(spec["azure"], "spec.azure: missing 'allow'")
        rules_node = allow_where = azure["allow"]
        if not isinstance(rules_node, SequenceNode):
            raise doc.error(rules_node, "spec.azure.allow must be a list")
        allow = tuple(
            _parse_rule(doc, item, f"spec.azure.allow[{i}]")
            for i, item in enumerate(rules_node.value)
        )
    if join_method == "azure" and not allow:
        raise doc.error(allow_where, "an azure token needs at least one spec.azure.allow rule")
    return ProvisionToken(
        name=name,
        roles=tuple(roles),
        join_method=join_method,
        allow=allow,
        expires=expires,
        source=f"{doc.path}:{node.start_mark.line + 1}",
        labels_from_tags=labels_from_tags,
        labels_from_tags_source=labels_source,
    )


def _load_file(path: Path) -> list[ProvisionToken]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(path, None, f"cannot read token file: {exc}") from exc
    doc = _Doc(path)
    tokens: list[ProvisionToken] = []
    try:
        for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
            if node is None:
                continue
            # An empty document between two '---' composes to a null scalar.
            if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null":
                continue
            tokens.append(_parse_token(doc, node))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise TokenFileError(path, line, f"not valid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise TokenFileError(path, None, f"not valid YAML: {exc}") from exc
    return tokens


def load_token_files(paths: Sequence[Path], *, vm_binding: bool = True) -> TokenRegistry:
    """Load every token of every file; any problem is a ``ConfigError`` with file:line.

    With ``vm_binding=False`` a rule that needs Resource Manager's data (locations,
    scale_sets, vm_names, tags) is an error naming that rule: it could never match; so is
    ``labels_from_tags`` (no tag could ever be read), naming the token."""
    tokens: dict[str, ProvisionToken] = {}
    for path in paths:
        for token in _load_file(Path(path)):
            first = tokens.get(token.name)
            if first is not None:
                file, _, line = token.source.rpartition(":")
                raise TokenFileError(
                    file,
                    int(line),
                    f"duplicate token name {token.name!r} (first defined at {first.source})",
                )
            tokens[token.name] = token
    registry = TokenRegistry(tokens)
    if not vm_binding:
        for token in registry:
            for i, rule in enumerate(token.allow):
                if rule.needs_arm:
                    file, _, line = rule.source.rpartition(":")
                    arm = ", ".join(f for f in rule.fields if f in ARM_FIELDS)
                    raise TokenFileError(
                        file,
                        int(line),
                        f"token {token.name!r} allow rule {i} uses {arm}, which come from "
                        "Resource Manager: set azure.vm_binding: true or drop the field",
                    )
            if token.labels_from_tags:
                file, _, line = token.labels_from_tags_source.rpartition(":")
                raise TokenFileError(
                    file,
                    int(line),
                    f"token {token.name!r} spec.azure.labels_from_tags needs the VM's tags, "
                    "which come from Resource Manager: set azure.vm_binding: true or drop it",
                )
    logger.info("loaded %d tokens from %d files", len(tokens), len(paths))
    return registry


# -- checks at join time ------------------------------------------------------------------


def check_token(token: ProvisionToken, *, role: str, now: datetime) -> None:
    """DESIGN §3 step 3: the token is for azure, unexpired, and grants ``role``."""
    if token.join_method != "azure":
        raise JoinRejected(
            Code.TOKEN_WRONG_METHOD,
            f"token {token.name!r} has join_method {token.join_method!r}, not azure",
        )
    if token.expires is not None and now >= token.expires:
        raise JoinRejected(
            Code.TOKEN_EXPIRED, f"token {token.name!r} expired at {token.expires.isoformat()}"
        )
    canonical = canonical_role(role) if isinstance(role, str) else None
    if canonical is None or canonical not in token.roles:
        raise JoinRejected(
            Code.ROLE_NOT_ALLOWED, f"token {token.name!r} does not grant role {role[:50]!r}"
        )


def match_allow_rules(token: ProvisionToken, facts: VmFacts) -> AllowRule:
    """The first rule of ``token`` that admits this VM; ``JoinRejected(NOT_ALLOWED)`` if none.

    ``facts`` must be complete for the fields the rules use (after Resource Manager); a
    rule still ``UNKNOWN`` then does not admit. The detail (audit log only) names, for each
    rule, the first field that did not match."""
    index, checks = evaluate(token.allow, facts)
    if index is not None:
        return token.allow[index]
    raise JoinRejected(Code.NOT_ALLOWED, _why_not(token, checks))


def could_any_rule_match(token: ProvisionToken, facts: VmFacts) -> bool:
    """False when no rule of ``token`` can admit a VM with these (partial) facts: the
    cheap refusal before any Resource Manager call."""
    return any(rule.check(facts).verdict is not Verdict.NO_MATCH for rule in token.allow)


def refuse_unless_any_rule_can_match(token: ProvisionToken, facts: VmFacts) -> None:
    checks = [rule.check(facts) for rule in token.allow]
    if all(c.verdict is Verdict.NO_MATCH for c in checks):
        raise JoinRejected(Code.NOT_ALLOWED, _why_not(token, checks))


def _why_not(token: ProvisionToken, checks: list[RuleCheck]) -> str:
    parts = [
        f"rule {i}: {c.field} {c.actual!r}" if c.verdict is Verdict.NO_MATCH
        else f"rule {i}: {c.field} unknown"
        for i, c in enumerate(checks)
    ]
    return f"no allow rule of token {token.name!r} matches ({'; '.join(parts)})"
