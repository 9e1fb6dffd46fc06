"""/v1/reconciliations: runs matching settlements to payouts, and their exceptions."""

from __future__ import annotations

import json

from flask import Response, request
from flask_smorest import Blueprint

from payflow import reconciliation, schemas
from payflow.api.auth import caller, requires
from payflow.api.requests import json_body, json_text_response
from payflow.api.services import services
from payflow.db import wrap_errors
from payflow.ledger import parse_uuid

blueprint = Blueprint("reconciliations", __name__, url_prefix="/v1/reconciliations",
                      description="Settlements matched to payouts; exceptions for an operator.")

_PAGE_PARAMETERS = [{"name": name, "in": "query", "schema": {"type": "string"}}
                    for name in ("code", "status", "limit", "cursor")]


def _first_page() -> dict:
    return schemas.load(schemas.ReconciliationQuerySchema(), {})


@blueprint.route("", methods=["POST"])
@requires("admin")
@blueprint.response(201, schemas.ReconciliationSchema)
@blueprint.alt_response(422, schema=schemas.ApiErrorSchema, description="validation_error")
@json_body(blueprint, schemas.ReconciliationCreateSchema, idempotency_key="none")
def create_reconciliation(body, idempotent_request) -> Response:
    """Classifies every payout succeeded (since `since`, if given) and settlement
    line imported by as_of; with the first page of exceptions. Moves no money:
    a retry makes another run."""
    with wrap_errors(), services().pool.connection() as conn:
        run_id = reconciliation.run(conn, services().config, created_by=caller().key_id, **body)
        report = reconciliation.report(conn, run_id, _first_page())
    response = json_text_response(json.dumps(report), 201)
    response.headers["Location"] = f"/v1/reconciliations/{run_id}"
    return response


@blueprint.route("/<run_id>", methods=["GET"])
@requires("admin")
@blueprint.doc(parameters=_PAGE_PARAMETERS)
@blueprint.response(200, schemas.ReconciliationSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema, description="reconciliation_not_found")
@blueprint.alt_response(422, schema=schemas.ApiErrorSchema, description="validation_error")
def get_reconciliation(run_id: str) -> Response:
    """Counts, totals, and the exceptions in pages (?code=&status=open|resolved&limit=&cursor=)."""
    query = schemas.load(schemas.ReconciliationQuerySchema(), request.args.to_dict())
    with wrap_errors(), services().pool.connection() as conn:
        report = reconciliation.report(conn, parse_uuid(run_id), query)
    return json_text_response(json.dumps(report))


@blueprint.route("/<run_id>/exceptions/<exception_id>/resolve", methods=["POST"])
@requires("admin")
@blueprint.response(200, schemas.ReconciliationExceptionSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema,
                        description="reconciliation_not_found, reconciliation_exception_not_found")
@blueprint.alt_response(409, schema=schemas.ApiErrorSchema, description="exception_already_resolved")
@blueprint.alt_response(422, schema=schemas.ApiErrorSchema, description="validation_error")
@json_body(blueprint, schemas.ExceptionResolveSchema, idempotency_key="none")
def resolve_exception(body, idempotent_request, run_id: str, exception_id: str) -> Response:
    """Once: who (this API key), when and the note are recorded for good."""
    with wrap_errors(), services().pool.connection() as conn:
        resolved = reconciliation.resolve(conn, services().config, parse_uuid(run_id),
                                          parse_uuid(exception_id), body["note"],
                                          resolved_by=caller().key_id)
    return json_text_response(json.dumps(resolved))
