"""A connection plans a function's statements and may keep one generic plan
for each. Kept from a time when the tables were small (a fresh deployment, or
statistics taken while a table was empty), a lookup by key may be a
sequential scan, and stays one as the ledger grows until autovacuum gets to
the table: measured here, a transfer went from 0.9 ms to 53 ms once the
tables grew from a few rows to 50,000. The per-request and per-task functions
plan with sequential scans disabled, and a batch locks its accounts by key
(migration 0008).

Checked without timing: PostgreSQL counts, per table, the scans a transaction
makes and the rows they read (pg_stat_xact_user_tables)."""

from __future__ import annotations

import hashlib
import json
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.helpers import create_system_account

GROWN_ROWS = 20_000
# What one round below may read from a table, at most, however large it is
# (its claims alone read up to 100 tasks twice); a scan reads GROWN_ROWS.
ROWS_READ_PER_ROUND_MAX = 1_000
TABLES = ("accounts", "transfers", "idempotency_keys", "outbox", "payouts")


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _item(key: str, source: str, destination: str) -> dict:
    return {"scope": "plans", "key": key, "ttl_seconds": 3600, "fingerprint": _fingerprint(key),
            "kind": "transfer", "from_account_id": source, "to_account_id": destination, "amount": 1,
            "currency": None, "description": None, "metadata": {}, "owner": None}


def _call(conn: psycopg.Connection, function: str, key: str, *args) -> dict:
    """A keyed posting function's outcome row; its body parsed."""
    placeholders = ", ".join(["%s"] * len(args))
    statement = f"SELECT * FROM {function}('plans', %s, %s, 3600, {placeholders})"  # noqa: S608 - our names
    row = conn.execute(statement, (key, _fingerprint(key), *args)).fetchone()
    assert row["outcome"] == "created", row
    return json.loads(row["body"])


def _round(conn: psycopg.Connection, world: str, first: str, second: str) -> None:
    """What the API and a worker ask of PostgreSQL: a transfer, a batch, an
    account, a refund, two payouts (one paid, one failed), and the outbox
    tasks they queued claimed, renewed, fanned out, finished or released."""
    key = uuid.uuid4().hex
    transfer = _call(conn, "payflow_post_transfer_v1", key, "transfer", world, first, 100, None, None, None)
    batch = Jsonb([_item(key + "-a", world, second), _item(key + "-b", world, second)])
    rows = conn.execute("SELECT outcome FROM payflow_post_transfers_v1(%s)", (batch,)).fetchall()
    assert [row["outcome"] for row in rows] == ["created", "created"]
    _call(conn, "payflow_create_account_v1", key + "-account", "plans", "USD", 0, False)
    _call(conn, "payflow_refund_transfer_v1", key + "-refund", transfer["id"], 1, None, Jsonb({}), None)
    payouts = [_call(conn, "payflow_create_payout_v1", f"{key}-payout-{n}", first, 1, "USD", Jsonb({}),
                     None)["id"] for n in range(2)]

    claimed = conn.execute("SELECT id, topic, payload FROM payflow_outbox_claim_v1('plans', 100, 30)"
                           ).fetchall()
    events, others = [], []
    for task in claimed:
        assert conn.execute("SELECT payflow_outbox_renew_v1(%s, 'plans', 30) AS ours",
                            (task["id"],)).fetchone()["ours"]
        if task["topic"] == "payout.requested":
            payout = task["payload"]["payout_id"]
            conn.execute("SELECT * FROM payflow_payout_start_v1(%s)", (payout,)).fetchone()
            outcome = ("payflow_payout_succeed_v1(%s, 'reference', %s, 'plans')" if payout == payouts[0]
                       else "payflow_payout_fail_v1(%s, 'refused', %s, 'plans')")
            conn.execute(f"SELECT {outcome}", (payout, task["id"]))
        elif task["topic"] == "transfer.posted":
            events.append(task["id"])
        else:
            others.append(task["id"])
    assert len(events) >= 2
    conn.execute("SELECT payflow_webhook_fan_out_v1(%s, 'plans')", (events[0],))
    conn.execute("SELECT * FROM payflow_webhook_fan_out_many_v1(%s, 'plans')", (events[1:],)).fetchall()
    if others:
        conn.execute("SELECT payflow_outbox_release_v1(%s, 'plans', false)", (others[:1],))
        for task in others[1:]:
            conn.execute("SELECT payflow_outbox_finish_v1(%s, 'plans', 'done', NULL, NULL)", (task,))
    conn.execute("SELECT payflow_system_account_v1('payout_clearing', 'USD')")


