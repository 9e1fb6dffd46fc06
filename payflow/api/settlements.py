"""/v1/settlements: settlement files from a bank or payout provider."""

from __future__ import annotations

import json

from flask import Response
from flask_smorest import Blueprint

from payflow import schemas, settlements
from payflow.api.auth import caller, requires
from payflow.api.requests import json_body, json_text_response
from payflow.api.services import services
from payflow.db import wrap_errors

blueprint = Blueprint("settlements", __name__, url_prefix="/v1/settlements",
                      description="What the bank or provider says it paid, for reconciliation.")


@blueprint.route("", methods=["POST"])
@requires("admin")
@blueprint.response(201, schemas.SettlementImportSchema)
@blueprint.alt_response(200, schema=schemas.SettlementImportSchema,
                        description="Nothing new: every record was imported before")
@blueprint.alt_response(409, schema=schemas.ApiErrorSchema,
                        description="settlement_conflict: a reference imported before with other content")
@blueprint.alt_response(422, schema=schemas.ApiErrorSchema, description="validation_error")
@json_body(blueprint, schemas.SettlementBatchSchema, idempotency_key="none")
def import_settlements(body, idempotent_request) -> Response:
    """Idempotent by each record's (source, reference): sending the same batch
    again inserts nothing. All or nothing: a conflict keeps no record."""
    with wrap_errors(), services().pool.connection() as conn:
        result = settlements.import_batch(conn, services().config, body, imported_by=caller().key_id)
    return json_text_response(json.dumps(result), 201 if result["inserted"] else 200)
