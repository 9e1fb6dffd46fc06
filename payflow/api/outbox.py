"""/v1/outbox/stats: the queue, for operators."""

from __future__ import annotations

import json

from flask import Response
from flask_smorest import Blueprint

from payflow import outbox, schemas
from payflow.api.requests import json_text_response
from payflow.api.services import services
from payflow.db import wrap_errors

blueprint = Blueprint("outbox", __name__, url_prefix="/v1/outbox", description="The task queue.")


@blueprint.route("/stats", methods=["GET"])
@blueprint.response(200, schemas.OutboxStatsSchema)
def outbox_stats() -> Response:
    """Counts by status and topic, the oldest pending task's age, dead tasks."""
    with wrap_errors(), services().pool.connection() as conn:
        return json_text_response(json.dumps(outbox.stats(conn)))
