"""/v1/payouts"""

from __future__ import annotations

import json

from flask import Response, request
from flask_smorest import Blueprint

from payflow import schemas
from payflow.api.auth import caller, requires
from payflow.api.requests import json_body, json_text_response, outcome_response
from payflow.api.services import services

blueprint = Blueprint("payouts", __name__, url_prefix="/v1/payouts",
                      description="Money out of the ledger, through a clearing account and a provider.")


@blueprint.route("", methods=["POST"])
@requires("transfers:write")
@blueprint.response(202, schemas.PayoutSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema, description="account_not_found")
@blueprint.alt_response(409, schema=schemas.ApiErrorSchema, description="idempotency_key_in_use")
@blueprint.alt_response(422, schema=schemas.ApiErrorSchema,
                        description="validation_error, insufficient_funds, currency_mismatch")
@json_body(blueprint, schemas.PayoutCreateSchema, idempotency_key="required")
def create_payout(body, idempotent_request) -> Response:
    """Accepted at once: the money is held in the clearing account and a worker pays it out."""
    return outcome_response(services().ledger.create_payout(idempotent_request, body))


@blueprint.after_request
def _location(response: Response) -> Response:
    """Where an accepted payout can be watched. A hook, not the view: a replay
    of a cached answer never reaches the view (api/requests.json_body)."""
    if request.method == "POST" and request.url_rule and request.url_rule.rule == "/v1/payouts" and (
            response.status_code == 202):
        response.headers["Location"] = f"/v1/payouts/{json.loads(response.get_data())['id']}"
    return response


@blueprint.route("/<payout_id>", methods=["GET"])
@requires("read")
@blueprint.response(200, schemas.PayoutSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema, description="No such payout")
def get_payout(payout_id: str) -> Response:
    """pending → processing → succeeded | failed (with failure_reason; the money is returned)."""
    return json_text_response(services().ledger.payout(payout_id, caller().owner))
