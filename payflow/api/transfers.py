"""/v1/transfers"""

from __future__ import annotations

import json

from flask import Response, request
from flask_smorest import Blueprint

from payflow import metrics, schemas
from payflow.api.auth import caller, requires
from payflow.api.replays import answered_before_flask
from payflow.api.requests import json_body, json_text_response, load, outcome_response
from payflow.api.services import services

blueprint = Blueprint("transfers", __name__, url_prefix="/v1/transfers",
                      description="Transfers move one currency between two accounts.")


@blueprint.route("", methods=["POST"])
@requires("transfers:write")
@answered_before_flask
@blueprint.response(201, schemas.TransferSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema, description="account_not_found")
@blueprint.alt_response(409, schema=schemas.ApiErrorSchema, description="idempotency_key_in_use")
@blueprint.alt_response(422, schema=schemas.ApiErrorSchema,
                        description="validation_error, insufficient_funds, currency_mismatch, "
                                    "idempotency_key_reused")
@json_body(blueprint, schemas.TransferCreateSchema, idempotency_key="required")
def create_transfer(body, idempotent_request) -> Response:
    outcome = services().ledger.post_transfer(idempotent_request, body)
    if outcome.status == 201 and not outcome.replayed:
        currency = json.loads(outcome.body)["currency"]
        metrics.TRANSFERS.labels(currency).inc()
        metrics.TRANSFERRED_MINOR_UNITS.labels(currency).inc(body["amount"])
    return outcome_response(outcome)


@blueprint.route("", methods=["GET"])
@requires("read")
@blueprint.doc(parameters=[{"name": name, "in": "query", "schema": {"type": "string"}} for name in
                           ("account_id", "status", "kind", "created_after", "created_before",
                            "limit", "cursor")])
@blueprint.response(200, schemas.TransfersPageSchema)
def search_transfers() -> Response:
    """Newest first, keyset pages (next_cursor), filtered by account (either side),
    status, kind and a creation window [created_after, created_before)."""
    query = load(schemas.TransferSearchSchema(), request.args.to_dict())
    page = services().ledger.search_transfers(query, caller().owner)
    return json_text_response(json.dumps(page, default=str))


@blueprint.route("/<transfer_id>/refunds", methods=["POST"])
@requires("transfers:write")
@blueprint.response(201, schemas.TransferSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema, description="transfer_not_found")
@blueprint.alt_response(422, schema=schemas.ApiErrorSchema,
                        description="refund_exceeds_transfer, not_refundable, insufficient_funds")
@json_body(blueprint, schemas.RefundCreateSchema, idempotency_key="required")
def refund_transfer(body, idempotent_request, transfer_id: str) -> Response:
    """A new transfer back from the original's destination to its source,
    linked to it; refunds never add up to more than the original."""
    return outcome_response(services().ledger.refund_transfer(idempotent_request, transfer_id, body))


@blueprint.route("/<transfer_id>", methods=["GET"])
@requires("read")
@blueprint.response(200, schemas.TransferSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema, description="No such transfer")
def get_transfer(transfer_id: str) -> Response:
    return json_text_response(services().ledger.transfer(transfer_id, caller().owner))
