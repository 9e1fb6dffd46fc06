"""Unit tests of the small pure pieces: query loading, configuration,
fingerprints, idempotency key rules, cursors, migrations on disk."""

from __future__ import annotations

import pytest

from payflow import errors, idempotency, ledger, migrations, queries
from payflow.config import Config


def test_named_queries_parse_and_refuse_duplicates():
    text = "-- name: one\n-- Does one.\nSELECT 1;\n\n-- name: two\nSELECT %(x)s;\n"
    assert queries.parse(text) == {"one": "-- Does one.\nSELECT 1;", "two": "SELECT %(x)s;"}
    with pytest.raises(ValueError, match="duplicate"):
        queries.parse(text + "-- name: one\nSELECT 3;")


def test_every_named_query_is_loaded():
    loaded = queries.load()
    assert {"post_transfer", "create_account", "entries_page", "audit_status"} <= set(loaded)
    assert all(body.strip() for body in loaded.values())


def test_config_reads_prefixed_environment_then_overrides():
    config = Config.load({"port": 9000}, environ={"PAYFLOW_PORT": "7000", "PAYFLOW_POOL_SIZE_MAX": "3",
                                                  "PAYFLOW_REDIS_TIMEOUT_MS": "50", "OTHER": "x"})
    assert (config.port, config.pool_size_max, config.redis_timeout_ms) == (9000, 3, 50)
    with pytest.raises(ValueError, match="PAYFLOW_PORT"):
        Config.load(environ={"PAYFLOW_PORT": "eighty"})
    with pytest.raises(ValueError, match="unknown configuration"):
        Config.load({"nope": 1}, environ={})


def test_fingerprint_ignores_spacing_and_key_order_but_not_values_or_path():
    base = idempotency.fingerprint("POST", "/v1/transfers", {"a": 1, "b": [1, 2]})
    assert base == idempotency.fingerprint("post", "/v1/transfers", {"b": [1, 2], "a": 1})
    assert base != idempotency.fingerprint("POST", "/v1/transfers", {"a": 2, "b": [1, 2]})
    assert base != idempotency.fingerprint("POST", "/v1/accounts", {"a": 1, "b": [1, 2]})
    assert len(base) == 64


@pytest.mark.parametrize(("headers", "expected"), [
    ({"X-Idempotency-Key": "abc"}, "abc"),
    ({"Idempotency-Key": "abc"}, "abc"),
    ({"X-Idempotency-Key": " ~!"}, " ~!"),
])
def test_idempotency_key_headers(headers, expected):
    assert idempotency.key_from_headers(headers, required=True) == expected


def test_idempotency_key_rules():
    assert idempotency.key_from_headers({}, required=False) is None
    with pytest.raises(errors.IdempotencyKeyMissing):
        idempotency.key_from_headers({}, required=True)
    for bad in ("", "x" * 256, "é", "a\x7f"):
        with pytest.raises(errors.IdempotencyKeyInvalid):
            idempotency.key_from_headers({"X-Idempotency-Key": bad}, required=True)


def test_cursor_round_trip_and_refusals():
    assert ledger.decode_cursor(ledger.encode_cursor(42)) == 42
    for bad in ("", "!!", "ZW50cmllczo", ledger.encode_cursor(0), "YWJj"):
        with pytest.raises(errors.ValidationFailed):
            ledger.decode_cursor(bad)


def test_migrations_on_disk_are_numbered_in_order():
    found = migrations.available()
    assert [m.version for m in found] == list(range(1, len(found) + 1))


def test_every_error_has_a_default_message_and_code():
    for error_class in errors.ApiError.__subclasses__():
        error = error_class()
        assert error.message and error.code and 400 <= error.status < 600


def test_an_async_view_is_refused_at_start_up():
    """PayflowFlask skips Flask's per-request coroutine check, so create_app
    refuses what that check would have run."""
    import flask

    from payflow.app import _refuse_async

    app = flask.Flask("async-check")

    @app.get("/")
    async def view():
        return ""

    with pytest.raises(RuntimeError, match="async"):
        _refuse_async(app)
    sync_only = flask.Flask("sync-check")
    sync_only.get("/")(lambda: "")
    _refuse_async(sync_only)
