"""A connection plans each statement of the posting functions once and keeps
that plan. Planned while the tables were small (a fresh deployment, or
statistics taken while a table was empty), a lookup by key may have become a
sequential scan, and stays one as the ledger grows until autovacuum analyses
the table again: measured here, a transfer went from 0.9 ms to 53 ms once the
tables grew from a few rows to 50,000. The per-request functions therefore
plan with sequential scans disabled (migration 0008): whatever the tables'
size when first planned, a transfer reads its rows by key.

Checked without timing: PostgreSQL counts the sequential scans a transaction
makes per table (pg_stat_xact_user_tables)."""

from __future__ import annotations

import hashlib
import uuid

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.helpers import create_system_account

GROWN_ROWS = 20_000
# The tables a transfer reads by key (directly, or through its foreign keys),
# and the outbox a worker claims from.
LOOKED_UP = ("accounts", "transfers", "idempotency_keys", "outbox")


def _transfer(conn: psycopg.Connection, key: str, source: str, destination: str) -> None:
    row = conn.execute(
        "SELECT * FROM payflow_post_transfer_v1('plans', %s, %s, 3600, 'transfer', %s, %s, 1,"
        " NULL, NULL, NULL)", (key, hashlib.sha256(key.encode()).hexdigest(), source, destination),
    ).fetchone()
    assert row["outcome"] == "created", row


def _batch(conn: psycopg.Connection, keys: list[str], source: str, destination: str) -> None:
    items = [{"scope": "plans", "key": key, "ttl_seconds": 3600,
              "fingerprint": hashlib.sha256(key.encode()).hexdigest(), "kind": "transfer",
              "from_account_id": source, "to_account_id": destination, "amount": 1, "currency": None,
              "description": None, "metadata": {}, "owner": None} for key in keys]
    rows = conn.execute("SELECT outcome FROM payflow_post_transfers_v1(%s)", (Jsonb(items),)).fetchall()
    assert [row["outcome"] for row in rows] == ["created"] * len(keys)


def _create_account(conn: psycopg.Connection, key: str) -> None:
    row = conn.execute(
        "SELECT outcome FROM payflow_create_account_v1('plans', %s, %s, 3600, 'plans', 'USD', 0, false)",
        (key, hashlib.sha256(key.encode()).hexdigest())).fetchone()
    assert row["outcome"] == "created"


def _claim_and_finish(conn: psycopg.Connection) -> None:
    """What a worker does with its batch, in short."""
    claimed = conn.execute("SELECT id FROM payflow_outbox_claim_v1('plans', 4, 30)").fetchall()
    assert claimed
    for row in claimed:
        assert conn.execute("SELECT payflow_outbox_finish_v1(%s, 'plans', 'done', NULL, NULL) AS ours",
                            (row["id"],)).fetchone()["ours"]


def test_transfers_and_claims_read_by_key_after_the_tables_grew_under_plans_made_small(db, database_url):
    world = create_system_account(db)
    rows = db.execute("INSERT INTO accounts (name, currency, overdraft_limit) "
                      "SELECT 'a' || n, 'USD', 0 FROM generate_series(1, 2) n RETURNING id").fetchall()
    first, second = (str(row["id"]) for row in rows)
    db.execute("ANALYZE")  # statistics of nearly empty tables, as on a fresh deployment

    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        # Enough calls for PostgreSQL to settle on its cached (generic) plans.
        for n in range(12):
            _transfer(conn, f"warm-{n}", world, first)
            _batch(conn, [f"warm-batch-{n}-a", f"warm-batch-{n}-b"], world, second)
            _create_account(conn, f"warm-account-{n}")
            _claim_and_finish(conn)

        db.execute("INSERT INTO accounts (name, currency, overdraft_limit) "
                   "SELECT 'grown ' || n, 'USD', 0 FROM generate_series(1, %s) n", (GROWN_ROWS,))
        db.execute("INSERT INTO transfers (kind, from_account_id, to_account_id, amount, currency) "
                   "SELECT 'transfer', %s, %s, 1, 'USD' FROM generate_series(1, %s)",
                   (world, first, GROWN_ROWS))
        db.execute("INSERT INTO idempotency_keys (scope, key, fingerprint, response_status,"
                   " response_body, expires_at) SELECT 'plans', 'grown-' || n, repeat('0', 64), 201,"
                   " '{}', now() + interval '1 day' FROM generate_series(1, %s) n", (GROWN_ROWS,))
        db.execute("INSERT INTO outbox (topic, payload, status, finished_at) "
                   "SELECT 'transfer.posted', '{}', 'done', now() FROM generate_series(1, %s)", (GROWN_ROWS,))

        with conn.transaction(force_rollback=True):
            before = _sequential_scans(conn)
            key = uuid.uuid4().hex
            _transfer(conn, key, first, second)
            _batch(conn, [key + "-a", key + "-b"], world, first)
            _create_account(conn, key + "-account")
            _claim_and_finish(conn)
            after = _sequential_scans(conn)
    assert after == before


def _sequential_scans(conn: psycopg.Connection) -> dict[str, int]:
    """Counted by this backend and not yet reported (which may include earlier
    transactions' counts: hence a difference)."""
    rows = conn.execute("SELECT relname, seq_scan FROM pg_stat_xact_user_tables WHERE relname = ANY (%s)",
                        (list(LOOKED_UP),)).fetchall()
    return {row["relname"]: row["seq_scan"] for row in rows}
