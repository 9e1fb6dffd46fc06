"""/v1/accounts"""

from __future__ import annotations

import json

from flask import Response, request
from flask_smorest import Blueprint

from payflow import errors, schemas
from payflow.api.auth import caller, requires
from payflow.api.replays import answered_before_flask
from payflow.api.requests import json_body, json_text_response, load, outcome_response
from payflow.api.services import services

blueprint = Blueprint("accounts", __name__, url_prefix="/v1/accounts",
                      description="Accounts hold one currency and a balance in minor units.")


@blueprint.route("", methods=["POST"])
@requires("transfers:write")
@answered_before_flask
@blueprint.response(201, schemas.AccountSchema)
@blueprint.alt_response(422, schema=schemas.ApiErrorSchema, description="Validation error")
@json_body(blueprint, schemas.AccountCreateSchema, idempotency_key="optional")
def create_account(body, idempotent_request) -> Response:
    if body["overdraft_limit"] and not caller().is_admin:
        # A credit line is money the ledger lends: only an admin grants one.
        raise errors.Forbidden("Only an admin key may grant an overdraft_limit.",
                               details={"required_scope": "admin"})
    outcome = services().ledger.create_account(
        idempotent_request, body["name"], body["currency"], body["overdraft_limit"],
        owner=caller().key_id,
    )
    return outcome_response(outcome)


@blueprint.route("/<account_id>", methods=["GET"])
@requires("read")
@blueprint.response(200, schemas.AccountSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema, description="No such account")
def get_account(account_id: str) -> Response:
    return json_text_response(services().ledger.account(account_id, caller().owner))


@blueprint.route("/<account_id>/audit", methods=["GET"])
@requires("read")
@blueprint.response(200, schemas.AccountAuditSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema, description="No such account")
def audit_account(account_id: str) -> Response:
    """The account recomputed from its entries: the difference to its balance,
    and whether its entry chain (balance_after, version) has gaps."""
    return json_text_response(json.dumps(services().ledger.account_audit(account_id, caller().owner)))


@blueprint.route("/<account_id>/balance", methods=["GET"])
@requires("read")
@blueprint.doc(parameters=[{"name": "as_of", "in": "query", "required": True,
                            "schema": {"type": "string", "format": "date-time"}}])
@blueprint.response(200, schemas.BalanceSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema, description="No such account")
def balance_as_of(account_id: str) -> Response:
    """The balance at a moment, from the balance_after of the last entry then."""
    query = load(schemas.BalanceQuerySchema(), request.args.to_dict())
    balance = services().ledger.balance_as_of(account_id, query["as_of"], caller().owner)
    return json_text_response(json.dumps(balance))


@blueprint.route("/<account_id>/entries", methods=["GET"])
@requires("read")
@blueprint.doc(parameters=[
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                "maximum": schemas.PAGE_SIZE_MAX}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
    {"name": "until", "in": "query", "schema": {"type": "string", "format": "date-time"}},
])
@blueprint.response(200, schemas.EntriesPageSchema)
@blueprint.alt_response(404, schema=schemas.ApiErrorSchema, description="No such account")
def list_entries(account_id: str) -> Response:
    query = load(schemas.PageQuerySchema(), request.args.to_dict())
    page = services().ledger.entries_page(account_id, query["limit"], query["cursor"], caller().owner,
                                          since=query["since"], until=query["until"])
    return json_text_response(json.dumps(page))
