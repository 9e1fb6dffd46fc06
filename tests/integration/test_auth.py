"""API keys: every auth path, scopes, tenants, per-key idempotency, the rate
limit, revocation at once, and the CLI that manages keys."""

from __future__ import annotations

import time

import pytest
import redis
from click.testing import CliRunner

from payflow import embedded
from payflow.cli import main
from payflow.redis_scripts import ScriptRunner
from tests.conftest import make_app, make_config, new_api_key
from tests.helpers import JSON, Api, assert_error, create_system_account, new_key


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.mark.parametrize("header", ["<none>", "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz",
                                    "Bearer pf_live_nope", "Bearer not-even-a-key",
                                    "Bearer pf_live_" + "x" * 5000, "bearer\tpf_live_x"])
def test_requests_without_a_valid_key_are_401(client, header):
    headers = {"Authorization": header}
    for response in (client.get("/v1/accounts/00000000-0000-0000-0000-000000000000", headers=headers),
                     client.post("/v1/transfers", json={}, headers={**JSON, **headers})):
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_health_ready_and_openapi_stay_open(client):
    for path in ("/health", "/ready", "/openapi.json", "/metrics"):
        assert client.get(path, headers={"Authorization": "<none>"}).status_code == 200


def test_metrics_can_require_a_token(database_url, servers):
    app = make_app(make_config(database_url, servers["redis"], metrics_token="scrape-me"))
    try:
        client = app.test_client()
        assert_error(client.get("/metrics"), 401, "unauthorized")
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200
    finally:
        app.extensions["payflow"].close()


def test_only_an_admin_grants_an_overdraft(client, database_url):
    _, writer = new_api_key(database_url, ["transfers:write"])
    body = {"name": "credit", "currency": "USD", "overdraft_limit": 2**63 - 1}
    assert_error(client.post("/v1/accounts", json=body, headers={**JSON, **bearer(writer)}), 403, "forbidden")
    assert client.post("/v1/accounts", json=body, headers=JSON).status_code == 201  # admin


def test_unknown_routes_are_404_for_any_valid_key(client, database_url):
    _, reader = new_api_key(database_url, ["read"])
    assert_error(client.get("/v1/nothing-here", headers=bearer(reader)), 404, "not_found")
    assert_error(client.get("/v1/nothing-here", headers={"Authorization": "<none>"}), 401, "unauthorized")


def test_openapi_lists_the_security_scheme(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/health"]["get"]["security"] == []


def test_a_revoked_key_stops_working_at_once(client, app, database_url):
    """The API process has the key cached; the CLI, configured like the
    service (same database, same Redis), reaches it through Redis."""
    key_id, secret = new_api_key(database_url, ["read"])
    for _ in range(2):  # the second is served from the key cache
        assert client.get("/v1/accounts/x", headers=bearer(secret)).status_code == 404
    config = app.extensions["payflow"].config
    result = CliRunner().invoke(main, ["keys", "revoke", key_id], env={
        "PAYFLOW_DATABASE_URL": database_url, "PAYFLOW_REDIS_URL": config.redis_url,
        "PAYFLOW_REDIS_KEY_PREFIX": config.redis_key_prefix})
    assert result.exit_code == 0 and result.output.strip() == "revoked"
    assert_error(client.get("/v1/accounts/x", headers=bearer(secret)), 401, "unauthorized")
    assert_error(client.get("/v1/accounts/x", headers=bearer(secret)), 401, "unauthorized")


def test_a_revocation_redis_never_heard_of_takes_effect_within_the_key_cache_ttl(database_url, servers,
                                                                              db):
    app = make_app(make_config(database_url, servers["redis"], api_key_cache_seconds=2))
    client = app.test_client()
    key_id, secret = new_api_key(database_url, ["read"])
    assert client.get("/v1/accounts/x", headers=bearer(secret)).status_code == 404
    db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id,))  # behind our back
    assert client.get("/v1/accounts/x", headers=bearer(secret)).status_code == 404  # cached
    time.sleep(2.1)
    assert_error(client.get("/v1/accounts/x", headers=bearer(secret)), 401, "unauthorized")
    app.extensions["payflow"].close()


