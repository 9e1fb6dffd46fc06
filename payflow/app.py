"""create_app builds everything: configuration, the pool, Redis, the routes."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from flask import Flask
from flask_smorest import Api

from payflow import __version__, logs, schemas
from payflow.api import (
    accounts,
    auth,
    errors,
    health,
    metrics,
    observability,
    outbox,
    payouts,
    reconciliations,
    replays,
    settlements,
    transfers,
    webhooks,
)
from payflow.api.services import Services
from payflow.apikeys import KeyCache
from payflow.config import Config
from payflow.db import create_pool
from payflow.idempotency import RedisGuard
from payflow.ledger import Ledger
from payflow.ratelimit import RateLimiter


class PayflowFlask(Flask):
    def ensure_sync(self, func):
        """No view or hook here is async (create_app checks): skip Flask's
        per-call check (it inspects every hook and view, ~10 per request)."""
        return func


def _refuse_async(app: Flask) -> None:
    hooks = (*app.before_request_funcs.values(), *app.after_request_funcs.values(),
             *app.teardown_request_funcs.values())
    for func in (*app.view_functions.values(), *(func for funcs in hooks for func in funcs)):
        if inspect.iscoroutinefunction(func):
            raise RuntimeError(f"{func.__qualname__} is async; PayflowFlask.ensure_sync runs no coroutine")


class PayflowApi(Api):
    # Every operation's "default" error response documents our one error shape.
    ERROR_SCHEMA = schemas.ApiErrorSchema


def create_app(config: Config | Mapping | None = None) -> Flask:
    config = config if isinstance(config, Config) else Config.load(config)
    if not config.database_url:
        raise RuntimeError("PAYFLOW_DATABASE_URL is not set (make run sets it for you)")
    logs.configure()

    app = PayflowFlask("payflow")
    app.config.update(
        MAX_CONTENT_LENGTH=config.request_body_bytes_max,
        API_TITLE="payflow",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        API_SPEC_OPTIONS={"security": [{"bearerAuth": []}]},
    )
    api = PayflowApi(app, spec_kwargs={"info": {"description": "A double-entry payment ledger. "
                                         "Money is an integer count of minor units."}})
    for module in (accounts, transfers, payouts, settlements, reconciliations, webhooks, outbox,
                   health, metrics):
        api.register_blueprint(module.blueprint)
    errors.register(app)  # after Api(), which registers a handler of its own
    api.spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer",
                                                       "description": "pf_live_... API key"})

    pool = create_pool(config)
    guard = RedisGuard(config)
    app.extensions["payflow"] = services = Services(
        config, pool, guard, Ledger(config, pool, guard), RateLimiter(config, guard),
        KeyCache(config.api_key_cache_seconds))
    auth.register(app)
    replays.register(app, services)  # WSGI middleware: after every route exists
    observability.register(app)  # outermost: it sees every request, replays included
    _refuse_async(app)
    return app
