"""Per request: an id (X-Request-Id, accepted or made), a JSON log line,
security headers, and the request metrics."""

from __future__ import annotations

import logging
import time
import uuid

from flask import Flask, Response, g, request

from payflow import idempotency, metrics
from payflow.api.auth import caller

log = logging.getLogger("payflow.request")
REQUEST_ID_CHARS_MAX = 200

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _request_id() -> str:
    given = request.headers.get("X-Request-Id", "")
    if 1 <= len(given) <= REQUEST_ID_CHARS_MAX and all(" " < char <= "~" for char in given):
        return given
    return uuid.uuid4().hex


def _start() -> None:
    g.started = time.perf_counter()
    g.request_id = _request_id()


def _finish(response: Response) -> Response:
    duration_seconds = time.perf_counter() - g.get("started", time.perf_counter())
    route = request.url_rule.rule if request.url_rule else "unmatched"
    response.headers["X-Request-Id"] = g.get("request_id", "")
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    who = caller()
    key = next((request.headers[name] for name in idempotency.IDEMPOTENCY_HEADERS
                if name in request.headers), None)
    log.info("request", extra={
        "method": request.method, "route": route, "status": response.status_code,
        "duration_ms": round(duration_seconds * 1000, 3), "request_id": g.get("request_id"),
        "idempotency_key": key[:255] if key else None, "key_id": who.key_id if who else None,
        "replayed": response.headers.get("Idempotent-Replayed") == "true",
    })
    metrics.observe_request(request.method, route, response.status_code, duration_seconds,
                            replayed=response.headers.get("Idempotent-Replayed") == "true")
    return response


def register(app: Flask) -> None:
    # First in, last out: the id exists before authentication runs.
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    app.after_request(_finish)
