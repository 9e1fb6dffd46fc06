"""Refunds (partial, concurrent, never past the original, never of a refund)
and point-in-time balances."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row

from tests.helpers import (
    JSON,
    Api,
    HttpClient,
    assert_error,
    assert_ledger_consistent,
    create_system_account,
    new_key,
)


@pytest.fixture
def paid(client, db):
    api = Api(client)
    world = create_system_account(db)
    payer, payee = api.create_account(), api.create_account()
    api.ok_transfer(world, payer, 10_000)
    transfer = api.ok_transfer(payer, payee, 1_000)
    return api, payer, payee, transfer


def refund(client, transfer_id, key=None, **body):
    return client.post(f"/v1/transfers/{transfer_id}/refunds", json=body,
                       headers={**JSON, "X-Idempotency-Key": key or new_key()})


def test_partial_refunds_up_to_the_original(client, paid, database_url):
    api, payer, payee, transfer = paid
    first = refund(client, transfer["id"], amount=300, description="broken item")
    assert first.status_code == 201
    body = first.get_json()
    assert body["kind"] == "refund" and body["reverses_transfer_id"] == transfer["id"]
    assert (body["from_account_id"], body["to_account_id"], body["amount"]) == (payee, payer, 300)
    rest = refund(client, transfer["id"])  # no amount: all that is left
    assert rest.status_code == 201 and rest.get_json()["amount"] == 700
    assert_error(refund(client, transfer["id"], amount=1), 422, "refund_exceeds_transfer")
    assert_error(refund(client, transfer["id"]), 422, "refund_exceeds_transfer")
    shown = client.get(f"/v1/transfers/{transfer['id']}").get_json()
    assert shown["amount_refunded"] == 1_000
    assert [r["amount"] for r in shown["refunds"]] == [300, 700]
    assert api.balance(payer) == 10_000 and api.balance(payee) == 0
    assert_ledger_consistent(database_url)


def test_refund_rules(client, paid):
    api, payer, payee, transfer = paid
    assert_error(refund(client, transfer["id"], amount=1_001), 422, "refund_exceeds_transfer")
    refunded = refund(client, transfer["id"], amount=10).get_json()
    assert_error(refund(client, refunded["id"]), 422, "not_refundable")
    assert_error(refund(client, "00000000-0000-0000-0000-000000000000"), 404, "transfer_not_found")
    assert_error(refund(client, "nope"), 404, "transfer_not_found")
    for bad in ({"amount": 0}, {"amount": -1}, {"amount": 1.5}, {"amount": "5"}, {"other": 1}):
        assert_error(refund(client, transfer["id"], **bad), 422, "validation_error")
    key = new_key()
    once = refund(client, transfer["id"], key=key, amount=5)
    again = refund(client, transfer["id"], key=key, amount=5)
    assert again.headers["Idempotent-Replayed"] == "true" and again.get_data() == once.get_data()
    assert api.balance(payee) == 1_000 - 15


def test_a_refund_the_payee_cannot_cover_is_refused(client, db, paid):
    api, payer, payee, transfer = paid
    api.ok_transfer(payee, payer, 900)  # the payee spent most of it
    assert_error(refund(client, transfer["id"], amount=500), 422, "insufficient_funds")


def test_concurrent_partial_refunds_never_exceed_the_original(live_server):
    http = HttpClient(live_server["base_url"], live_server["api_key"])
    with psycopg.connect(live_server["database_url"], autocommit=True) as db:
        world = create_system_account(db)
    _, _, payer = http.request("POST", "/v1/accounts", {"name": "payer", "currency": "USD"})
    _, _, payee = http.request("POST", "/v1/accounts", {"name": "payee", "currency": "USD"})
    http.transfer(world, payer["id"], 5_000)
    _, _, transfer = http.transfer(payer["id"], payee["id"], 1_000)
    statuses, barrier = [], threading.Barrier(20)

    def one() -> None:
        client = HttpClient(live_server["base_url"], live_server["api_key"])
        barrier.wait()
        status, _, body = client.request("POST", f"/v1/transfers/{transfer['id']}/refunds",
                                         {"amount": 70}, {"X-Idempotency-Key": new_key()})
        statuses.append((status, body))
        client.close()

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    accepted = [body for status, body in statuses if status == 201]
    refused = [body for status, body in statuses if status == 422]
    assert len(accepted) == 14 and len(refused) == 6  # 14 x 70 = 980 <= 1000 < 15 x 70
    assert all(body["error"]["code"] == "refund_exceeds_transfer" for body in refused)
    _, _, shown = http.request("GET", f"/v1/transfers/{transfer['id']}")
    assert shown["amount_refunded"] == 980
    assert_ledger_consistent(live_server["database_url"])


@given(amounts=st.lists(st.integers(min_value=-500, max_value=500).filter(bool), min_size=1, max_size=8))
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_point_in_time_balance_replays_the_entries(client, db, amounts):
    """After each movement, remember the database clock and the balance; the
    balance as of each remembered moment is what it was then."""
    api = Api(client)
    world, account = create_system_account(db), api.create_account(overdraft_limit=10_000)
    before = db.execute("SELECT clock_timestamp() AS at").fetchone()["at"]
    history = [(before, 0)]
    for amount in amounts:
        if amount > 0:
            api.ok_transfer(world, account, amount)
        else:
            api.ok_transfer(account, world, -amount)
        at = db.execute("SELECT clock_timestamp() AS at").fetchone()["at"]
        history.append((at, api.balance(account)))
    for at, balance in history:
        response = client.get(f"/v1/accounts/{account}/balance", query_string={"as_of": at.isoformat()})
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["balance"] == balance
    long_ago = (before - timedelta(days=1)).isoformat()
    assert client.get(f"/v1/accounts/{account}/balance", query_string={"as_of": long_ago}
                      ).get_json()["balance"] == 0


@pytest.mark.parametrize("as_of", ["", "yesterday", "2026-01-01", "2026-01-01T00:00:00", "1" * 300])
def test_point_in_time_balance_needs_an_rfc3339_moment(client, paid, as_of):
    _, payer, _, _ = paid
    response = client.get(f"/v1/accounts/{payer}/balance", query_string={"as_of": as_of})
    assert_error(response, 422, "validation_error")


def test_balance_as_of_uses_the_index(database_url, client, db):
    """The plan's shape, not its time: an index lookup on (account_id, created_at)."""
    from payflow.queries import queries

    api = Api(client)
    world = create_system_account(db)
    accounts = [api.create_account() for _ in range(20)]
    db.execute("SELECT payflow_post_transfer_v1('s', NULL, NULL, 60, 'transfer', %s, a.id, 1, NULL,"
               " NULL, NULL) FROM (SELECT unnest(%s::uuid[]) AS id) a, generate_series(1, 200)",
               (world, accounts))
    db.execute("ANALYZE entries")
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        plan = conn.execute("EXPLAIN (FORMAT JSON) " + queries["balance_as_of"],
                            {"id": accounts[0], "as_of": datetime.now(UTC), "owner": None}
                            ).fetchone()["QUERY PLAN"]
    assert "'Index Name': 'entries_account_created_at'" in str(plan), plan


