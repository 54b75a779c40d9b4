"""Token files in the seed's format, token checks and allow-rule matching."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.core.errors import Code, JoinRejected, UnknownToken
from gateway.join.rules import (
    AllowRule,
    ConfigError,
    ProvisionToken,
    check_token,
    load_token_files,
    match_allow_rules,
)

# DESIGN §7, byte for byte: operators' files must load unchanged.
SEED_TOKEN = """\
# token.yaml — the token's name is not a secret: joiners must prove where they run
kind: token
version: v2
metadata:
  name: azure-token
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
      - subscription: 11111111-1111-1111-1111-111111111111
      - subscription: 33333333-3333-3333-3333-333333333333
        resource_groups: ["group1", "group2"]
      - tenant: 44444444-4444-4444-4444-444444444444   # any subscription of this tenant
"""

SUB1 = "11111111-1111-1111-1111-111111111111"
SUB3 = "33333333-3333-3333-3333-333333333333"
TENANT4 = "44444444-4444-4444-4444-444444444444"
TENANT_X = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SUB_X = "55555555-5555-5555-5555-555555555555"
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def write(tmp_path: Path, text: str, name: str = "token.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_the_seed_token_file_loads_unchanged(tmp_path: Path) -> None:
    registry = load_token_files([write(tmp_path, SEED_TOKEN)])
    token = registry.get("azure-token")
    assert token.roles == ("Node",)
    assert token.join_method == "azure"
    assert token.expires is None
    assert token.allow == (
        AllowRule(subscription=SUB1),
        AllowRule(subscription=SUB3, resource_groups=("group1", "group2")),
        AllowRule(tenant=TENANT4),
    )
    assert token.source.endswith("token.yaml:2")


def test_several_documents_and_files_load(tmp_path: Path) -> None:
    a = write(
        tmp_path,
        SEED_TOKEN
        + """\
---
kind: token
version: v2
metadata:
  name: iam-token
  expires: "2030-01-01T00:00:00Z"
spec:
  roles: [Node, Proxy]
  join_method: iam
  allow:
    - aws_account: "123456789012"
