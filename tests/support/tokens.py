"""Token files for tests, in the seed's format (DESIGN §7)."""

from __future__ import annotations

SUBSCRIPTION = "11111111-1111-1111-1111-111111111111"


def azure_token_yaml(
    subscription: str = SUBSCRIPTION,
    *,
    name: str = "azure-token",
    resource_groups: tuple[str, ...] = (),
) -> str:
    """One azure token for the ``Node`` role allowing one subscription (all of it, or only
    ``resource_groups``)."""
    groups = f"\n        resource_groups: [{', '.join(resource_groups)}]" if resource_groups else ""
    return f"""\
kind: token
version: v2
metadata:
  name: {name}
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
      - subscription: {subscription}{groups}
"""


def refusal_tokens_yaml(subscription: str = SUBSCRIPTION) -> str:
    """Two tokens a join must be refused with: one of another join method
    (``static-token``) and one past its expiry (``expired-token``)."""
    return f"""\
kind: token
version: v2
metadata:
  name: static-token
spec:
  roles: [Node]
  join_method: token
---
kind: token
version: v2
metadata:
  name: expired-token
  expires: "2020-01-01T00:00:00Z"
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
      - subscription: {subscription}
"""