def test_transfer_search_pages_filters_and_tenants(client, db, database_url):
    from tests.conftest import new_api_key

    api = Api(client)
    world, alice, bob = create_system_account(db), api.create_account(), api.create_account()
    made = [api.ok_transfer(world, alice, 100 + n) for n in range(5)]
    made += [api.ok_transfer(alice, bob, 1 + n) for n in range(3)]
    refund_id = refund(client, made[-1]["id"], amount=1).get_json()["id"]

    seen, cursor = [], None
    while True:
        query = {"account_id": alice, "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/transfers", query_string=query).get_json()
        seen += [transfer["id"] for transfer in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [refund_id] + [t["id"] for t in reversed(made)]  # newest first, both sides

    refunds = client.get("/v1/transfers", query_string={"account_id": alice, "kind": "refund"}).get_json()
    assert [t["id"] for t in refunds["data"]] == [refund_id]
    middle = made[3]["created_at"]
    window = client.get("/v1/transfers", query_string={"account_id": bob, "created_before": middle}
                        ).get_json()
    assert window["data"] == []
    everything = client.get("/v1/transfers", query_string={"limit": 100}).get_json()  # admin: all
    assert len(everything["data"]) == 9

    _, other = new_api_key(database_url, ["read"])
    bearer = {"Authorization": f"Bearer {other}"}
    assert_error(client.get("/v1/transfers", headers=bearer), 422, "validation_error")
    assert_error(client.get("/v1/transfers", query_string={"account_id": alice}, headers=bearer), 404,
                 "account_not_found")
    for bad in ({"kind": "gift"}, {"limit": 0}, {"cursor": "x"}, {"created_after": "yesterday"},
                {"account_id": "nope"}):
        assert_error(client.get("/v1/transfers", query_string=bad), 422, "validation_error")


def test_transfer_search_uses_the_indexes(client, db, database_url):
    from payflow.ledger import FAR_FUTURE, FAR_PAST, LAST_UUID
    from payflow.queries import queries

    api = Api(client)
    world = create_system_account(db)
    accounts = [api.create_account() for _ in range(20)]
    db.execute("SELECT payflow_post_transfer_v1('s', NULL, NULL, 60, 'transfer', %s, a.id, 1, NULL,"
               " NULL, NULL) FROM (SELECT unnest(%s::uuid[]) AS id) a, generate_series(1, 200)",
               (world, accounts))
    db.execute("ANALYZE transfers")
    params = {"account_id": accounts[0], "before_at": FAR_FUTURE, "before_id": LAST_UUID,
              "created_after": FAR_PAST, "created_before": FAR_FUTURE, "kind": None, "status": None,
              "limit": 25}
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        by_account = str(conn.execute("EXPLAIN (FORMAT JSON) " + queries["transfers_by_account"], params
                                      ).fetchone()["QUERY PLAN"])
        everything = str(conn.execute("EXPLAIN (FORMAT JSON) " + queries["transfers_all"], params
                                      ).fetchone()["QUERY PLAN"])
    assert "'Index Name': 'transfers_from_created'" in by_account
    assert "'Index Name': 'transfers_to_created'" in by_account
    assert "'Index Name': 'transfers_created'" in everything
