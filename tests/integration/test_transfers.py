"""The happy paths of accounts, transfers and entries."""

from __future__ import annotations

import psycopg
import pytest

from payflow.schemas import AccountSchema, EntriesPageSchema, TransferSchema
from tests.helpers import (
    JSON,
    Api,
    assert_error,
    assert_ledger_consistent,
    assert_schema,
    create_system_account,
    new_key,
)


@pytest.fixture
def api(client):
    return Api(client)


def test_transfer_moves_money_and_writes_balanced_entries(api, db, database_url):
    world = create_system_account(db)
    alice, bob = api.create_account(), api.create_account()
    api.ok_transfer(world, alice, 10_000)
    transfer = api.ok_transfer(alice, bob, 2_500, description="rent", metadata={"invoice": "42"})

    assert transfer["amount"] == 2_500 and transfer["currency"] == "USD"
    assert transfer["description"] == "rent" and transfer["metadata"] == {"invoice": "42"}
    assert (api.balance(world), api.balance(alice), api.balance(bob)) == (-10_000, 7_500, 2_500)

    entries = db.execute("SELECT account_id::text, amount, balance_after, account_version "
                         "FROM entries WHERE transfer_id = %s ORDER BY id", (transfer["id"],)).fetchall()
    assert entries == [
        {"account_id": alice, "amount": -2_500, "balance_after": 7_500, "account_version": 2},
        {"account_id": bob, "amount": 2_500, "balance_after": 2_500, "account_version": 1},
    ]
    outbox = db.execute("SELECT topic, payload FROM outbox ORDER BY id DESC LIMIT 1").fetchone()
    assert outbox == {"topic": "transfer.posted", "payload": {"transfer_id": transfer["id"]}}
    assert_ledger_consistent(database_url)


def test_get_transfer_returns_the_same_body_as_creation(api, db, client):
    world, alice = create_system_account(db), api.create_account()
    created = api.ok_transfer(world, alice, 100)
    fetched = client.get(f"/v1/transfers/{created['id']}")
    assert fetched.status_code == 200
    assert fetched.get_json() == {**created, "amount_refunded": 0, "refunds": []}
    assert_schema(fetched.get_json(), TransferSchema)


def test_get_account(api, client):
    account_id = api.create_account(currency="EUR", overdraft_limit=500, name="Zoë ✓")
    body = client.get(f"/v1/accounts/{account_id}").get_json()
    assert_schema(body, AccountSchema)
    assert body["name"] == "Zoë ✓" and body["currency"] == "EUR"
    assert body["balance"] == 0 and body["overdraft_limit"] == 500 and body["is_system"] is False


def test_overdraft_limit_lets_balance_go_negative_up_to_the_limit(api):
    alice, bob = api.create_account(overdraft_limit=1_000), api.create_account()
    api.ok_transfer(alice, bob, 1_000)
    assert api.balance(alice) == -1_000
    assert_error(api.transfer(alice, bob, 1), 422, "insufficient_funds")


def test_currency_comes_from_the_accounts_when_omitted(api, db):
    world = create_system_account(db, "JPY")
    account = api.create_account(currency="JPY")
    assert api.ok_transfer(world, account, 5)["currency"] == "JPY"


def test_entries_are_paged_newest_first(api, db, client):
    world, alice = create_system_account(db), api.create_account()
    for amount in range(1, 8):
        api.ok_transfer(world, alice, amount)
    seen, cursor = [], None
    while True:
        query = f"?limit=3&cursor={cursor}" if cursor else "?limit=3"
        page = client.get(f"/v1/accounts/{alice}/entries{query}").get_json()
        assert_schema(page, EntriesPageSchema)
        seen += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [entry["amount"] for entry in seen] == [7, 6, 5, 4, 3, 2, 1]
    assert [entry["balance_after"] for entry in seen] == [28, 21, 15, 10, 6, 3, 1]
    assert len({entry["id"] for entry in seen}) == 7


