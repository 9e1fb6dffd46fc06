"""/health reports the incremental audit; /ready says whether we can serve."""

from __future__ import annotations

import pytest

from payflow import embedded, migrations
from payflow.schemas import HealthSchema, ReadySchema
from tests.conftest import make_app, make_config, new_api_key
from tests.helpers import Api, assert_error, assert_schema, create_system_account, new_key


def _health(client):
    response = client.get("/health")
    assert_schema(response.get_json(), HealthSchema)
    return response


def test_healthy_on_a_clean_ledger(client):
    response = _health(client)
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "healthy" and body["ledger_integrity_sum"] == 0
    assert body["audited_at"] and body["problems"] == []


def test_audit_catches_up_with_new_entries(client, db):
    api = Api(client)
    world, alice = create_system_account(db), api.create_account()
    for amount in (5, 6, 7):
        api.ok_transfer(world, alice, amount)
    # A step records a horizon, the next one audits up to it.
    _health(client)
    body = _health(client).get_json()
    assert body["audited_through_entry_id"] == 6
    assert body["status"] == "healthy" and body["ledger_integrity_sum"] == 0


def test_tampered_balance_is_503_with_the_reason(client, db):
    api = Api(client)
    world, alice = create_system_account(db), api.create_account()
    api.ok_transfer(world, alice, 100)
    assert _health(client).status_code == 200
    db.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (alice,))
    response = _health(client)
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unhealthy" and "balances_unbalanced" in body["reason"]


def test_a_paired_hand_edit_of_balances_is_503_naming_both_accounts(client, db):
    """The per-currency sum still is 0; the per-account check finds them."""
    api = Api(client)
    world, alice = create_system_account(db), api.create_account()
    api.ok_transfer(world, alice, 100)
    db.execute("UPDATE accounts SET balance = balance + 500 WHERE id = %s", (alice,))
    db.execute("UPDATE accounts SET balance = balance - 500 WHERE id = %s", (world,))
    body = _health(client).get_json()
    assert body["status"] == "unhealthy" and "balance_disagrees_with_entries" in body["reason"]
    assert sorted(p["account_id"] for p in body["problems"]) == sorted([alice, world])
    db.execute("UPDATE accounts SET balance = balance - 500 WHERE id = %s", (alice,))
    db.execute("UPDATE accounts SET balance = balance + 500 WHERE id = %s", (world,))
    assert _health(client).status_code == 200  # the window re-checked them


def test_the_balance_check_rotates_through_every_account(client, db, database_url):
    api = Api(client)
    world = create_system_account(db)
    accounts = [api.create_account() for _ in range(5)]
    for account in accounts:
        api.ok_transfer(world, account, 10)
    db.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (accounts[3],))
    db.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s", (accounts[4],))
    small = make_app(make_config(database_url, "", audit_accounts_per_step=2))
    try:
        bodies = [_health(small.test_client()).get_json() for _ in range(4)]
    finally:
        small.extensions["payflow"].close()
    named = {p["account_id"] for body in bodies for p in body["problems"]}
    assert named == {accounts[3], accounts[4]}


def test_the_account_audit_endpoint_shows_differences_and_breaks(client, db):
    from payflow.schemas import AccountAuditSchema

    api = Api(client)
    world, alice = create_system_account(db), api.create_account()
    api.ok_transfer(world, alice, 100)
    api.ok_transfer(world, alice, 50)
    clean = client.get(f"/v1/accounts/{alice}/audit").get_json()
    assert_schema(clean, AccountAuditSchema)
    assert clean["consistent"] and clean["difference"] == 0 and clean["entries"] == 2
    db.execute("UPDATE accounts SET balance = balance + 7 WHERE id = %s", (alice,))
    db.execute("ALTER TABLE entries DISABLE TRIGGER entries_immutable")
    db.execute("UPDATE entries SET balance_after = 99 WHERE account_id = %s AND account_version = 1",
               (alice,))
    db.execute("ALTER TABLE entries ENABLE TRIGGER entries_immutable")
    broken = client.get(f"/v1/accounts/{alice}/audit").get_json()
    assert not broken["consistent"] and broken["difference"] == 7
    assert [b["account_version"] for b in broken["chain_breaks"]] == [1]
    assert_error(client.get("/v1/accounts/nope/audit"), 404, "account_not_found")