def test_the_cli_says_when_it_cannot_tell_the_api_processes_at_once(database_url):
    key_id, _ = new_api_key(database_url, ["read"])
    result = CliRunner().invoke(main, ["keys", "revoke", key_id], env={
        "PAYFLOW_DATABASE_URL": database_url, "PAYFLOW_API_KEY_CACHE_SECONDS": "0.5"})
    assert result.exit_code == 0 and "within 0.5 s" in result.output


def test_without_redis_every_request_checks_its_key_in_the_database(database_url):
    app = make_app(make_config(database_url, ""))
    client = app.test_client()
    key_id, secret = new_api_key(database_url, ["read"])
    assert client.get("/v1/accounts/x", headers=bearer(secret)).status_code == 404
    result = CliRunner().invoke(main, ["keys", "revoke", key_id], env={"PAYFLOW_DATABASE_URL": database_url})
    assert result.exit_code == 0
    assert_error(client.get("/v1/accounts/x", headers=bearer(secret)), 401, "unauthorized")
    app.extensions["payflow"].close()


def test_scopes(client, db, database_url):
    _, reader = new_api_key(database_url, ["read"])
    _, writer = new_api_key(database_url, ["transfers:write"])
    account = {"name": "a", "currency": "USD"}
    assert_error(client.post("/v1/accounts", json=account, headers={**JSON, **bearer(reader)}),
                 403, "forbidden")
    created = client.post("/v1/accounts", json=account, headers={**JSON, **bearer(writer)})
    assert created.status_code == 201
    assert client.get(f"/v1/accounts/{created.get_json()['id']}", headers=bearer(writer)).status_code == 200
    for path in ("/v1/outbox/stats", "/v1/webhook-endpoints"):
        assert_error(client.get(path, headers=bearer(writer)), 403, "forbidden")
        assert client.get(path).status_code == 200  # the admin key


def test_a_key_sees_and_moves_only_its_own_accounts(client, db, database_url):
    _, alice_key = new_api_key(database_url, ["transfers:write"], name="alice")
    _, bob_key = new_api_key(database_url, ["transfers:write"], name="bob")
    alice_api = Api(client)

    def open_account(secret):
        response = client.post("/v1/accounts", json={"name": "n", "currency": "USD"},
                               headers={**JSON, **bearer(secret)})
        return response.get_json()["id"]

    alices, bobs = open_account(alice_key), open_account(bob_key)
    world = create_system_account(db)
    alice_api.ok_transfer(world, alices, 1_000)  # the admin key funds both
    alice_api.ok_transfer(world, bobs, 1_000)

    def transfer(secret, source, destination):
        headers = {**JSON, **bearer(secret), "X-Idempotency-Key": new_key()}
        return client.post("/v1/transfers", headers=headers,
                           json={"from_account_id": source, "to_account_id": destination, "amount": 5})

    # Bob's account is "not found" to Alice: 404, not 403, so ids cannot be probed.
    assert_error(client.get(f"/v1/accounts/{bobs}", headers=bearer(alice_key)), 404, "account_not_found")
    assert_error(client.get(f"/v1/accounts/{bobs}/entries", headers=bearer(alice_key)), 404,
                 "account_not_found")
    assert_error(transfer(alice_key, bobs, alices), 404, "account_not_found")
    paid = transfer(alice_key, alices, bobs)  # paying someone else is fine
    assert paid.status_code == 201
    # Both sides see the transfer; a third key does not.
    transfer_id = paid.get_json()["id"]
    assert client.get(f"/v1/transfers/{transfer_id}", headers=bearer(bob_key)).status_code == 200
    _, carol_key = new_api_key(database_url, ["read"], name="carol")
    assert_error(client.get(f"/v1/transfers/{transfer_id}", headers=bearer(carol_key)), 404,
                 "transfer_not_found")
    payout = client.post("/v1/payouts", headers={**JSON, **bearer(alice_key), "X-Idempotency-Key": new_key()},
                         json={"account_id": bobs, "amount": 1, "destination": {"iban": "x"}})
    assert_error(payout, 404, "account_not_found")
    assert alice_api.balance(bobs) == 1_005 and alice_api.balance(alices) == 995


