"""Reconciliation runs: settlement records matched to succeeded payouts, in
one SQL statement (payflow_reconcile_v1), every mismatch kept as an exception
an operator resolves with a note.

Classes: matched; pending (no settlement yet, within its window: not an
exception); and the exception codes of schemas.EXCEPTION_CODES.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime

import psycopg

from payflow import errors
from payflow.config import Config
from payflow.db import run_with_retries
from payflow.queries import queries
from payflow.schemas import EXCEPTION_CODES

CURSOR_PREFIX = "exceptions:"
FIRST_ID = uuid.UUID(int=0)


def run(conn: psycopg.Connection, config: Config, *, as_of: datetime | None, since: datetime | None,
        window_days: int | None, created_by: str | None) -> uuid.UUID:
    """Classifies every payout succeeded and every settlement line imported
    by as_of (default: now on the database's clock, which stamps them),
    leaving out the payouts that succeeded before since (default: none);
    returns the new run's id. Retried after a deadlock."""

    def transaction() -> dict:
        with conn.transaction():
            conn.execute(queries["reconciliation_statement_timeout"],
                         {"timeout_ms": str(config.reconciliation_statement_timeout_ms)})
            return conn.execute(queries["reconcile"], {
                "as_of": as_of, "since": since, "created_by": created_by,
                "window_days": window_days or config.reconciliation_window_days}).fetchone()

    row = run_with_retries(config, transaction)
    if row["outcome"] == "as_of_in_future":
        raise errors.ValidationFailed(details={"as_of": ["Must not be in the future."]})
    if row["outcome"] == "since_after_as_of":
        raise errors.ValidationFailed(details={"since": ["Must not be after as_of."]})
    return row["run_id"]


def summary(conn: psycopg.Connection, run_id: uuid.UUID | None) -> dict:
    """A run's counts, totals and open exceptions (ReconciliationNotFound if none)."""
    row = conn.execute(queries["reconciliation_run_json"], {"id": run_id}).fetchone() if run_id else None
    if row is None:
        raise errors.ReconciliationNotFound()
    return row["run"]


def report(conn: psycopg.Connection, run_id: uuid.UUID | None, query: dict) -> dict:
    """The summary with a page of exceptions (query: code, status, limit, cursor)."""
    found = summary(conn, run_id)
    after_code, after_id = decode_cursor(query["cursor"]) if query["cursor"] else ("", FIRST_ID)
    rows = conn.execute(queries["reconciliation_exceptions_page"], {
        "run_id": run_id, "after_code": after_code, "after_id": after_id, "code": query["code"],
        "status": query["status"], "limit": query["limit"]}).fetchall()
    page, more = rows[:query["limit"]], len(rows) > query["limit"]
    return {**found, "exceptions": {
        "data": [row["exception"] for row in page],
        "next_cursor": encode_cursor(page[-1]["code"], page[-1]["id"]) if more else None}}


def resolve(conn: psycopg.Connection, config: Config, run_id: uuid.UUID | None,
            exception_id: uuid.UUID | None, note: str, resolved_by: str) -> dict:
    """Resolves an open exception once, recording who, when and why (retried
    after a deadlock)."""
    summary(conn, run_id)  # an unknown run is named as such
    if exception_id is None:
        raise errors.ReconciliationExceptionNotFound()
    row = run_with_retries(config, lambda: conn.execute(queries["resolve_reconciliation_exception"], {
        "run_id": run_id, "exception_id": exception_id, "note": note,
        "resolved_by": resolved_by}).fetchone())
    if row["outcome"] == "not_found":
        raise errors.ReconciliationExceptionNotFound()
    if row["outcome"] == "already_resolved":
        body = row["body"]
        raise errors.ExceptionAlreadyResolved(details={
            key: body[key] for key in ("id", "resolved_at", "resolved_by", "resolution_note")})
    return row["body"]


def encode_cursor(code: str, exception_id: uuid.UUID) -> str:
    text = f"{CURSOR_PREFIX}{code}|{exception_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, uuid.UUID]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith(CURSOR_PREFIX):
            raise ValueError(cursor)
        code, exception_id = text.removeprefix(CURSOR_PREFIX).split("|")
        if code not in EXCEPTION_CODES:
            raise ValueError(cursor)
        return code, uuid.UUID(exception_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise errors.ValidationFailed(details={"cursor": ["Not a cursor this API returned."]}) from None
