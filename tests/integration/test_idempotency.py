"""Idempotency (DESIGN.md): replay, reuse, in flight, nothing burned by a
rejected or rolled-back request, and all of it with Redis stopped."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from payflow import embedded
from payflow.idempotency import RedisGuard
from tests.conftest import make_app, make_config
from tests.helpers import (
    JSON,
    Api,
    HttpClient,
    assert_error,
    assert_ledger_consistent,
    create_system_account,
    new_key,
    table_counts,
)


@pytest.fixture
def funded(client, db):
    api = Api(client)
    world = create_system_account(db)
    source, destination = api.create_account(), api.create_account()
    api.ok_transfer(world, source, 10_000)
    return api, source, destination


def test_replay_returns_the_stored_status_and_body_exactly(funded, db):
    api, source, destination = funded
    key = new_key()
    first = api.transfer(source, destination, 700, key=key)
    again = api.transfer(source, destination, 700, key=key)
    assert first.status_code == again.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()
    assert api.balance(source) == 10_000 - 700
    assert db.execute("SELECT count(*) AS n FROM transfers WHERE amount = 700").fetchone()["n"] == 1


def test_same_request_with_other_spacing_and_key_order_replays(funded, client):
    api, source, destination = funded
    key = new_key()
    first = client.post("/v1/transfers", headers={**JSON, "X-Idempotency-Key": key},
                        data=f'{{"from_account_id":"{source}","to_account_id":"{destination}","amount":5}}')
    again = client.post("/v1/transfers", headers={**JSON, "X-Idempotency-Key": key},
                        data=f'{{ "amount": 5,\n "to_account_id": "{destination}", '
                             f'"from_account_id": "{source}" }}')
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()


def test_same_key_different_body_is_422_and_changes_nothing(funded, db):
    api, source, destination = funded
    key = new_key()
    assert api.transfer(source, destination, 100, key=key).status_code == 201
    before = table_counts(db)
    assert_error(api.transfer(source, destination, 101, key=key), 422, "idempotency_key_reused")
    assert_error(api.transfer(destination, source, 100, key=key), 422, "idempotency_key_reused")
    assert table_counts(db) == before


def test_same_key_on_another_endpoint_is_reused(funded, client):
    api, source, destination = funded
    key = new_key()
    assert api.transfer(source, destination, 100, key=key).status_code == 201
    response = client.post("/v1/accounts", json={"name": "x", "currency": "USD"},
                           headers={**JSON, "X-Idempotency-Key": key})
    assert_error(response, 422, "idempotency_key_reused")


def test_a_rolled_back_transaction_does_not_burn_the_key(funded, db):
    """A failure inside the transaction (here a trigger raising a deadlock, so
    every retry fails too) rolls everything back, the stored response included."""
    api, source, destination = funded
    db.execute("""
        CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = 'deadlock_detected'; END $$;
        CREATE TRIGGER test_fail BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION test_fail();
    """)
    key = new_key()
    before = table_counts(db)
    failed = api.transfer(source, destination, 100, key=key)
    assert_error(failed, 503, "unavailable")
    assert failed.headers["Retry-After"]
    assert table_counts(db) == before
    db.execute("DROP TRIGGER test_fail ON outbox")
    retried = api.transfer(source, destination, 100, key=key)
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried.headers
    assert api.balance(source) == 10_000 - 100


def test_a_key_expires_after_its_ttl(funded, db, app):
    api, source, destination = funded
    key = new_key()
    assert api.transfer(source, destination, 100, key=key).status_code == 201
    # A day passes: the key expires in the database, and long before that its
    # answer left the Redis replay cache.
    db.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = %s",
               (key,))
    guard = app.extensions["payflow"].guard
    assert guard._client.delete(guard._name(app.config["TEST_API_KEY_ID"], "idem", key)) == 1
    again = api.transfer(source, destination, 200, key=key)
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers


def test_a_running_request_holds_its_key_in_the_database(funded, database_url, app):
    """The database decides: while a transaction executes a key (its advisory
    lock held), the same key is 409; once it ends, the key is free again."""
    api, source, destination = funded
    key = new_key()
    with psycopg.connect(database_url) as other:
        other.execute("SELECT payflow_idempotency_begin_v1(%s, %s, %s)",
                      (app.config["TEST_API_KEY_ID"], key, "0" * 64))
        # Redis knows nothing of this one (a different process): the DB answers.
        response = api.transfer(source, destination, 100, key=key)
        assert_error(response, 409, "idempotency_key_in_use")
        assert response.headers["Retry-After"]
        other.rollback()  # the "crashed" request: nothing stored, lock gone
    assert api.transfer(source, destination, 100, key=key).status_code == 201


def test_an_orphaned_redis_lock_still_replays_a_completed_request(funded, app):
    api, source, destination = funded
    key = new_key()
    first = api.transfer(source, destination, 100, key=key)
    guard = app.extensions["payflow"].guard
    # A process that died holding the lock, over the cached answer.
    name = guard._name(app.config["TEST_API_KEY_ID"], "idem", key)
    guard._client.set(name, "token-of-a-dead-process", px=10_000)
    again = api.transfer(source, destination, 100, key=key)
    assert again.headers["Idempotent-Replayed"] == "true" and again.get_data() == first.get_data()
    assert guard._client.get(name) == b"token-of-a-dead-process"  # not ours: left alone


def test_concurrent_requests_with_one_key_execute_once(live_server):
    results = _race_one_key(live_server, threads=20)
    _assert_one_execution(results, live_server)


def _race_one_key(live_server, threads: int) -> list:
    setup = HttpClient(live_server["base_url"], live_server["api_key"])
    with psycopg.connect(live_server["database_url"], autocommit=True) as db:
        world = create_system_account(db)
    _, _, source = setup.request("POST", "/v1/accounts", {"name": "s", "currency": "USD"})
    _, _, destination = setup.request("POST", "/v1/accounts", {"name": "d", "currency": "USD"})
    setup.transfer(world, source["id"], 1_000)
    key, barrier, results = new_key(), threading.Barrier(threads), []

    def one() -> None:
        client = HttpClient(live_server["base_url"], live_server["api_key"])
        barrier.wait()
        results.append(client.transfer(source["id"], destination["id"], 10, key=key))
        client.close()

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    _, _, account = setup.request("GET", f"/v1/accounts/{source['id']}")
    results.append(account)
    return results


def _assert_one_execution(results: list, live_server) -> None:
    account = results.pop()
    statuses = sorted(status for status, _, _ in results)
    created = [(headers, body) for status, headers, body in results if status == 201]
    fresh = [body for headers, body in created if headers.get("Idempotent-Replayed") != "true"]
    assert len(fresh) == 1, statuses
    assert all(status in (201, 409) for status in statuses), statuses
    assert all(body == fresh[0] for _, body in created)
    for status, headers, body in results:
        if status == 409:
            assert body["error"]["code"] == "idempotency_key_in_use" and headers["Retry-After"]
    assert account["balance"] == 1_000 - 10
    assert_ledger_consistent(live_server["database_url"])


# -- Redis stopped ---------------------------------------------------------------


@pytest.fixture
def redis_down_app(database_url, test_home):
    """An app whose Redis is a real server, stopped before the requests."""
    redis_server = embedded.EmbeddedRedis(test_home / f"redis-{new_key()}")
    redis_server.start()
    app = make_app(make_config(database_url, redis_server.url, redis_timeout_ms=100))
    redis_server.stop()
    yield app
    app.extensions["payflow"].close()


def test_with_redis_stopped_everything_stays_correct(redis_down_app, db):
    client = redis_down_app.test_client()
    api = Api(client)
    world = create_system_account(db)
    source, destination = api.create_account(), api.create_account()
    api.ok_transfer(world, source, 1_000)

    key = new_key()
    first = api.transfer(source, destination, 100, key=key)
    again = api.transfer(source, destination, 100, key=key)
    assert first.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert_error(api.transfer(source, destination, 5, key=key), 422, "idempotency_key_reused")
    bad = client.post("/v1/transfers", json={"amount": "x"}, headers={**JSON, "X-Idempotency-Key": "k2"})
    assert_error(bad, 422, "validation_error")
    assert api.transfer(source, destination, 1, key="k2").status_code == 201
    assert api.balance(source) == 1_000 - 101

    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.get_json() == {"status": "degraded", "database": "ok", "redis": "down"}


def test_with_redis_stopped_concurrent_requests_with_one_key_execute_once(redis_down_app, db,
                                                                          database_url):
    client = redis_down_app.test_client()
    api = Api(client)
    world = create_system_account(db)
    source, destination = api.create_account(), api.create_account()
    api.ok_transfer(world, source, 1_000)
    key, barrier, results = new_key(), threading.Barrier(20), []

    def one() -> None:
        own = redis_down_app.test_client()
        barrier.wait()
        response = Api(own).transfer(source, destination, 10, key=key)
        results.append((response.status_code, dict(response.headers), response.get_json()))

    workers = [threading.Thread(target=one) for _ in range(20)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.append({"balance": api.balance(source)})
    _assert_one_execution(results, {"database_url": database_url})


def test_a_replay_inside_the_cache_window_needs_no_database(funded, db, app):
    """The committed answer is cached in Redis: with the database's record
    gone, a replay still answers the very bytes; a different body is still
    refused as a reused key, and an invalid one still fails validation."""
    api, source, destination = funded
    key = new_key()
    first = api.transfer(source, destination, 100, key=key)
    db.execute("DELETE FROM idempotency_keys WHERE key = %s", (key,))
    again = api.transfer(source, destination, 100, key=key)
    assert again.headers["Idempotent-Replayed"] == "true" and again.get_data() == first.get_data()
    assert_error(api.transfer(source, destination, 200, key=key), 422, "idempotency_key_reused")
    assert_error(api.transfer(source, destination, -5, key=key), 422, "validation_error")
    assert api.balance(source) == 10_000 - 100


def test_a_restarted_redis_is_used_again_with_its_scripts_reloaded(database_url, test_home, db):
    """Each request thread keeps its own Redis connection (redis_scripts): after
    a Redis restart (connections closed, scripts forgotten) the next request
    reconnects, reloads the script and is guarded as before: no failure, no
    fall back to PostgreSQL alone."""
    redis_server = embedded.EmbeddedRedis(test_home / f"redis-{new_key()}")
    redis_server.start()
    app = make_app(make_config(database_url, redis_server.url, redis_timeout_ms=200))
    try:
        api = Api(app.test_client())
        world = create_system_account(db)
        source, destination = api.create_account(), api.create_account()
        api.ok_transfer(world, source, 1_000)
        guard = app.extensions["payflow"].guard
        redis_server.stop()
        redis_server.start()  # same port, empty, no scripts loaded
        first = api.transfer(source, destination, 10, key=(key := new_key()))
        assert first.status_code == 201 and guard.available  # Redis did not fail
        cached = guard._client.get(guard._name(app.config["TEST_API_KEY_ID"], "idem", key))
        assert cached is not None and cached.startswith(b"done:")  # Redis guarded it
        replay = api.transfer(source, destination, 10, key=key)
        assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
        assert replay.get_data() == first.get_data()
    finally:
        app.extensions["payflow"].close()
        redis_server.stop()


def test_a_redis_restart_costs_no_thread_a_failed_call(test_home):
    """(From a review: every thread's first call after a restart used to fail
    and open the process-wide breaker, one thread after another.)"""
    server = embedded.EmbeddedRedis(test_home / f"redis-{new_key()}")
    server.start()
    guard = RedisGuard(make_config("postgresql://unused/unused", server.url,
                                   redis_retry_after_failure_seconds=0.2))
    warm, go, counts = threading.Barrier(5), threading.Event(), {}

    def worker(index: int) -> None:
        guard.admit("scope", None, 0, 60, 0)  # this thread's connection exists
        warm.wait()
        go.wait()
        time.sleep(0.3 * index)  # one after another, each past the breaker's window
        counts[index] = guard.admit("scope", None, 0, 60, 0).count

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(4)]
    try:
        for thread in threads:
            thread.start()
        warm.wait()
        server.stop()
        server.start()
        go.set()
        for thread in threads:
            thread.join()
    finally:
        guard.close()
        server.stop()
    assert sorted(counts) == [0, 1, 2, 3] and None not in counts.values()  # None: Redis failed
