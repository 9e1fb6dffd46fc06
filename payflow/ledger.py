"""The ledger's operations, each one round trip to a SQL function or query.

Responses are rendered by SQL (payflow_*_json) so that a replay returns the
very bytes of the first response, stored in the same transaction as the work.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg_pool
from psycopg.types.json import Jsonb

from payflow import errors, metrics
from payflow.batching import TransferBatcher, batch_items
from payflow.config import Config
from payflow.db import run_with_retries, wrap_errors
from payflow.idempotency import Completed, InFlightLock, RedisGuard
from payflow.queries import queries

CURSOR_PREFIX = "entries:"
TRANSFER_CURSOR_PREFIX = "transfers:"
FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
FAR_PAST = datetime(1, 1, 2, tzinfo=UTC)
LAST_UUID = uuid.UUID(int=2**128 - 1)


@dataclass(frozen=True)
class Outcome:
    status: int
    body: str  # JSON text, sent as is
    replayed: bool = False


@dataclass(frozen=True)
class IdempotentRequest:
    key: str | None
    fingerprint: str | None
    scope: str | None = None  # the caller's API key id; None: the configured default
    owner: str | None = None  # the caller's key id when not admin: it may move only its money
    lock: InFlightLock | None = None  # taken before the request ran (auth); else taken here


class Ledger:
    def __init__(self, config: Config, pool: psycopg_pool.ConnectionPool, guard: RedisGuard) -> None:
        self._config = config
        self._pool = pool
        self._guard = guard
        self._batcher = TransferBatcher(
            lambda params: self._call_alone("post_transfer", params), self._post_many,
            config.transfer_batch_size_max, config.transfer_batches_in_flight_max,
        ) if config.transfer_batch_size_max > 1 else None

    # -- writes ---------------------------------------------------------------

    def create_account(self, request: IdempotentRequest, name: str, currency: str,
                       overdraft_limit: int | None, is_system: bool = False,
                       owner: str | None = None) -> Outcome:
        """owner: the key the account belongs to (the creating key)."""
        params = {"name": name, "currency": currency, "overdraft_limit": overdraft_limit,
                  "is_system": is_system, "owner": owner}
        return self._idempotent("create_account", request, params)

    def post_transfer(self, request: IdempotentRequest, transfer: dict, kind: str = "transfer") -> Outcome:
        params = {
            "kind": kind,
            "from_account_id": transfer["from_account_id"],
            "to_account_id": transfer["to_account_id"],
            "amount": transfer["amount"],
            "currency": transfer.get("currency"),
            "description": transfer.get("description"),
            "metadata": Jsonb(transfer.get("metadata") or {}),
            "owner": request.owner,
        }
        return self._idempotent("post_transfer", request, params)

    def refund_transfer(self, request: IdempotentRequest, raw_transfer_id: str, refund: dict) -> Outcome:
        transfer_id = parse_uuid(raw_transfer_id)
        if transfer_id is None:
            raise errors.TransferNotFound()
        params = {"transfer_id": transfer_id, "amount": refund.get("amount"),
                  "description": refund.get("description"), "metadata": Jsonb(refund.get("metadata") or {}),
                  "owner": request.owner}
        return self._idempotent("refund_transfer", request, params)

    def create_payout(self, request: IdempotentRequest, payout: dict) -> Outcome:
        params = {"account_id": payout["account_id"], "amount": payout["amount"],
                  "currency": payout.get("currency"), "destination": Jsonb(payout["destination"]),
                  "owner": request.owner}
        return self._idempotent("create_payout", request, params)

    def _idempotent(self, query_name: str, request: IdempotentRequest, params: dict) -> Outcome:
        scope = request.scope or self._config.idempotency_scope
        params = {**params, "scope": scope, "key": request.key, "fingerprint": request.fingerprint,
                  "ttl_seconds": self._config.idempotency_key_ttl_seconds}
        if request.key is None:
            return self._outcome(self._call(query_name, params))
        lock = request.lock or self._guard.acquire(scope, request.key)
        if lock.completed:  # answered before, with another body (a replay never gets here)
            if lock.completed.fingerprint == request.fingerprint:
                return Outcome(lock.completed.status, lock.completed.body, replayed=True)
            metrics.IDEMPOTENCY_CONFLICTS.labels("idempotency_key_reused").inc()
            raise errors.IdempotencyKeyReused()
        if not lock.acquired:
            return self._while_in_flight(scope, request, lock.retry_after_seconds)
        try:
            outcome = self._outcome(self._call(query_name, params))
        except BaseException:
            self._guard.release(lock)  # nothing stored: the key stays free
            raise
        # The answer is committed: keep it in Redis for quick replays.
        self._guard.complete(lock, Completed(request.fingerprint, outcome.status, outcome.body))
        return outcome

    def _post_many(self, params_list: list[dict]) -> list[dict]:
        def transaction() -> list[dict]:
            with self._pool.connection() as conn:
                return conn.execute(queries["post_transfers"], {"items": batch_items(params_list)}).fetchall()

        return run_with_retries(self._config, transaction)

    def _call(self, query_name: str, params: dict) -> dict:
        # Only keyed transfers share a transaction: a batch whose commit's fate
        # is unknown answers 503, and only a key makes the client's retry safe.
        if query_name == "post_transfer" and self._batcher and params["key"] is not None:
            return self._batcher.post(params)
        return self._call_alone(query_name, params)

    def _call_alone(self, query_name: str, params: dict) -> dict:
        def transaction() -> dict:
            with self._pool.connection() as conn:
                return conn.execute(queries[query_name], params).fetchone()

        return run_with_retries(self._config, transaction)

    def _while_in_flight(self, scope: str, request: IdempotentRequest, retry_after: int) -> Outcome:
        """Redis says a request with this key is running. A completed one in the
        database still answers (its lock may be orphaned by a dead process)."""
        row = self._read("stored_response", {"scope": scope, "key": request.key})
        if row is None:
            metrics.IDEMPOTENCY_CONFLICTS.labels("idempotency_key_in_use").inc()
            error = errors.IdempotencyKeyInUse()
            error.retry_after_seconds = retry_after
            raise error
        outcome = "replay" if row["fingerprint"] == request.fingerprint else "reused"
        return self._outcome({"outcome": outcome, **row})

    @staticmethod
    def _outcome(row: dict) -> Outcome:
        match row["outcome"]:
            case "in_use":
                metrics.IDEMPOTENCY_CONFLICTS.labels("idempotency_key_in_use").inc()
                raise errors.IdempotencyKeyInUse()
            case "reused":
                metrics.IDEMPOTENCY_CONFLICTS.labels("idempotency_key_reused").inc()
                raise errors.IdempotencyKeyReused()
            case "replay":
                return Outcome(row["status"], row["body"], replayed=True)
            case "created" | "refused":
                return Outcome(row["status"], row["body"])
        raise AssertionError(f"unknown outcome {row['outcome']!r}")

    # -- reads ----------------------------------------------------------------

    def _read(self, query_name: str, params: dict) -> dict | None:
        with wrap_errors(), self._pool.connection() as conn:
            return conn.execute(queries[query_name], params).fetchone()

    def _read_all(self, query_name: str, params: dict) -> list[dict]:
        with wrap_errors(), self._pool.connection() as conn:
            return conn.execute(queries[query_name], params).fetchall()

    def account(self, account_id: str, owner: str | None) -> str:
        return self._body("account_json", account_id, owner, errors.AccountNotFound)

    def transfer(self, transfer_id: str, owner: str | None) -> str:
        return self._body("transfer_json", transfer_id, owner, errors.TransferNotFound)

    def payout(self, payout_id: str, owner: str | None) -> str:
        return self._body("payout_json", payout_id, owner, errors.PayoutNotFound)

    def _body(self, query_name: str, raw_id: str, owner: str | None,
              not_found: Callable[[], errors.ApiError]) -> str:
        """The resource's JSON; another owner's resource is not found (404, not 403)."""
        resource_id = parse_uuid(raw_id)
        row = self._read(query_name, {"id": resource_id, "owner": owner}) if resource_id else None
        if row is None:
            raise not_found()
        return row["body"]

    def account_audit(self, raw_account_id: str, owner: str | None) -> dict:
        account_id = parse_uuid(raw_account_id)
        row = self._read("account_audit", {"id": account_id, "owner": owner}) if account_id else None
        if row is None:
            raise errors.AccountNotFound()
        difference = row["balance"] - int(row["entries_sum"])
        return {"account_id": str(row["account_id"]), "currency": row["currency"],
                "balance": row["balance"], "entries_sum": int(row["entries_sum"]),
                "difference": difference, "entries": row["entries"], "version": row["version"],
                "versions_continuous": row["entries"] == row["version"],
                "chain_breaks": row["chain_breaks"],
                "consistent": difference == 0 and not row["chain_breaks"]
                and row["entries"] == row["version"]}

    def balance_as_of(self, raw_account_id: str, as_of, owner: str | None) -> dict:
        account_id = parse_uuid(raw_account_id)
        row = self._read("balance_as_of", {"id": account_id, "as_of": as_of, "owner": owner}) \
            if account_id else None
        if row is None:
            raise errors.AccountNotFound()
        return {"account_id": str(row["account_id"]), "currency": row["currency"],
                "balance": row["balance"], "as_of": as_of.isoformat()}

    def search_transfers(self, query: dict, owner: str | None) -> dict:
        """Keyset pages of transfers, newest first. A key without admin scope
        searches one of its own accounts."""
        account_id = query["account_id"]
        if owner is not None:
            if account_id is None:
                raise errors.ValidationFailed(details={"account_id": ["Required for this key."]})
            if not self._read("account_exists", {"id": account_id, "owner": owner})["found"]:
                raise errors.AccountNotFound()
        before_at, before_id = decode_transfer_cursor(query["cursor"]) if query["cursor"] \
            else (FAR_FUTURE, LAST_UUID)
        params = {"account_id": account_id, "before_at": before_at, "before_id": before_id,
                  "created_after": query["created_after"] or FAR_PAST,
                  "created_before": query["created_before"] or FAR_FUTURE,
                  "kind": query["kind"], "status": query["status"], "limit": query["limit"]}
        rows = self._read_all("transfers_by_account" if account_id else "transfers_all", params)
        page, more = rows[:query["limit"]], len(rows) > query["limit"]
        return {"data": [row["transfer"] for row in page],
                "next_cursor": encode_transfer_cursor(page[-1]["created_at"], page[-1]["id"])
                if more else None}

    def entries_page(self, raw_account_id: str, limit: int, cursor: str | None,
                     owner: str | None, since: datetime | None = None,
                     until: datetime | None = None) -> dict:
        account_id = parse_uuid(raw_account_id)
        before_id = decode_cursor(cursor) if cursor else None
        visible = account_id is not None and \
            self._read("account_exists", {"id": account_id, "owner": owner})["found"]
        if not visible:
            raise errors.AccountNotFound()
        rows = self._read_all("entries_page", {"account_id": account_id, "before_id": before_id,
                                               "limit": limit, "since": since or FAR_PAST,
                                               "until": until or FAR_FUTURE})
        page, more = rows[:limit], len(rows) > limit
        return {"data": [row["entry"] for row in page],
                "next_cursor": encode_cursor(page[-1]["id"]) if more else None}


def encode_transfer_cursor(created_at, transfer_id) -> str:
    text = f"{TRANSFER_CURSOR_PREFIX}{created_at.isoformat()}|{transfer_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_transfer_cursor(cursor: str) -> tuple:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith(TRANSFER_CURSOR_PREFIX):
            raise ValueError(cursor)
        moment, transfer_id = text.removeprefix(TRANSFER_CURSOR_PREFIX).split("|")
        return datetime.fromisoformat(moment), uuid.UUID(transfer_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise errors.ValidationFailed(details={"cursor": ["Not a cursor this API returned."]}) from None


def parse_uuid(raw: str) -> uuid.UUID | None:
    """A path id that is not a UUID names no resource: 404, not 422."""
    try:
        return uuid.UUID(raw)
    except (ValueError, AttributeError, TypeError):
        return None


def encode_cursor(entry_id: int) -> str:
    return base64.urlsafe_b64encode(f"{CURSOR_PREFIX}{entry_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith(CURSOR_PREFIX):
            raise ValueError(cursor)
        entry_id = int(text.removeprefix(CURSOR_PREFIX))
        if not 0 < entry_id < 2**63:
            raise ValueError(cursor)
        return entry_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise errors.ValidationFailed(details={"cursor": ["Not a cursor this API returned."]}) from None
