"""The auth service's admin API: the inventory of hosts and the locks, over mTLS.

Same listener as the registration API, different caller: only the *admin* client
certificate (``auth init`` writes it beside the gateways' one, signed by the same client
CA, with its own subject) may call ``/v1/admin/…``, and the admin certificate may not
register nodes. ``join-gateway nodes …`` is the client (gateway/authservice/nodes_cli.py).

=========================================  =============================================
``GET    /v1/admin/nodes[?stale=SECONDS]``  hosts (those not renewed for SECONDS, with
``[&label=KEY=VALUE …]``                    ``stale``; carrying every ``label`` given),
                                            each with its ``labels`` and ``locked`` when
                                            a lock in force matches it
``GET    /v1/admin/nodes/{host_id}``        one host
``DELETE /v1/admin/nodes/{host_id}``        remove a host (its VM joins again as new)
``POST   /v1/admin/prune``                  ``{"stale_seconds": N}``: remove every host
                                            not renewed for N seconds
``GET    /v1/admin/locks``                  the locks in force
``POST   /v1/admin/locks``                  ``{"target", "value", "reason",
                                            "ttl_seconds"?}``
``DELETE /v1/admin/locks/{lock_id}``        remove a lock
=========================================  =============================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from gateway.authservice.authority import ADMIN_COMMON_NAME
from gateway.authservice.registry import HostRecord, Lock, LockTarget, Registry
from gateway.authservice.wire import AuthServiceError, ErrorCode
from gateway.core.clock import Clock

__all__ = [
    "ADMIN_COMMON_NAME",
    "AdminError",
    "add_admin_routes",
    "host_json",
    "lock_json",
    "peer_common_name",
]

log = logging.getLogger(__name__)

_MAX_BODY = 16 * 1024
_MAX_REASON = 500

ADMIN_REGISTRY_KEY = web.AppKey("admin_registry", Registry)
ADMIN_CLOCK_KEY = web.AppKey("admin_clock", Clock)


# A refused admin request, rendered by the auth service's one error middleware.
AdminError = AuthServiceError


def peer_common_name(request: web.Request) -> str:
    """The calling client certificate's subject CN ("" when there is none)."""
    transport = request.transport
    peer: Any = transport.get_extra_info("peercert") if transport is not None else None
    for rdn in (peer or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return ""


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def host_json(host: HostRecord, *, locked_by: Lock | None) -> dict[str, Any]:
    return {
        "host_id": host.host_id,
        "node_name": host.node_name,
        "role": host.role,
        "token_name": host.token_name,
        "tenant": host.tenant,
        "subscription": host.subscription,
        "resource_group": host.resource_group,
        "resource_id": host.resource_id,
        "vm_name": host.resource_id.rsplit("/", 1)[-1],
        "vm_id": host.vm_id,
        "first_joined": _iso(host.first_joined),
        "last_renewed": _iso(host.last_renewed),
        "cert_expiry": _iso(host.cert_expiry),
        "renewals": host.renewals,
        "labels": dict(sorted(host.labels.items())),
        "locked": locked_by is not None,
        "lock_id": locked_by.lock_id if locked_by else None,
        "lock_reason": locked_by.reason if locked_by else None,
    }


def lock_json(lock: Lock) -> dict[str, Any]:
    return {
        "lock_id": lock.lock_id,
        "target": str(lock.target),
        "value": lock.value,
        "reason": lock.reason,
        "created_at": _iso(lock.created_at),
        "expires_at": _iso(lock.expires_at),
    }


def _lock_for(host: HostRecord, locks: list[Lock]) -> Lock | None:
    for lock in locks:
        value = {
            LockTarget.HOST: host.host_id,
            LockTarget.VM_ID: host.vm_id,
            LockTarget.SUBSCRIPTION: host.subscription,
            LockTarget.TOKEN: host.token_name,
        }[lock.target]
        if lock.value == (value if lock.target is LockTarget.TOKEN else value.lower()):
            return lock
    return None


def _seconds(value: object, what: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise AdminError(400, "invalid_request", f"{what} must be a number of seconds") from None
    if not seconds > 0 or seconds > 10 * 365 * 86400:
        raise AdminError(400, "invalid_request", f"{what} must be positive (at most 10 years)")
    return seconds


def _label_filter(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may be empty; the key may not): labels compare exactly."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise AdminError(400, "invalid_request", "label must be KEY=VALUE")
    return key, value


async def _body(request: web.Request) -> Mapping[str, Any]:
    if request.content_type != "application/json":
        raise AdminError(415, "unsupported_media_type", "Content-Type must be application/json")
    # Up to the end of the body: ``content.read(n)`` alone returns what has arrived so far.
    raw = bytearray()
    while len(raw) <= _MAX_BODY and (chunk := await request.content.read(_MAX_BODY + 1 - len(raw))):
        raw += chunk
    if len(raw) > _MAX_BODY:
        raise AdminError(413, "body_too_large", "body exceeds 16 KiB")
    try:
        data = json.loads(raw)
    except ValueError:
        raise AdminError(400, "malformed_body", "body is not JSON") from None
    if not isinstance(data, dict):
        raise AdminError(400, "malformed_body", "body is not a JSON object")
    return data


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _admin_only(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if peer_common_name(request) != ADMIN_COMMON_NAME:
            raise AdminError(403, ErrorCode.FORBIDDEN, "the admin API needs the admin certificate")
        try:
            return await handler(request)
        except AdminError:
            raise
        except ValueError as exc:  # the registry's own argument checks
            raise AdminError(400, "invalid_request", str(exc)) from None

    return wrapped


async def _nodes(request: web.Request) -> web.StreamResponse:
    registry, now = request.app[ADMIN_REGISTRY_KEY], request.app[ADMIN_CLOCK_KEY].now()
    hosts = await registry.hosts()
    if "stale" in request.query:
        cutoff = now - timedelta(seconds=_seconds(request.query["stale"], "stale"))
        hosts = [h for h in hosts if h.last_renewed < cutoff]
    wanted = [_label_filter(text) for text in request.query.getall("label", [])]
    hosts = [h for h in hosts if all(h.labels.get(k) == v for k, v in wanted)]
    locks = await registry.locks(now=now)
    return web.json_response(
        {"nodes": [host_json(h, locked_by=_lock_for(h, locks)) for h in hosts]}
    )


async def _node(request: web.Request) -> web.StreamResponse:
    registry, now = request.app[ADMIN_REGISTRY_KEY], request.app[ADMIN_CLOCK_KEY].now()
    host = await registry.host(request.match_info["host_id"])
    if host is None:
        raise AdminError(404, "not_found", "no such host")
    return web.json_response(
        host_json(host, locked_by=_lock_for(host, await registry.locks(now=now)))
    )


async def _remove_node(request: web.Request) -> web.StreamResponse:
    registry, now = request.app[ADMIN_REGISTRY_KEY], request.app[ADMIN_CLOCK_KEY].now()
    host_id = request.match_info["host_id"]
    if not await registry.remove_host(host_id, now=now):
        raise AdminError(404, "not_found", "no such host")
    log.info("admin: host %s removed by %s", host_id, peer_common_name(request))
    return web.json_response({"removed": [host_id]})


async def _prune(request: web.Request) -> web.StreamResponse:
    registry, now = request.app[ADMIN_REGISTRY_KEY], request.app[ADMIN_CLOCK_KEY].now()
    body = await _body(request)
    cutoff = now - timedelta(seconds=_seconds(body.get("stale_seconds"), "stale_seconds"))
    removed = await registry.prune(stale_before=cutoff, now=now)
    log.info("admin: pruned %s hosts not renewed since %s", len(removed), cutoff.isoformat())
    return web.json_response({"removed": removed})


async def _locks(request: web.Request) -> web.StreamResponse:
    registry, now = request.app[ADMIN_REGISTRY_KEY], request.app[ADMIN_CLOCK_KEY].now()
    return web.json_response({"locks": [lock_json(lk) for lk in await registry.locks(now=now)]})


async def _add_lock(request: web.Request) -> web.StreamResponse:
    registry, now = request.app[ADMIN_REGISTRY_KEY], request.app[ADMIN_CLOCK_KEY].now()
    body = await _body(request)
    try:
        target = LockTarget(str(body.get("target")))
    except ValueError:
        raise AdminError(
            400, "invalid_request", "target must be one of host, vm_id, subscription, token"
        ) from None
    value, reason = body.get("value"), body.get("reason")
    if not isinstance(value, str) or not value or len(value) > 256:
        raise AdminError(400, "invalid_request", "value must be a non-empty string")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > _MAX_REASON:
        raise AdminError(400, "invalid_request", f"reason must be 1-{_MAX_REASON} characters")
    ttl = None
    if body.get("ttl_seconds") is not None:
        ttl = timedelta(seconds=_seconds(body["ttl_seconds"], "ttl_seconds"))
    lock = await registry.add_lock(target, value, reason=reason, now=now, ttl=ttl)
    log.info("admin: lock %s added by %s", lock.lock_id, peer_common_name(request))
    return web.json_response(lock_json(lock), status=201)


async def _remove_lock(request: web.Request) -> web.StreamResponse:
    registry = request.app[ADMIN_REGISTRY_KEY]
    lock_id = request.match_info["lock_id"]
    if not await registry.remove_lock(lock_id):
        raise AdminError(404, "not_found", "no such lock")
    log.info("admin: lock %s removed by %s", lock_id, peer_common_name(request))
    return web.json_response({"removed": lock_id})


def add_admin_routes(app: web.Application, *, registry: Registry, clock: Clock) -> None:
    """Mount the admin API on the auth service's app (before it starts)."""
    app[ADMIN_REGISTRY_KEY] = registry
    app[ADMIN_CLOCK_KEY] = clock
    r = app.router
    r.add_get("/v1/admin/nodes", _admin_only(_nodes))
    r.add_get("/v1/admin/nodes/{host_id}", _admin_only(_node))
    r.add_delete("/v1/admin/nodes/{host_id}", _admin_only(_remove_node))
    r.add_post("/v1/admin/prune", _admin_only(_prune))
    r.add_get("/v1/admin/locks", _admin_only(_locks))
    r.add_post("/v1/admin/locks", _admin_only(_add_lock))
    r.add_delete("/v1/admin/locks/{lock_id}", _admin_only(_remove_lock))
