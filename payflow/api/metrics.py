"""GET /metrics: Prometheus text format, open like /health."""

from __future__ import annotations

import hmac

from flask import Response, request
from flask_smorest import Blueprint

from payflow import audit, errors, metrics
from payflow.api.services import services
from payflow.db import wrap_errors

blueprint = Blueprint("metrics", __name__, description="Prometheus metrics.")


@blueprint.route("/metrics", methods=["GET"])
@blueprint.doc(security=[], responses={"200": {"description": "Prometheus text format",
                                               "content": {"text/plain": {"schema": {"type": "string"}}}}})
def prometheus_metrics() -> Response:
    token = services().config.metrics_token
    if token:
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), token.encode()):
            raise errors.Unauthorized("GET /metrics wants the metrics token (PAYFLOW_METRICS_TOKEN).")
    metrics.observe_pool(services().pool)
    report = audit.health(services().config, services().pool)
    with wrap_errors(), services().pool.connection() as conn:
        body, content_type = metrics.exposition(conn, report.body)
    return Response(body, status=200, content_type=content_type)
