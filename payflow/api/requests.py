"""Reading a JSON request: content type, strict parsing, idempotency key and
schema validation, in that order. A request rejected here stores nothing and
does not burn its idempotency key."""

from __future__ import annotations

import functools
import json

from flask import Response, request
from gunicorn.http.errors import ParseException
from marshmallow import Schema

from payflow import errors, idempotency
from payflow.api.auth import caller, in_flight
from payflow.ledger import IdempotentRequest, Outcome
from payflow.schemas import load

# An integer literal this long is far past any bigint; parsing it exactly
# would cost quadratic time (Python caps int parsing at 4300 digits).
INTEGER_DIGITS_MAX = 40
_HUGE = 2**256


def _parse_int(literal: str) -> int:
    if len(literal) > INTEGER_DIGITS_MAX:
        return -_HUGE if literal.startswith("-") else _HUGE  # fails the range check
    return int(literal)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode_json(raw: bytes) -> object:
    try:
        return json.loads(raw, parse_int=_parse_int, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        raise errors.InvalidJson(details={"reason": str(error)[:200]}) from None


def parse_json_body() -> object:
    if request.mimetype != "application/json":
        raise errors.UnsupportedMediaType()
    try:
        # 413 past MAX_CONTENT_LENGTH and 400 for a client gone mid-body come
        # from werkzeug (HTTPException); gunicorn raises its parse errors here
        # when a chunked body is malformed.
        raw = request.get_data(cache=True)
    except ParseException as error:
        raise errors.UnreadableBody(details={"reason": str(error)[:200]}) from None
    return decode_json(raw)


def json_body(blueprint, schema_class: type[Schema], idempotency_key: str):
    """Decorates a view taking `(body, idempotent_request)`; documents the body
    in /openapi.json. idempotency_key: 'required', 'optional' or 'none'."""
    schema = schema_class()
    required = idempotency_key == "required"
    honoured = idempotency_key != "none"

    def decorator(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            raw = parse_json_body()
            key = idempotency.key_from_headers(request.headers, required=required) if honoured else None
            fingerprint = idempotency.fingerprint(request.method, request.path, raw) if key else None
            lock = in_flight() if key else None
            if lock is not None and lock.completed and lock.completed.fingerprint == fingerprint:
                # The very request already answered: replay it. Its body was
                # valid the first time, so it needs no validation now.
                return outcome_response(Outcome(lock.completed.status, lock.completed.body, replayed=True))
            body = load(schema, raw)
            who = caller()
            # Idempotency keys are scoped per API key: two callers' keys never collide.
            idempotent = IdempotentRequest(key, fingerprint, scope=who.key_id if who else None,
                                           owner=who.owner if who else None, lock=lock)
            return view(body, idempotent, *args, **kwargs)

        wrapper.idempotency = idempotency_key  # read by auth: take the key's lock up front

        header = {"name": "X-Idempotency-Key", "in": "header", "required": required,
                  "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                  "description": "Retries with the same key replay the first response."}
        return blueprint.doc(
            parameters=[header] if honoured else [],
            requestBody={"required": True, "content": {"application/json": {"schema": schema_class}}},
        )(wrapper)

    return decorator


def outcome_response(outcome: Outcome) -> Response:
    response = Response(outcome.body, status=outcome.status, mimetype="application/json")
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def json_text_response(body: str, status: int = 200) -> Response:
    return Response(body, status=status, mimetype="application/json")