def _reads(conn: psycopg.Connection) -> dict[str, tuple[int, int]]:
    """(sequential scans, rows read) per table, counted by this backend and
    not yet reported: possibly earlier transactions' counts too, hence
    differences."""
    rows = conn.execute("SELECT relname, seq_scan, seq_tup_read + idx_tup_fetch AS read"
                        " FROM pg_stat_xact_user_tables WHERE relname = ANY (%s)", (list(TABLES),)).fetchall()
    return {row["relname"]: (row["seq_scan"], row["read"]) for row in rows}


def _reads_of_one_round(conn: psycopg.Connection, *accounts: str) -> dict[str, tuple[int, int]]:
    with conn.transaction(force_rollback=True):
        before = _reads(conn)
        _round(conn, *accounts)
        after = _reads(conn)
    return {table: (after[table][0] - before[table][0], after[table][1] - before[table][1])
            for table in TABLES}


@pytest.fixture
def small_ledger(db):
    """A world account, two accounts, a webhook endpoint; statistics taken
    while the tables are nearly empty, and autovacuum kept from refreshing
    them during the test."""
    for table in TABLES:
        db.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
    world = create_system_account(db)
    rows = db.execute("INSERT INTO accounts (name, currency, overdraft_limit) "
                      "SELECT 'a' || n, 'USD', 0 FROM generate_series(1, 2) n RETURNING id").fetchall()
    db.execute("INSERT INTO webhook_endpoints (url, event_types, secret) "
               "VALUES ('https://example.com/hook', '{transfer.posted}', repeat('s', 40))")
    db.execute("ANALYZE")
    return world, *(str(row["id"]) for row in rows)


def _grow(db: psycopg.Connection, world: str, account: str) -> None:
    db.execute("INSERT INTO accounts (name, currency, overdraft_limit) "
               "SELECT 'grown ' || n, 'USD', 0 FROM generate_series(1, %s) n", (GROWN_ROWS,))
    db.execute("INSERT INTO transfers (kind, from_account_id, to_account_id, amount, currency) "
               "SELECT 'transfer', %s, %s, 1, 'USD' FROM generate_series(1, %s)",
               (world, account, GROWN_ROWS))
    db.execute("INSERT INTO idempotency_keys (scope, key, fingerprint, response_status, response_body,"
               " expires_at) SELECT 'plans', 'grown-' || n, repeat('0', 64), 201, '{}',"
               " now() + interval '1 day' FROM generate_series(1, %s) n", (GROWN_ROWS,))
    db.execute("INSERT INTO outbox (topic, payload, status, finished_at) "
               "SELECT 'transfer.posted', '{}', 'done', now() FROM generate_series(1, %s)", (GROWN_ROWS,))
    db.execute("INSERT INTO payouts (account_id, amount, currency, destination, transfer_id, status,"
               " provider_reference) SELECT from_account_id, 1, 'USD', '{}', id, 'succeeded', 'reference'"
               " FROM transfers WHERE kind = 'transfer' LIMIT %s", (GROWN_ROWS,))


def test_requests_and_tasks_read_by_key_after_the_tables_grew_under_plans_made_small(
        db, database_url, small_ledger):
    world, first, _ = small_ledger
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn, \
            psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as control:
        # A control: a lookup by key planned now and kept, as any may be.
        control.execute("SET plan_cache_mode = force_generic_plan")
        control.execute("PREPARE control (text) AS SELECT 1 FROM idempotency_keys WHERE key = $1")
        control.execute("EXECUTE control ('none')")
        for _ in range(8):  # enough rounds for PostgreSQL to settle on generic plans
            _round(conn, *small_ledger)
        _grow(db, world, first)

        reads = _reads_of_one_round(conn, *small_ledger)
        with control.transaction(force_rollback=True):
            before = _reads(control)["idempotency_keys"]
            control.execute("EXECUTE control ('grown-1')")
            after = _reads(control)["idempotency_keys"]
    assert after[0] == before[0] + 1, "the control did not scan: the test no longer reproduces kept plans"
    assert {table: scans for table, (scans, _) in reads.items() if scans} == {}
    assert {table: read for table, (_, read) in reads.items() if read > ROWS_READ_PER_ROUND_MAX} == {}


def test_requests_and_tasks_read_by_key_on_grown_tables_with_fresh_statistics(db, database_url, small_ledger):
    world, first, _ = small_ledger
    _grow(db, world, first)
    db.execute("ANALYZE")
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        for _ in range(6):  # past the first plans, which are made afresh
            reads = _reads_of_one_round(conn, *small_ledger)
            assert {table: read for table, (_, read) in reads.items() if read > ROWS_READ_PER_ROUND_MAX} == {}