---
""",
        "a.yaml",
    )
    b = write(
        tmp_path,
        """\
        kind: token
        version: v2
        metadata:
          name: pool
          expires: 2027-01-01T00:00:00Z
          labels: {team: infra}
        spec:
          roles: [node, db]
          join_method: azure
          azure:
            allow:
              - tenant: 44444444-4444-4444-4444-444444444444
                subscription: 33333333-3333-3333-3333-333333333333
        """,
        "b.yaml",
    )
    registry = load_token_files([a, b])
    assert registry.names() == ["azure-token", "iam-token", "pool"]
    assert registry.get("iam-token").join_method == "iam"
    assert registry.get("iam-token").expires == datetime(2030, 1, 1, tzinfo=UTC)
    assert registry.get("pool").roles == ("Node", "Db")
    assert registry.get("pool").expires == datetime(2027, 1, 1, tzinfo=UTC)


def test_an_unknown_token_is_a_404(tmp_path: Path) -> None:
    registry = load_token_files([write(tmp_path, SEED_TOKEN)])
    with pytest.raises(UnknownToken) as info:
        registry.get("nope")
    assert info.value.code == Code.UNKNOWN_TOKEN


def seed_with(old: str, new: str) -> str:
    assert old in SEED_TOKEN
    return SEED_TOKEN.replace(old, new)


# (id, file text, line the error must name, words it must contain)
BAD_FILES: list[tuple[str, str, int | None, str]] = [
    ("an unknown top-level key", SEED_TOKEN + "extra: 1\n", 15, "unknown key 'extra'"),
    (
        "an unknown key in an allow rule",
        seed_with("- tenant: 4", "- tennant: 4"),
        14,
        "unknown key 'tennant'",
    ),
    (
        "a misspelt spec key",
        seed_with("join_method:", "joinmethod:"),
        8,
        "unknown key 'joinmethod'",
    ),
    ("an unknown azure key", seed_with("    allow:", "    allowed:"), 10, "unknown key 'allowed'"),
    (
        "a rule with neither subscription nor tenant",
        seed_with("- tenant: 44444444-4444-4444-4444-444444444444", "- resource_groups: [g]"),
        14,
        "subscription or tenant",
    ),
    (
        "a subscription that is not a GUID",
        seed_with("- subscription: 11111111-1111-1111-1111-111111111111", "- subscription: prod"),
        11,
        "GUID",
    ),
    (
        "a tenant that is not a GUID",
        seed_with("- tenant: 44444444-4444-4444-4444-444444444444", "- tenant: contoso.com"),
        14,
        "GUID",
    ),
    (
        "a numeric subscription",
        seed_with("- subscription: 11111111-1111-1111-1111-111111111111", "- subscription: 12"),
        11,
        "string",
    ),
    ("an unknown role", seed_with("roles: [Node]", "roles: [Nodes]"), 7, "unknown role 'Nodes'"),
    ("an empty role list", seed_with("roles: [Node]", "roles: []"), 7, "non-empty"),
    (
        "a role list that is a string",
        seed_with("roles: [Node]", "roles: Node"),
        7,
        "non-empty list",
    ),
    ("another kind", seed_with("kind: token", "kind: role"), 2, "kind must be 'token'"),
    ("another version", seed_with("version: v2", "version: v1"), 3, "version must be 'v2'"),
    ("no name", seed_with("  name: azure-token\n", "  description: x\n"), 5, "missing 'name'"),
    (
        "an azure token without rules",
        SEED_TOKEN.split("      - subscription")[0] + "      []\n",
        11,
        "at least one",
    ),
    (
        "resource groups that are not a list",
        seed_with('resource_groups: ["group1", "group2"]', "resource_groups: group1"),
        13,
        "must be a list",
    ),
    (
        "a duplicate key",
        seed_with("  join_method: azure\n", "  join_method: azure\n  join_method: iam\n"),
        9,
        "duplicate key",
    ),
    (
        "an expiry that is not a date",
        seed_with("  name: azure-token\n", "  name: azure-token\n  expires: soon\n"),
        6,
        "timestamp",
    ),
    ("an azure token without an azure block", SEED_TOKEN.split("  azure:")[0], 7, "at least one"),
    (
        "YAML that does not parse",
        seed_with("roles: [Node]", "roles: [Node"),
        None,
        "not valid YAML",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "words"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES]
)
def test_bad_token_files_fail_naming_file_and_line(
    tmp_path: Path, text: str, line: int | None, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_token_files([path])
    assert info.value.path == str(path)
    if line is not None:
        assert info.value.line == line
        assert str(info.value).startswith(f"{path}:{line}: ")
    assert words in str(info.value)


def test_a_duplicate_token_name_across_files_names_both(tmp_path: Path) -> None:
    a = write(tmp_path, SEED_TOKEN, "a.yaml")
    b = write(tmp_path, SEED_TOKEN, "b.yaml")
    with pytest.raises(ConfigError) as info:
        load_token_files([a, b])
    assert str(info.value).startswith(f"{b}:2: ")
    assert f"{a}:2" in str(info.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_token_files([tmp_path / "missing.yaml"])
    assert "missing.yaml" in str(info.value)


def token(**kw: object) -> ProvisionToken:
    base: dict[str, object] = {
        "name": "t",
        "roles": ("Node",),
        "join_method": "azure",
        "allow": (AllowRule(subscription=SUB1),),
        "expires": None,
    }
    base.update(kw)
    return ProvisionToken(**base)  # type: ignore[arg-type]


CHECKS: list[tuple[str, ProvisionToken, str, Code | None]] = [
    ("an azure token grants its role", token(), "Node", None),
    ("the role is matched case-insensitively", token(), "node", None),
    (
        "a token of another join method is refused",
        token(join_method="iam"),
        "Node",
        Code.TOKEN_WRONG_METHOD,
    ),
    (
        "an expired token is refused",
        token(expires=datetime(2026, 11, 24, 11, 59, tzinfo=UTC)),
        "Node",
        Code.TOKEN_EXPIRED,
    ),
    (
        "a token expiring this very second is refused",
        token(expires=NOW),
        "Node",
        Code.TOKEN_EXPIRED,
    ),
    (
        "a token expiring later is accepted",
        token(expires=datetime(2026, 11, 24, 12, 1, tzinfo=UTC)),
        "Node",
        None,
    ),
    ("a role the token does not grant is refused", token(), "Proxy", Code.ROLE_NOT_ALLOWED),
    ("a role Teleport does not know is refused", token(), "Admin", Code.ROLE_NOT_ALLOWED),
]


@pytest.mark.parametrize(
    ("tok", "role", "expected"), [c[1:] for c in CHECKS], ids=[c[0] for c in CHECKS]
)
def test_check_token(tok: ProvisionToken, role: str, expected: Code | None) -> None:
    if expected is None:
        check_token(tok, role=role, now=NOW)
    else:
        with pytest.raises(JoinRejected) as info:
            check_token(tok, role=role, now=NOW)
        assert info.value.code == expected


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> ProvisionToken:
    path = tmp_path_factory.mktemp("seed") / "token.yaml"
    path.write_text(SEED_TOKEN, encoding="utf-8")
    return load_token_files([path]).get("azure-token")


# (id, tenant, subscription, resource group, index of the rule that must match | None)
MATCHES: list[tuple[str, str, str, str, int | None]] = [
    ("a listed subscription matches any group", TENANT_X, SUB1, "anything", 0),
    ("a subscription in upper case matches", TENANT_X, SUB1.upper(), "rg", 0),
    ("a group-restricted subscription matches a listed group", TENANT_X, SUB3, "group2", 1),
    ("resource groups compare case-insensitively", TENANT_X, SUB3, "GROUP1", 1),
    ("a group-restricted subscription refuses other groups", TENANT_X, SUB3, "group3", None),
    ("a tenant rule matches any subscription of the tenant", TENANT4, SUB_X, "rg", 2),
    ("a tenant in upper case matches", TENANT4.upper(), SUB_X, "rg", 2),
    ("the first matching rule wins", TENANT4, SUB1, "rg", 0),
    ("a tenant rule rescues a group the subscription rule refuses", TENANT4, SUB3, "group3", 2),
    ("an unlisted tenant and subscription are refused", TENANT_X, SUB_X, "rg", None),
]


@pytest.mark.parametrize(
    ("tenant", "sub", "group", "index"), [m[1:] for m in MATCHES], ids=[m[0] for m in MATCHES]
)
def test_match_allow_rules(
    seed: ProvisionToken, tenant: str, sub: str, group: str, index: int | None
) -> None:
    if index is None:
        with pytest.raises(JoinRejected) as info:
            match_allow_rules(seed, tenant=tenant, subscription=sub, resource_group=group)
        assert info.value.code == Code.NOT_ALLOWED
    else:
        rule = match_allow_rules(seed, tenant=tenant, subscription=sub, resource_group=group)
        assert rule is seed.allow[index]


# (id, the rule's group, the VM's group, matches?) — Resource Manager folds ASCII case
# only; Python's lower()/casefold() fold all of these onto the rule's name.
HOSTILE_GROUPS: list[tuple[str, str, str, bool]] = [
    ("ASCII case still folds", "kube", "KuBe", True),
    ("a Kelvin sign is not k", "kube", "\u212aube", False),
    ("a Kelvin sign rule does not admit k", "\u212aube", "kube", False),
    ("a long s is not s", "prod-east", "prod-ea\u017ft", False),
    ("a dotless i is not i", "infra", "\u0131nfra", False),
    ("a capital I with dot is not i", "infra", "\u0130nfra", False),
    ("a sharp s is not ss", "strasse", "stra\u00dfe", False),
    ("ss is not a sharp s", "stra\u00dfe", "strasse", False),
    ("a capital sharp s is not a sharp s", "stra\u00dfe", "STRA\u1e9eE", False),
    ("fullwidth letters are not ASCII letters", "kube", "\uff4b\uff55\uff42\uff45", False),
    ("fullwidth capitals are not fullwidth lowercase", "\uff4bube", "\uff2bube", False),
    ("a non-ASCII name matches itself exactly", "stra\u00dfe", "stra\u00dfe", True),
    ("a non-ASCII name folds only its ASCII letters", "stra\u00dfe", "STRA\u00dfE", True),
]


@pytest.mark.parametrize(
    ("rule_group", "vm_group", "matches"),
    [h[1:] for h in HOSTILE_GROUPS],
    ids=[h[0] for h in HOSTILE_GROUPS],
)
def test_resource_groups_compare_as_azure_compares_them(
    rule_group: str, vm_group: str, matches: bool
) -> None:
    tok = token(allow=(AllowRule(subscription=SUB3, resource_groups=(rule_group,)),))
    if matches:
        assert match_allow_rules(tok, tenant=TENANT4, subscription=SUB3, resource_group=vm_group)
    else:
        with pytest.raises(JoinRejected) as info:
            match_allow_rules(tok, tenant=TENANT4, subscription=SUB3, resource_group=vm_group)
        assert info.value.code == Code.NOT_ALLOWED


def test_a_rule_with_tenant_and_subscription_needs_both() -> None:
    tok = token(allow=(AllowRule(subscription=SUB3, tenant=TENANT4),))
    assert match_allow_rules(tok, tenant=TENANT4, subscription=SUB3, resource_group="g")
    for tenant, sub in ((TENANT_X, SUB3), (TENANT4, SUB1)):
        with pytest.raises(JoinRejected) as info:
            match_allow_rules(tok, tenant=tenant, subscription=sub, resource_group="g")
        assert info.value.code == Code.NOT_ALLOWED
