"""Who is calling, and may they? Every route under /v1 needs an API key
(`Authorization: Bearer pf_live_…`); /health, /ready, /metrics and
/openapi.json stay open. A view declares the scope it needs with @requires;
one that declares nothing needs admin (deny by default)."""

from __future__ import annotations

from flask import Flask, current_app, g, request

from payflow import apikeys, errors, idempotency
from payflow.api.observability import KEY_ID_ENVIRON
from payflow.api.services import services
from payflow.db import wrap_errors

PROTECTED_PREFIX = "/v1/"
UNKNOWN_OR_REVOKED = "This API key is not valid (unknown or revoked)."
# The admission replays.ReplayShortcut already made for this request (or the
# ApiError making it raised): used instead of a second Redis round trip.
ADMISSION_ENVIRON = "payflow.admission"


def requires(scope: str):
    def decorator(view):
        view.required_scope = scope
        return view

    return decorator


def caller() -> apikeys.Caller | None:
    return g.get("caller")


def _authenticate() -> None:
    if not request.path.startswith(PROTECTED_PREFIX):
        return
    handed = request.environ.pop(ADMISSION_ENVIRON, None)
    if isinstance(handed, idempotency.Admission):
        g.in_flight = handed.lock  # released at teardown if this request fails before using it
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise errors.Unauthorized()
    secret = secret.strip()
    cache = services().key_cache
    cached = cache.get(secret) if services().guard.available else None
    found = cached or _from_database(secret)
    if found is None:
        raise errors.Unauthorized(UNKNOWN_OR_REVOKED)
    _identify(found)
    view = current_app.view_functions.get(request.endpoint)
    needed = getattr(view, "required_scope", "admin")
    allowed = view is not None and found.may(needed)
    # One Redis round trip: the rate counter, the key's revocation mark and,
    # for an allowed keyed write, the idempotency key's in-flight lock (or
    # its cached answer).
    if isinstance(handed, errors.ApiError):
        raise handed
    admission = handed or services().rate_limiter.admit(found.key_id,
                                                         _idempotency_key(view) if allowed else None)
    if admission.revoked:
        cache.drop(found.key_id)
        _identify(None)
        raise errors.Unauthorized(UNKNOWN_OR_REVOKED)
    g.in_flight = admission.lock
    # The cache is only as good as the Redis round trip that carries
    # revocations: kept or filled when Redis answered, else the database decides.
    if admission.count is None and cached is not None:
        cache.drop(found.key_id)
        if _from_database(secret) is None:
            _identify(None)
            raise errors.Unauthorized(UNKNOWN_OR_REVOKED)
    elif admission.count is not None and cached is None:
        cache.put(secret, found)
    if view is None:
        return  # no such route (or method): 404 / 405 follow
    if not allowed:
        raise errors.Forbidden(details={"required_scope": needed})


def _identify(found: apikeys.Caller | None) -> None:
    g.caller = found
    request.environ[KEY_ID_ENVIRON] = found.key_id if found else None  # for the request's log line


def _from_database(secret: str) -> apikeys.Caller | None:
    if not apikeys.well_formed(secret):
        return None
    with wrap_errors(), services().pool.connection() as conn:
        return apikeys.authenticate(conn, secret)


def _idempotency_key(view) -> str | None:
    """The request's key when its view honours one and it is well formed;
    a missing or malformed key is the view's to refuse (json_body)."""
    if getattr(view, "idempotency", "none") == "none":
        return None
    try:
        return idempotency.key_from_headers(request.headers, required=False)
    except errors.ApiError:
        return None


def in_flight() -> idempotency.InFlightLock | None:
    return g.get("in_flight")


def _release_unsettled(_error) -> None:
    """A request that ended before its lock was completed or released (a
    validation error, an unknown id) must not hold its key."""
    lock = g.get("in_flight")
    if lock is not None and lock.name and not lock.settled:
        services().guard.release(lock)


def register(app: Flask) -> None:
    app.before_request(_authenticate)
    app.teardown_request(_release_unsettled)