def test_a_broken_entry_chain_is_503_and_stays_reported(client, db):
    """An entry whose balance_after does not continue its account's chain
    (written around the posting function, by hand) is found by the audit."""
    api = Api(client)
    world, alice, bob = create_system_account(db), api.create_account(), api.create_account()
    api.ok_transfer(world, alice, 100)
    _health(client)
    transfer = api.ok_transfer(alice, bob, 10)
    db.execute("ALTER TABLE entries DISABLE TRIGGER entries_immutable")
    db.execute("UPDATE entries SET balance_after = balance_after + 1 WHERE transfer_id = %s "
               "AND amount > 0", (transfer["id"],))
    db.execute("ALTER TABLE entries ENABLE TRIGGER entries_immutable")
    _health(client)
    body = _health(client).get_json()
    assert body["status"] == "unhealthy"
    assert [p["account_id"] for p in body["problems"] if p["code"] == "entry_chain_broken"] == [bob]
    assert _health(client).status_code == 503  # until an operator rebuilds the audit


def test_the_audit_never_passes_an_uncommitted_entry(client, db, database_url):
    """bigserial ids commit out of order: an entry id taken by a transaction
    still running must not be skipped when a later id commits first."""
    import psycopg

    api = Api(client)
    world, alice, bob, carol = (create_system_account(db), api.create_account(),
                                api.create_account(), api.create_account())
    api.ok_transfer(world, alice, 1_000)
    _health(client)
    _health(client)
    slow = psycopg.connect(database_url)
    slow.execute("SELECT payflow_post_transfer_v1('default', %s, %s, 60, 'transfer', %s, %s, 7,"
                 " NULL, NULL, NULL)", (new_key(), "0" * 64, alice, bob))  # not committed yet
    for _ in range(3):  # nothing else commits: the slow transaction is the newest
        _health(client)
    api.ok_transfer(world, carol, 5)  # takes a later id, commits first
    for _ in range(3):
        _health(client)
    slow.commit()
    slow.close()
    # Had the audit skipped the slow entries, alice's and bob's next entries
    # would not continue their audited chains.
    api.ok_transfer(alice, bob, 1)
    for _ in range(3):
        body = _health(client).get_json()
    assert body["status"] == "healthy", body
    assert body["audited_through_entry_id"] == 8


@pytest.fixture
def doomed_database(test_home):
    """A PostgreSQL of its own, so the test may stop it."""
    server = embedded.EmbeddedPostgres(test_home / f"doomed-{new_key()}" / "data", durable=False)
    server.start()
    migrations.migrate(server.url)
    yield server
    server.stop()


def test_database_down_is_503_everywhere(doomed_database, servers):
    app = make_app(make_config(doomed_database.url, servers["redis"], pool_wait_timeout_seconds=0.5))
    client = app.test_client()
    assert client.get("/ready").status_code == 200
    account = Api(client).create_account()
    _, uncached_secret = new_api_key(doomed_database.url, ["read"])
    doomed_database.stop()
    try:
        health = _health(client)
        assert health.status_code == 503 and "database unreachable" in health.get_json()["reason"]
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert_schema(ready.get_json(), ReadySchema)
        response = client.get("/v1/accounts/x", headers={"Authorization": f"Bearer {uncached_secret}"})
        assert_error(response, 503, "unavailable")  # a key not cached yet cannot be checked either
        response = client.get(f"/v1/accounts/{account}")
        assert_error(response, 503, "unavailable")
        assert response.headers["Retry-After"]
        response = client.post("/v1/transfers", json={
            "from_account_id": account, "to_account_id": "00000000-0000-0000-0000-000000000001",
            "amount": 5}, headers={"X-Idempotency-Key": new_key()})
        assert_error(response, 503, "unavailable")
    finally:
        app.extensions["payflow"].close()
