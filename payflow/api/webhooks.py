"""/v1/webhook-endpoints"""

from __future__ import annotations

import json

from flask import Response
from flask_smorest import Blueprint

from payflow import errors, schemas, webhooks
from payflow.api.requests import json_body, json_text_response
from payflow.api.services import services
from payflow.db import wrap_errors
from payflow.queries import queries

# Every event fans out to every subscribed endpoint: keep that bounded.
WEBHOOK_ENDPOINTS_MAX = 50

blueprint = Blueprint("webhooks", __name__, url_prefix="/v1/webhook-endpoints",
                      description="Signed event deliveries (see payflow.webhooks.verify).")


@blueprint.route("", methods=["POST"])
@blueprint.response(201, schemas.WebhookEndpointSchema)
@blueprint.alt_response(422, schema=schemas.ApiErrorSchema, description="validation_error")
@json_body(blueprint, schemas.WebhookEndpointCreateSchema, idempotency_key="none")
def create_endpoint(body, idempotent_request) -> Response:
    """The secret is in this response only: store it to verify deliveries."""
    secret = webhooks.new_secret()
    with wrap_errors(), services().pool.connection() as conn:
        count = conn.execute(queries["count_webhook_endpoints"]).fetchone()["endpoints"]
        if count >= WEBHOOK_ENDPOINTS_MAX:
            raise errors.ValidationFailed(details={"_schema": [
                f"At most {WEBHOOK_ENDPOINTS_MAX} webhook endpoints."]})
        row = conn.execute(queries["create_webhook_endpoint"], {
            "url": body["url"], "event_types": sorted(set(body["event_types"])), "secret": secret,
        }).fetchone()
    return json_text_response(json.dumps({**row["endpoint"], "secret": secret}), 201)


@blueprint.route("", methods=["GET"])
@blueprint.response(200, schemas.WebhookEndpointListSchema)
def list_endpoints() -> Response:
    with wrap_errors(), services().pool.connection() as conn:
        rows = conn.execute(queries["list_webhook_endpoints"]).fetchall()
    return json_text_response(json.dumps({"data": [row["endpoint"] for row in rows]}))
