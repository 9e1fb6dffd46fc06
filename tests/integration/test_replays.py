"""Replays answered before Flask (payflow/api/replays.py): the same answer the
Flask path gives, the same checks, one admission per request, and every
other outcome left to the Flask path."""

from __future__ import annotations

import time

import pytest

from tests.conftest import make_app, make_config, new_api_key
from tests.helpers import JSON, Api, assert_error, create_system_account, new_key


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def watched_app(config):
    """An app that counts the requests reaching Flask's dispatch."""
    app = make_app(config)
    app.flask_requests = []
    app.before_request(lambda: app.flask_requests.append(1))
    return app


@pytest.fixture
def config(database_url, servers):
    return make_config(database_url, servers["redis"])


@pytest.fixture
def setup(config, db):
    app = watched_app(config)
    api = Api(app.test_client())
    world = create_system_account(db)
    source, destination = api.create_account(), api.create_account()
    api.ok_transfer(world, source, 10_000)
    yield app, api, source, destination
    app.extensions["payflow"].close()


def transfer(client, source, destination, key, amount=100, headers=None, **extra):
    return client.post("/v1/transfers", json={"from_account_id": source, "to_account_id": destination,
                                             "amount": amount, **extra},
                       headers={**JSON, "X-Idempotency-Key": key, **(headers or {})})


def test_a_replay_skips_flask_and_answers_what_the_flask_path_answers(setup, config):
    app, api, source, destination = setup
    client, key = app.test_client(), new_key()
    first = transfer(client, source, destination, key, headers={"X-Request-Id": "first"})
    assert first.status_code == 201
    reached = len(app.flask_requests)
    fast = transfer(client, source, destination, key, headers={"X-Request-Id": "again"})
    assert len(app.flask_requests) == reached  # answered before Flask

    # A second app has no key cached yet: the same replay goes the Flask path.
    other = watched_app(config)
    try:
        slow = transfer(other.test_client(), source, destination, key, headers={
            "X-Request-Id": "again", **bearer(app.config["TEST_API_KEY"])})
        assert len(other.flask_requests) == 1
    finally:
        other.extensions["payflow"].close()
    assert fast.status_code == slow.status_code == 201
    assert fast.get_data() == slow.get_data() == first.get_data()
    assert fast.headers["Idempotent-Replayed"] == slow.headers["Idempotent-Replayed"] == "true"
    assert sorted(fast.headers.items()) == sorted(slow.headers.items())
    assert fast.headers["X-Request-Id"] == "again" and fast.headers["Cache-Control"] == "no-store"


def test_the_same_body_written_differently_is_still_a_replay(setup):
    app, api, source, destination = setup
    client, key = app.test_client(), new_key()
    first = transfer(client, source, destination, key)
    reached = len(app.flask_requests)
    body = f'{{ "amount" : 100, "to_account_id": "{destination}",\n "from_account_id": "{source}" }}'
    again = client.post("/v1/transfers", data=body, headers={
        "Content-Type": "application/json; charset=utf-8", "X-Idempotency-Key": key})
    assert again.status_code == 201 and again.get_data() == first.get_data()
    assert len(app.flask_requests) == reached


def test_anything_but_a_replay_of_this_request_is_decided_by_the_flask_path(setup, db):
    app, api, source, destination = setup
    client, key = app.test_client(), new_key()
    assert transfer(client, source, destination, key).status_code == 201
    assert_error(transfer(client, source, destination, key, amount=101), 422, "idempotency_key_reused")
    assert_error(transfer(client, source, destination, key, unknown_field=1), 422, "validation_error")
    wrong_type = client.post("/v1/transfers", data="{}", headers={
        "Content-Type": "text/plain", "X-Idempotency-Key": key})
    assert_error(wrong_type, 415, "unsupported_media_type")
    not_json = client.post("/v1/transfers", data="{", headers={**JSON, "X-Idempotency-Key": key})
    assert_error(not_json, 400, "invalid_json")
    too_big = client.post("/v1/transfers", data=" " * (2 << 20) + "{}", headers={
        **JSON, "X-Idempotency-Key": key})
    assert_error(too_big, 413, "payload_too_large")
    bad_key = transfer(client, source, destination, "bad\x7fkey")
    assert_error(bad_key, 400, "idempotency_key_invalid")
    assert db.execute("SELECT count(*) AS n FROM transfers WHERE from_account_id = %s",
                      (source,)).fetchone()["n"] == 1


def test_a_key_in_flight_is_409_and_the_lock_is_taken_once(setup):
    app, api, source, destination = setup
    guard = app.extensions["payflow"].guard
    client, key = app.test_client(), new_key()
    assert transfer(client, source, destination, new_key()).status_code == 201  # API key cached
    name = guard._name(app.config["TEST_API_KEY_ID"], "idem", key)
    guard._client.set(name, "token-of-a-running-request", px=10_000)
    held = transfer(client, source, destination, key)
    assert_error(held, 409, "idempotency_key_in_use")
    assert int(held.headers["Retry-After"]) >= 1
    assert guard._client.get(name) == b"token-of-a-running-request"  # not ours: left alone


