"""/health (the ledger audit) and /ready (can we serve?)."""

from __future__ import annotations

import json

from flask import Response
from flask_smorest import Blueprint

from payflow import audit, schemas
from payflow.api.requests import json_text_response
from payflow.api.services import services

blueprint = Blueprint("health", __name__, description="Ledger integrity and readiness.")


@blueprint.route("/health", methods=["GET"])
@blueprint.doc(security=[])
@blueprint.response(200, schemas.HealthSchema)
@blueprint.alt_response(503, schema=schemas.HealthSchema, description="Unhealthy, with the reason")
def health() -> Response:
    report = audit.health(services().config, services().pool)
    return json_text_response(json.dumps(report.body), 200 if report.healthy else 503)


@blueprint.route("/ready", methods=["GET"])
@blueprint.doc(security=[])
@blueprint.response(200, schemas.ReadySchema)
@blueprint.alt_response(503, schema=schemas.ReadySchema, description="PostgreSQL does not answer")
def ready() -> Response:
    database = services().ping_database()
    redis_state = services().guard.ping()
    if database != "ok":
        status = "unavailable"
    elif redis_state == "ok":
        status = "ready"
    else:
        status = "degraded"
    body = {"status": status, "database": database, "redis": redis_state}
    return json_text_response(json.dumps(body), 503 if status == "unavailable" else 200)
