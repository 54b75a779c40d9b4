"""The join agent: runs on the VM, proves where it runs, and collects its certificates.

``run_join(settings)`` is one join; ``NodeAgent`` keeps the node joined (renewal by re-join);
``ImdsClient`` and ``GatewayClient`` are the protocol pieces the demo and the join-storm
benchmark reuse with their own sessions and URLs.
"""

from __future__ import annotations

from gateway.agent.backoff import Backoff, parse_retry_after
from gateway.agent.client import GatewayClient, HostParams, build_join_body
from gateway.agent.errors import (
    AgentCode,
    AgentError,
    ImdsError,
    JoinError,
    JoinFailed,
    KeyFileError,
    NodeConfigError,
)
from gateway.agent.identity import Identity, load_identity
from gateway.agent.imds import ImdsClient
from gateway.agent.intermediates import IntermediateCollector
from gateway.agent.keys import NodeKeys, load_or_create_keys
from gateway.agent.nodeconfig import AgentSettings, load_node_config, parse_node_config
from gateway.agent.renew import NodeAgent, plan_delay
from gateway.agent.runner import JoinInfo, JoinOutcome, run_join, spki_pin
from gateway.agent.transport import make_session, make_ssl_context

__all__ = [
    "AgentCode",
    "AgentError",
    "AgentSettings",
    "Backoff",
    "GatewayClient",
    "HostParams",
    "Identity",
    "ImdsClient",
    "ImdsError",
    "IntermediateCollector",
    "JoinError",
    "JoinFailed",
    "JoinInfo",
    "JoinOutcome",
    "KeyFileError",
    "NodeAgent",
    "NodeConfigError",
    "NodeKeys",
    "build_join_body",
    "load_identity",
    "load_node_config",
    "load_or_create_keys",
    "make_session",
    "make_ssl_context",
    "parse_node_config",
    "parse_retry_after",
    "plan_delay",
    "run_join",
    "spki_pin",
]
