"""The bad input catalogue: each request gets its documented 4xx in the one
error shape, and nothing is written (no rows, no burned idempotency key)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import JSON, Api, assert_error, create_system_account, new_key, table_counts

BIGINT_MAX = 2**63 - 1


@pytest.fixture
def accounts(client, db):
    api = Api(client)
    world = create_system_account(db)
    usd_a, usd_b = api.create_account(), api.create_account()
    eur = api.create_account(currency="EUR")
    api.ok_transfer(world, usd_a, 1_000)
    return {"world": world, "a": usd_a, "b": usd_b, "eur": eur}


def body(accounts, **changes):
    base = {"from_account_id": accounts["a"], "to_account_id": accounts["b"], "amount": 100}
    base.update(changes)
    return {key: value for key, value in base.items() if value is not ...}


SCHEMA_VIOLATIONS = {
    "amount zero": {"amount": 0},
    "amount negative": {"amount": -5},
    "amount float": {"amount": 1.5},
    "amount integral float": {"amount": 100.0},
    "amount exponent": {"amount": 1e2},
    "amount string": {"amount": "100"},
    "amount boolean": {"amount": True},
    "amount null": {"amount": None},
    "amount object": {"amount": {"value": 1}},
    "amount missing": {"amount": ...},
    "amount past bigint": {"amount": BIGINT_MAX + 1},
    "amount 2^64": {"amount": 2**64},
    "unknown field": {"memo": "hi"},
    "source missing": {"from_account_id": ...},
    "source not a uuid": {"from_account_id": "acct_123"},
    "source a number": {"from_account_id": 7},
    "same account": {"to_account_id": "SAME"},
    "currency lower case": {"currency": "usd"},
    "currency unknown": {"currency": "XYZ"},
    "currency number": {"currency": 840},
    "description too long": {"description": "x" * 1001},
    "description NUL": {"description": "a\u0000b"},
    "description lone surrogate": {"description": "\ud800"},
    "metadata not an object": {"metadata": ["a"]},
    "metadata value not a string": {"metadata": {"a": 1}},
    "metadata too many keys": {"metadata": {f"k{i}": "v" for i in range(51)}},
    "metadata key too long": {"metadata": {"k" * 41: "v"}},
}


@pytest.mark.parametrize("changes", SCHEMA_VIOLATIONS.values(), ids=SCHEMA_VIOLATIONS.keys())
def test_schema_violations_are_422_and_write_nothing(client, db, accounts, changes):
    if changes.get("to_account_id") == "SAME":
        changes = {"to_account_id": accounts["a"]}
    before = table_counts(db)
    key = new_key()
    response = client.post("/v1/transfers", json=body(accounts, **changes),
                           headers={**JSON, "X-Idempotency-Key": key})
    error = assert_error(response, 422, "validation_error")
    assert error["error"]["details"], "a validation error names the fields"
    assert table_counts(db) == before
    # The key was not burned: a corrected request with it goes through.
    retry = client.post("/v1/transfers", json=body(accounts), headers={**JSON, "X-Idempotency-Key": key})
    assert retry.status_code == 201


@pytest.mark.parametrize("digits", ["1" + "0" * 5000, "-" + "9" * 100_000])
def test_integer_literals_of_thousands_of_digits_are_422(client, db, accounts, digits):
    payload = json.dumps(body(accounts, amount=0)).replace('"amount": 0', f'"amount": {digits}')
    before = table_counts(db)
    response = client.post("/v1/transfers", data=payload,
                           headers={**JSON, "X-Idempotency-Key": new_key()})
    error = assert_error(response, 422, "validation_error")
    assert "amount" in error["error"]["details"]
    assert table_counts(db) == before


def test_top_level_json_that_is_not_an_object(client, accounts):
    for payload in ("[]", "1", '"text"', "null"):
        response = client.post("/v1/transfers", data=payload,
                               headers={**JSON, "X-Idempotency-Key": new_key()})
        assert_error(response, 422, "validation_error")


MALFORMED = {
    "truncated": '{"amount": 1',
    "trailing comma": '{"amount": 1,}',
    "single quotes": "{'amount': 1}",
    "NaN": '{"amount": NaN}',
    "Infinity": '{"amount": Infinity}',
    "empty": "",
    "not utf-8": b'{"amount": "\xff\xfe"}',
    "deep nesting": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_json_is_400_invalid_json(client, db, accounts, payload):
    before = table_counts(db)
    response = client.post("/v1/transfers", data=payload,
                           headers={**JSON, "X-Idempotency-Key": new_key()})
    assert_error(response, 400, "invalid_json")
    assert table_counts(db) == before


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_wrong_content_type_is_415(client, accounts, content_type):
    headers = {"X-Idempotency-Key": new_key()}
    if content_type:
        headers["Content-Type"] = content_type
    response = client.post("/v1/transfers", data='{"amount": 1}', headers=headers)
    assert_error(response, 415, "unsupported_media_type")


def test_json_with_charset_is_accepted(client, accounts):
    response = client.post("/v1/transfers", data=json.dumps(body(accounts)),
                           headers={"Content-Type": "application/json; charset=utf-8",
                                    "X-Idempotency-Key": new_key()})
    assert response.status_code == 201


def test_oversized_body_is_413(client, db, accounts):
    before = table_counts(db)
    payload = '{"description": "' + "x" * (1024 * 1024) + '"}'
    response = client.post("/v1/transfers", data=payload,
                           headers={**JSON, "X-Idempotency-Key": new_key()})
    assert_error(response, 413, "payload_too_large")
    assert table_counts(db) == before


def test_missing_idempotency_key_is_400(client, db, accounts):
    before = table_counts(db)
    response = client.post("/v1/transfers", json=body(accounts), headers=JSON)
    assert_error(response, 400, "idempotency_key_missing")
    assert table_counts(db) == before


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\tkey", "clé"])
def test_invalid_idempotency_key_is_400(client, accounts, key):
    try:
        response = client.post("/v1/transfers", json=body(accounts),
                               headers={**JSON, "X-Idempotency-Key": key})
    except ValueError:
        pytest.skip("the test client itself refuses this header value")
    assert_error(response, 400, "idempotency_key_invalid")


def test_longest_idempotency_key_is_accepted(client, accounts):
    response = client.post("/v1/transfers", json=body(accounts),
                           headers={**JSON, "X-Idempotency-Key": "~" * 255})
    assert response.status_code == 201


BUSINESS_REFUSALS = {
    "unknown source": ({"from_account_id": "00000000-0000-0000-0000-000000000001"}, 404,
                       "account_not_found"),
    "unknown destination": ({"to_account_id": "00000000-0000-0000-0000-000000000001"}, 404,
                            "account_not_found"),
    "currency mismatch between accounts": ({"to_account_id": "EUR"}, 422, "currency_mismatch"),
    "currency mismatch with request": ({"currency": "EUR"}, 422, "currency_mismatch"),
    "insufficient funds": ({"amount": 1_001}, 422, "insufficient_funds"),
    "insufficient funds at bigint max": ({"amount": BIGINT_MAX}, 422, "insufficient_funds"),
}


@pytest.mark.parametrize(("changes", "status", "code"), BUSINESS_REFUSALS.values(),
                         ids=BUSINESS_REFUSALS.keys())
def test_business_refusals_change_no_money_and_replay(client, db, accounts, changes, status, code):
    if changes.get("to_account_id") == "EUR":
        changes = {"to_account_id": accounts["eur"]}
    before = table_counts(db)
    key = new_key()
    request = {"json": body(accounts, **changes), "headers": {**JSON, "X-Idempotency-Key": key}}
    first = client.post("/v1/transfers", **request)
    assert_error(first, status, code)
    counts = table_counts(db)
    assert {name: counts[name] - before[name] for name in counts} == {
        "accounts": 0, "transfers": 0, "entries": 0, "outbox": 0, "idempotency_keys": 1}
    # The outcome is stored: a retry replays it, it never executes twice.
    again = client.post("/v1/transfers", **request)
    assert again.status_code == status and again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"


def test_balance_past_bigint_is_refused(client, db):
    api = Api(client)
    world = create_system_account(db)
    rich = api.create_account()
    api.ok_transfer(world, rich, BIGINT_MAX)
    other_world = create_system_account(db)
    assert_error(api.transfer(other_world, rich, 1), 422, "balance_limit_exceeded")


def test_unknown_route_and_method(client):
    assert_error(client.get("/v2/nothing"), 404, "not_found")
    response = client.delete("/v1/transfers")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


ACCOUNT_VIOLATIONS = {
    "no name": {"name": ...},
    "empty name": {"name": ""},
    "long name": {"name": "n" * 201},
    "no currency": {"currency": ...},
    "bad currency": {"currency": "US"},
    "negative overdraft": {"overdraft_limit": -1},
    "float overdraft": {"overdraft_limit": 1.5},
    "null overdraft": {"overdraft_limit": None},
    "huge overdraft": {"overdraft_limit": 2**63},
    "system flag": {"is_system": True},
    "balance": {"balance": 100},
}


@pytest.mark.parametrize("changes", ACCOUNT_VIOLATIONS.values(), ids=ACCOUNT_VIOLATIONS.keys())
def test_account_schema_violations(client, db, changes):
    before = table_counts(db)
    payload = {"name": "n", "currency": "USD", **changes}
    payload = {key: value for key, value in payload.items() if value is not ...}
    assert_error(client.post("/v1/accounts", json=payload, headers=JSON), 422, "validation_error")
    assert table_counts(db) == before
