"""Replays answered before Flask: WSGI middleware for retried keyed writes.

A retry of a completed keyed write (POST with X-Idempotency-Key) is answered
from the answer Redis caches after the commit (idempotency.Completed). The
Flask path would give the same answer, but its request context, routing,
hooks and response objects are most of a replay's cost. So when everything a
replay needs is at hand without Flask — a static keyed route marked
answered_before_flask, an API key in
the process's key cache, a well-formed key, a JSON body within the size
limit — this middleware makes the request's one Redis round trip itself.

Exactly what auth would have done: the same admission (rate counter,
revocation mark, lock), the same scope check. An admission that is not a
replay of this very request (a new key, a key in flight, another body, a
revoked key, the rate limit, Redis down) is handed to the Flask path in the
environ (ADMISSION_ENVIRON) and used there instead of a second round trip, so
every other outcome is decided where it always was.
"""

from __future__ import annotations

import io

from flask import Flask
from werkzeug.http import HTTP_STATUS_CODES

from payflow import errors, idempotency
from payflow.api.auth import ADMISSION_ENVIRON
from payflow.api.observability import KEY_ID_ENVIRON, ROUTE_ENVIRON
from payflow.api.requests import decode_json
from payflow.api.services import Services


class ReplayShortcut:
    def __init__(self, wsgi_app, services: Services, routes: dict[str, str], body_bytes_max: int) -> None:
        self.wsgi_app = wsgi_app
        self._services = services
        self._routes = routes  # POST path -> the scope its view requires
        self._body_bytes_max = body_bytes_max

    def __call__(self, environ: dict, start_response):
        if environ["REQUEST_METHOD"] == "POST" and environ.get("PATH_INFO") in self._routes:
            replay = self._replay(environ)
            if replay is not None:
                status, body = replay
                start_response(f"{status} {HTTP_STATUS_CODES.get(status, '').upper()}", [
                    ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                    ("Idempotent-Replayed", "true")])
                return [body]
        return self.wsgi_app(environ, start_response)

    def _replay(self, environ: dict) -> tuple[int, bytes] | None:
        """The stored answer, or None: the Flask path serves the request."""
        path = environ["PATH_INFO"]
        scheme, _, secret = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        secret = secret.strip()
        services = self._services
        if scheme.lower() != "bearer" or not secret or not services.guard.available:
            return None
        caller = services.key_cache.get(secret)
        if caller is None or not caller.may(self._routes[path]):
            return None
        try:
            key = idempotency.key_from_headers(_IdempotencyHeaders(environ), required=False)
        except errors.ApiError:
            return None
        if key is None:
            return None
        try:
            admission = services.rate_limiter.admit(caller.key_id, key)
        except errors.ApiError as error:  # over the rate limit: auth raises it
            environ[ADMISSION_ENVIRON] = error
            return None
        environ[ADMISSION_ENVIRON] = admission
        completed = admission.lock.completed if admission.lock else None
        if admission.count is None or completed is None:
            return None  # the common case, a new key: its body is read once, by Flask
        body = _read_json_body(environ, self._body_bytes_max)
        if body is _NOT_JSON or completed.fingerprint != idempotency.fingerprint("POST", path, body):
            return None
        del environ[ADMISSION_ENVIRON]
        environ[ROUTE_ENVIRON], environ[KEY_ID_ENVIRON] = path, caller.key_id
        return completed.status, completed.body.encode()


class _IdempotencyHeaders:
    """The two idempotency headers of a WSGI environ, as key_from_headers reads them."""

    _NAMES = {name: "HTTP_" + name.upper().replace("-", "_") for name in idempotency.IDEMPOTENCY_HEADERS}

    def __init__(self, environ: dict) -> None:
        self._environ = environ

    def __contains__(self, name: str) -> bool:
        return self._NAMES[name] in self._environ

    def __getitem__(self, name: str) -> str:
        return self._environ[self._NAMES[name]]


_NOT_JSON = object()


def _read_json_body(environ: dict, body_bytes_max: int) -> object:
    """The parsed body (left readable for Flask), or _NOT_JSON when it is
    anything the Flask path must refuse or read itself."""
    content_type = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        return _NOT_JSON
    if content_type != "application/json" or not 0 < length <= body_bytes_max or (
            environ.get("HTTP_TRANSFER_ENCODING")):
        return _NOT_JSON
    try:
        raw = environ["wsgi.input"].read(length)
    except Exception:  # noqa: BLE001 - a client gone mid-body: the Flask path answers it
        return _NOT_JSON
    environ["wsgi.input"] = io.BytesIO(raw)
    try:
        return decode_json(raw)
    except errors.ApiError:
        return _NOT_JSON


def answered_before_flask(view):
    """Marks a keyed POST view whose replay is exactly its stored status and
    body, with no header of its own (a payout's Location is one)."""
    view.replay_before_flask = True
    return view


def shortcut_routes(app: Flask) -> dict[str, str]:
    """Static POST routes of views marked answered_before_flask -> their scope."""
    routes = {}
    for rule in app.url_map.iter_rules():
        view = app.view_functions.get(rule.endpoint)
        if "POST" in (rule.methods or ()) and not rule.arguments and (
                getattr(view, "replay_before_flask", False)):
            if getattr(view, "idempotency", "none") == "none":
                raise RuntimeError(f"{rule.rule}: only a keyed view can be replayed before Flask")
            routes[rule.rule] = getattr(view, "required_scope", "admin")
    return routes


def register(app: Flask, services: Services) -> None:
    app.wsgi_app = ReplayShortcut(app.wsgi_app, services, shortcut_routes(app),
                                  services.config.request_body_bytes_max)
