"""Every error leaves the API in one shape, built here:
{"error": {"code": "...", "message": "...", "details": {...}}}."""

from __future__ import annotations

import json
import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from payflow import errors

log = logging.getLogger(__name__)

# Codes for the HTTP errors Flask/werkzeug raise before our views run.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

INTERNAL_ERROR_MESSAGE = "An unexpected error happened; it is logged."


def error_body(code: str, message: str, details: dict | None = None) -> str:
    return json.dumps({"error": {"code": code, "message": message, "details": details or {}}})


def error_response(status: int, code: str, message: str, details: dict | None = None,
                   retry_after_seconds: int | None = None) -> Response:
    response = Response(error_body(code, message, details), status=status, mimetype="application/json")
    if retry_after_seconds is not None:
        response.headers["Retry-After"] = str(retry_after_seconds)
    return response


def _api_error(error: errors.ApiError) -> Response:
    response = error_response(error.status, error.code, error.message, error.details,
                              error.retry_after_seconds)
    if isinstance(error, errors.Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="payflow"'
    return response


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    code = _HTTP_CODES.get(status, (error.name or "error").lower().replace(" ", "_"))
    response = error_response(status, code, error.description or error.name)
    if status == 405 and error.valid_methods:
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response


def _unexpected(error: Exception) -> Response:
    log.exception("unhandled error: this is a bug")
    return error_response(500, "internal_error", INTERNAL_ERROR_MESSAGE)


def register(app: Flask) -> None:
    app.register_error_handler(errors.ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
