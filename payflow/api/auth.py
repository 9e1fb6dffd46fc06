"""Who is calling, and may they? Every route under /v1 needs an API key
(`Authorization: Bearer pf_live_…`); /health, /ready, /metrics and
/openapi.json stay open. A view declares the scope it needs with @requires;
one that declares nothing needs admin (deny by default)."""

from __future__ import annotations

from flask import Flask, current_app, g, request

from payflow import apikeys, errors, idempotency
from payflow.api.services import services
from payflow.db import wrap_errors

PROTECTED_PREFIX = "/v1/"
UNKNOWN_OR_REVOKED = "This API key is not valid (unknown or revoked)."


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
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise errors.Unauthorized()
    secret = secret.strip()
    found = _lookup(secret)
    if found is None:
        raise errors.Unauthorized(UNKNOWN_OR_REVOKED)
    g.caller = found
    view = current_app.view_functions.get(request.endpoint)
    needed = getattr(view, "required_scope", "admin")
    allowed = view is not None and found.may(needed)
    # One Redis round trip: the rate counter, the key's revocation mark and,
    # for an allowed keyed write, the idempotency key's in-flight lock (or
    # its cached answer).
    admission = services().rate_limiter.admit(found.key_id, _idempotency_key(view) if allowed else None)
    if admission.revoked:
        services().key_cache.drop(found.key_id)
        g.caller = None
        raise errors.Unauthorized(UNKNOWN_OR_REVOKED)
    g.in_flight = admission.lock
    if view is None:
        return  # no such route (or method): 404 / 405 follow
    if not allowed:
        raise errors.Forbidden(details={"required_scope": needed})


def _lookup(secret: str) -> apikeys.Caller | None:
    """The live key with this secret: from this process's cache while Redis
    (which carries revocations) answers, else from the database."""
    cache, use_cache = services().key_cache, services().guard.available
    found = cache.get(secret) if use_cache else None
    if found is None and apikeys.well_formed(secret):
        with wrap_errors(), services().pool.connection() as conn:
            found = apikeys.authenticate(conn, secret)
        if found is not None and use_cache:
            cache.put(secret, found)
    return found


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
