"""Who is calling, and may they? Every route under /v1 needs an API key
(`Authorization: Bearer pf_live_…`); /health, /ready, /metrics and
/openapi.json stay open. A view declares the scope it needs with @requires;
one that declares nothing needs admin (deny by default)."""

from __future__ import annotations

from flask import Flask, current_app, g, request

from payflow import apikeys, errors
from payflow.api.services import services
from payflow.db import wrap_errors

PROTECTED_PREFIX = "/v1/"


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
    with wrap_errors(), services().pool.connection() as conn:
        found = apikeys.authenticate(conn, secret.strip())
    if found is None:
        raise errors.Unauthorized("This API key is not valid (unknown or revoked).")
    g.caller = found
    services().rate_limiter.check(found.key_id)
    view = current_app.view_functions.get(request.endpoint)
    if view is None:
        return  # no such route (or method): 404 / 405 follow
    needed = getattr(view, "required_scope", "admin")
    if not found.may(needed):
        raise errors.Forbidden(details={"required_scope": needed})


def register(app: Flask) -> None:
    app.before_request(_authenticate)