def test_each_request_is_admitted_once(database_url, servers, db):
    """Replays, new keys and refusals each count once against the rate limit:
    a request the shortcut looked at and handed on is not counted again."""
    app = watched_app(make_config(database_url, servers["redis"], rate_limit_requests_per_minute=6))
    try:
        window_left = 60 - time.time() % 60
        if window_left < 5:  # all of it inside one one-minute window
            time.sleep(window_left + 0.1)
        api = Api(app.test_client())
        world = create_system_account(db)
        source = api.create_account()  # 1
        api.ok_transfer(world, source, 1_000)  # 2
        client, key = app.test_client(), new_key()
        statuses = [transfer(client, world, source, key).status_code,  # 3: a new key (handed on)
                    transfer(client, world, source, key).status_code,  # 4: a replay (before Flask)
                    transfer(client, world, source, key, amount=7).status_code,  # 5: reused (handed on)
                    transfer(client, world, source, new_key()).status_code]  # 6
        assert statuses == [201, 201, 422, 201]
        limited = transfer(client, world, source, key)  # 7: over the limit, even for a replay
        assert_error(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
    finally:
        app.extensions["payflow"].close()


def test_a_cached_answer_is_not_served_to_a_key_without_the_scope(setup, database_url):
    app, api, source, destination = setup
    client, key = app.test_client(), new_key()
    assert transfer(client, source, destination, key).status_code == 201
    _, reader = new_api_key(database_url, ["read"])
    assert client.get(f"/v1/accounts/{source}", headers=bearer(reader)).status_code == 404  # cached now
    refused = transfer(client, source, destination, key, headers=bearer(reader))
    assert_error(refused, 403, "forbidden")


def test_a_cached_answer_is_not_served_to_a_revoked_key(setup):
    app, api, source, destination = setup
    client, key = app.test_client(), new_key()
    assert transfer(client, source, destination, key).status_code == 201
    assert transfer(client, source, destination, key).status_code == 201  # a replay: key cached
    services = app.extensions["payflow"]
    marked = services.guard.mark_revoked(app.config["TEST_API_KEY_ID"], keep_ms=60_000)
    assert marked  # Redis told every process
    assert_error(transfer(client, source, destination, key), 401, "unauthorized")


def test_only_marked_static_keyed_routes_take_the_shortcut(setup):
    app, _, _, _ = setup
    shortcut = app.wsgi_app.wsgi_app  # observability wraps the replay shortcut
    # Not /v1/payouts: its answers carry a Location header of their own.
    assert shortcut._routes == {"/v1/transfers": "transfers:write", "/v1/accounts": "transfers:write"}


def test_the_other_idempotency_header_replays_before_flask_too(setup):
    app, api, source, destination = setup
    client, key = app.test_client(), new_key()
    body = {"from_account_id": source, "to_account_id": destination, "amount": 5}
    first = client.post("/v1/transfers", json=body, headers={**JSON, "Idempotency-Key": key})
    reached = len(app.flask_requests)
    again = client.post("/v1/transfers", json=body, headers={**JSON, "Idempotency-Key": key})
    assert len(app.flask_requests) == reached
    assert again.get_data() == first.get_data() and again.headers["Idempotent-Replayed"] == "true"


def test_a_payout_replay_keeps_its_location_header(setup):
    """(A replay served from the Redis-cached answer used to lose it.)"""
    app, api, source, destination = setup
    client, key = app.test_client(), new_key()
    body = {"account_id": source, "amount": 10, "destination": {"iban": "NL00TEST0123456789"}}
    first = client.post("/v1/payouts", json=body, headers={**JSON, "X-Idempotency-Key": key})
    assert first.status_code == 202, first.get_json()
    again = client.post("/v1/payouts", json=body, headers={**JSON, "X-Idempotency-Key": key})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]


def test_a_lock_handed_to_flask_is_released_when_authentication_fails(database_url, servers, db,
                                                                     monkeypatch):
    """(From a review.) The shortcut took a new key's lock and handed it on;
    the API key then dropped out of the cache and no database connection was
    free: 503, and the key must not stay locked for its retry."""
    app = watched_app(make_config(database_url, servers["redis"], pool_size_max=2,
                                  pool_wait_timeout_seconds=0.2))
    try:
        api = Api(app.test_client())
        world = create_system_account(db)
        source = api.create_account()  # the API key is cached now
        services = app.extensions["payflow"]
        real_get, calls = services.key_cache.get, []
        monkeypatch.setattr(services.key_cache, "get", lambda secret: calls.append(1) or (
            real_get(secret) if len(calls) == 1 else None))  # its TTL ends between the two reads
        held = [services.pool.getconn() for _ in range(2)]  # the database is out of reach
        client, key = app.test_client(), new_key()
        assert_error(transfer(client, world, source, key), 503, "unavailable")
        for conn in held:
            services.pool.putconn(conn)
        monkeypatch.undo()
        assert transfer(client, world, source, key).status_code == 201  # not 409 in use
    finally:
        app.extensions["payflow"].close()