def test_idempotency_keys_are_scoped_per_api_key(client, db, database_url):
    _, first = new_api_key(database_url, ["transfers:write"], name="first")
    _, second = new_api_key(database_url, ["transfers:write"], name="second")
    key = new_key()
    body = {"name": "same", "currency": "USD"}
    one = client.post("/v1/accounts", json=body, headers={**JSON, **bearer(first), "X-Idempotency-Key": key})
    two = client.post("/v1/accounts", json=body, headers={**JSON, **bearer(second), "X-Idempotency-Key": key})
    assert one.status_code == two.status_code == 201
    assert "Idempotent-Replayed" not in two.headers
    assert one.get_json()["id"] != two.get_json()["id"]


def test_the_rate_limit_is_per_key_and_answers_429(database_url, servers):
    app = make_app(make_config(database_url, servers["redis"], rate_limit_requests_per_minute=3))
    try:
        client = app.test_client()
        statuses = [client.get("/v1/outbox/stats").status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        limited = client.get("/v1/outbox/stats")
        assert_error(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        _, other = new_api_key(database_url, ["admin"])
        assert client.get("/v1/outbox/stats", headers=bearer(other)).status_code == 200
    finally:
        app.extensions["payflow"].close()


def test_the_rate_limit_fails_open_without_redis(database_url):
    app = make_app(make_config(database_url, "redis://127.0.0.1:1/0", rate_limit_requests_per_minute=1,
                               redis_timeout_ms=50))
    try:
        client = app.test_client()
        assert [client.get("/v1/outbox/stats").status_code for _ in range(3)] == [200, 200, 200]
    finally:
        app.extensions["payflow"].close()


def test_keys_cli_creates_lists_and_shows_the_secret_once(database_url):
    runner = CliRunner()
    environ = {"PAYFLOW_DATABASE_URL": database_url}
    created = runner.invoke(main, ["keys", "create", "--name", "ci", "--scope", "read",
                                   "--scope", "transfers:write"], env=environ)
    assert created.exit_code == 0, created.output
    secret = next(line.split()[-1] for line in created.output.splitlines() if line.startswith("secret:"))
    assert secret.startswith("pf_live_") and len(secret) > 40
    listed = runner.invoke(main, ["keys", "list"], env=environ)
    assert '"name": "ci"' in listed.output and secret not in listed.output
    assert secret[:12] in listed.output  # the prefix, to tell keys apart


def test_a_cached_key_is_checked_in_the_database_when_redis_does_not_answer(app, client, db):
    """Redis carries revocations: a request whose Redis round trip failed
    cannot trust the cache, so a key revoked behind Redis's back is refused."""
    key_id, secret = new_api_key(app.extensions["payflow"].config.database_url, ["read"])
    assert client.get("/v1/accounts/x", headers=bearer(secret)).status_code == 404  # cached now
    db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id,))
    guard = app.extensions["payflow"].guard
    dead = redis.Redis(port=embedded.free_port(), socket_timeout=0.2, socket_connect_timeout=0.2)
    guard._scripts = ScriptRunner(dead)  # Redis stops answering
    assert_error(client.get("/v1/accounts/x", headers=bearer(secret)), 401, "unauthorized")


def test_revoking_again_tells_the_api_processes(app, client, db):
    """A key revoked behind Redis's back (plain SQL) can be revoked again to
    reach the API processes' caches at once."""
    config = app.extensions["payflow"].config
    key_id, secret = new_api_key(config.database_url, ["read"])
    assert client.get("/v1/accounts/x", headers=bearer(secret)).status_code == 404
    db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id,))
    assert client.get("/v1/accounts/x", headers=bearer(secret)).status_code == 404  # still cached
    result = CliRunner().invoke(main, ["keys", "revoke", key_id], env={
        "PAYFLOW_DATABASE_URL": config.database_url, "PAYFLOW_REDIS_URL": config.redis_url,
        "PAYFLOW_REDIS_KEY_PREFIX": config.redis_key_prefix})
    assert result.exit_code == 0 and result.output.strip() == "already revoked"
    assert_error(client.get("/v1/accounts/x", headers=bearer(secret)), 401, "unauthorized")
