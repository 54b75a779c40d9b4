"""Middleware: request context, the drain's refusal and the one place errors are rendered.

``error_middleware`` is the app's only middleware (see ``make_app``): it wraps everything
so that any failure — ours, aiohttp's (404, 405, 413) or a bug — leaves as a JSON error
body with a stable code, and the worker lives on. It also refuses a request whose
headers arrive during the drain (``503 shutting_down``), which was a second middleware
inside it: each layer is a coroutine and a call per request, for a check that is one
attribute read.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.core.errors import Code, GatewayError, NotFound, Overloaded, PayloadTooLarge
from gateway.protocol import ErrorBody

__all__ = ["REQUEST_ID", "error_middleware", "render_error", "shutting_down"]

log = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def render_error(err: GatewayError) -> web.Response:
    resp = web.json_response(ErrorBody(str(err.code), err.message).to_json(), status=err.status)
    if err.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, round(err.retry_after)))
    return resp


def shutting_down() -> web.Response:
    """The answer to a request whose headers arrive once the drain began: ``503
    shutting_down`` and ``Connection: close`` tell the client (or balancer) that nothing
    was done and another replica will do it — a reset would leave that unknown."""
    resp = render_error(Overloaded(Code.SHUTTING_DOWN, retry_after=1.0))
    resp.force_close()
    return resp


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NotFound()
    if exc.status == 405:
        return NotFound(Code.METHOD_NOT_ALLOWED)
    if exc.status == 413:
        return PayloadTooLarge()
    if 400 <= exc.status < 500:
        return GatewayError(Code.MALFORMED_BODY, detail=exc.reason)
    return GatewayError(Code.INTERNAL_ERROR, detail=exc.reason)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    protocol = request.protocol
    # The headers are here: the connection's header deadline is met.
    arrived = getattr(protocol, "headers_arrived", None)
    if arrived is not None:
        arrived()
    supplied = request.headers.get("X-Request-Id", "")
    # 32 random hex digits, as uuid4().hex was, at a quarter of its CPU.
    request_id = supplied if _REQUEST_ID_OK.match(supplied) else os.urandom(16).hex()
    REQUEST_ID.set(request_id)  # each request runs in its own task: its own context
    resp: web.StreamResponse
    try:
        # The drain began (``framing.Connections``): the request is not started.
        if getattr(protocol, "draining", False):
            resp = shutting_down()
        else:
            resp = await handler(request)
    except GatewayError as err:
        resp = render_error(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = render_error(_from_http_exception(exc))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        resp = render_error(GatewayError(Code.INTERNAL_ERROR))
    resp.headers["X-Request-Id"] = request_id
    return resp