def test_entries_page_within_a_time_window(api, db, client):
    world, alice = create_system_account(db), api.create_account()
    api.ok_transfer(world, alice, 1)
    middle = db.execute("SELECT clock_timestamp() AS at").fetchone()["at"].isoformat()
    api.ok_transfer(world, alice, 2)
    since = client.get(f"/v1/accounts/{alice}/entries", query_string={"since": middle}).get_json()
    until = client.get(f"/v1/accounts/{alice}/entries", query_string={"until": middle}).get_json()
    assert [e["amount"] for e in since["data"]] == [2]
    assert [e["amount"] for e in until["data"]] == [1]
    assert_error(client.get(f"/v1/accounts/{alice}/entries", query_string={"since": "2026-01-01"}),
                 422, "validation_error")


def test_entries_page_of_an_account_without_entries(api, client):
    alice = api.create_account()
    assert client.get(f"/v1/accounts/{alice}/entries").get_json() == {"data": [], "next_cursor": None}


@pytest.mark.parametrize("query", ["?limit=0", "?limit=101", "?limit=abc", "?limit=1.5",
                                   "?cursor=nonsense", "?cursor=ZW50cmllczotMQ", "?other=1"])
def test_bad_page_parameters_are_422(api, client, query):
    alice = api.create_account()
    assert_error(client.get(f"/v1/accounts/{alice}/entries{query}"), 422, "validation_error")


@pytest.mark.parametrize("path", [
    "/v1/accounts/00000000-0000-0000-0000-000000000000",
    "/v1/accounts/not-a-uuid",
    "/v1/accounts/00000000-0000-0000-0000-000000000000/entries",
    "/v1/accounts/%F0%9F%92%B8/entries",
])
def test_unknown_accounts_are_404(client, path):
    assert_error(client.get(path), 404, "account_not_found")


@pytest.mark.parametrize("path", ["/v1/transfers/00000000-0000-0000-0000-000000000000",
                                  "/v1/transfers/123"])
def test_unknown_transfers_are_404(client, path):
    assert_error(client.get(path), 404, "transfer_not_found")


def test_account_creation_is_idempotent_when_a_key_is_given(client):
    key = new_key()
    body = {"name": "Alice", "currency": "USD"}
    first = client.post("/v1/accounts", json=body, headers={**JSON, "X-Idempotency-Key": key})
    again = client.post("/v1/accounts", json=body, headers={**JSON, "Idempotency-Key": key})
    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()


def test_entries_and_transfers_are_immutable_in_the_database(api, db):
    world, alice = create_system_account(db), api.create_account()
    api.ok_transfer(world, alice, 100)
    for statement in ("UPDATE entries SET amount = amount + 1", "DELETE FROM entries",
                      "TRUNCATE entries CASCADE", "UPDATE transfers SET amount = 1",
                      "DELETE FROM transfers"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="immutable"):
            db.execute(statement)


def test_database_refuses_unbalanced_entries_and_overdrafts(api, db):
    world, alice = create_system_account(db), api.create_account()
    transfer = api.ok_transfer(world, alice, 100)
    with pytest.raises(psycopg.errors.CheckViolation, match="sum to zero"):
        db.execute("INSERT INTO entries (transfer_id, account_id, amount, balance_after, account_version)"
                   " VALUES (%s, %s, 5, 105, 99)", (transfer["id"], alice))
    with pytest.raises(psycopg.errors.CheckViolation, match="accounts_overdraft_limit"):
        db.execute("UPDATE accounts SET balance = -1 WHERE id = %s", (alice,))
    bob = api.create_account(currency="EUR")
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="transfers_to_currency"):
        db.execute("INSERT INTO transfers (kind, from_account_id, to_account_id, amount, currency)"
                   " VALUES ('transfer', %s, %s, 1, 'USD')", (alice, bob))
