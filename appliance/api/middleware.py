"""Request ids, access log and metrics, bearer-token auth, and one JSON shape for every error."""

from __future__ import annotations

import hmac
import time
import uuid
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from appliance.api import state
from appliance.api.errors import ApiError
from appliance.api.responses import error_response

log = structlog.get_logger("appliance.api")

# Paths answered without a token: probes and scrapers on the device must not need secrets.
PUBLIC_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})
REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: binds the request id, logs the request, records latency and error codes."""
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex[:16]
    structlog.contextvars.bind_contextvars(request_id=request_id)
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-ID"] = request_id
        return response
    finally:
        elapsed = time.perf_counter() - start
        metrics = request.app[state.METRICS]
        metrics.request_latency.labels(request.method, _route_name(request), str(status)).observe(
            elapsed
        )
        if request.path not in PUBLIC_PATHS:
            log.info(
                "request",
                method=request.method,
                path=request.path,
                status=status,
                ms=round(elapsed * 1e3, 2),
            )
        structlog.contextvars.unbind_contextvars("request_id")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[state.METRICS]
    try:
        return await handler(request)
    except ApiError as exc:
        metrics.errors.labels(exc.code).inc()
        response = error_response(exc.status, exc.code, exc.message, exc.headers)
        if exc.status in (408, 413):
            # The rest of the body is not wanted: close rather than drain what a slow or
            # oversized sender still has to send.
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = REASONS.get(exc.status, "http_error")
        metrics.errors.labels(code).inc()
        message = exc.text or exc.reason
        if exc.status == 413:
            message = f"request body is larger than MAX_BODY_BYTES ({request.app[state.SETTINGS].max_body_bytes} bytes)"
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return error_response(exc.status, code, message, headers)
    except (web.RequestPayloadError, HttpProcessingError) as exc:
        # aiohttp met a malformed body while the handler read it (a Content-Encoding that
        # does not decode, gzip or deflate that is not): the client's fault, a 400.
        metrics.errors.labels("bad_request").inc()
        detail = exc.message if isinstance(exc, HttpProcessingError) else str(exc).strip()
        return error_response(400, "bad_request", f"malformed HTTP body: {detail}")
    except Exception:
        # The id is in the answer and in the log line with the traceback: a caller's report
        # of a 500 finds its cause.
        error_id = uuid.uuid4().hex[:12]
        metrics.errors.labels("internal_error").inc()
        log.exception("unhandled_error", path=request.path, error_id=error_id)
        return error_response(
            500, "internal_error", f"internal error (error id {error_id}); see the appliance log"
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[state.SETTINGS].api_token
    if token is None or request.path in PUBLIC_PATHS or request.method == "OPTIONS":
        return await handler(request)
    if (
        request.path == "/"
        or request.path.startswith("/static/")
        or request.path in ("/docs", "/openapi.json")
        or request.path.startswith("/docs/static/")
    ):
        return await handler(request)
    supplied = _bearer(request)
    if supplied is None or not hmac.compare_digest(supplied.encode(), token.encode()):
        raise ApiError(
            "missing or invalid bearer token (Authorization: Bearer <API_TOKEN>)",
            code="unauthorized",
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="appliance"'},
        )
    return await handler(request)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    # Browsers cannot set headers on a WebSocket: the live view passes the token as a query
    # parameter instead.
    query: Any = request.query.get("token")
    return str(query) if query else None


MIDDLEWARES = [observe_middleware, error_middleware, auth_middleware]
