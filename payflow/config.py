"""Configuration: defaults, then `PAYFLOW_`-prefixed environment, then a mapping.

Nothing here opens a connection; `create_app` and the CLI read a `Config` once.
Every limit carries its unit in its name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

ENVIRONMENT_PREFIX = "PAYFLOW_"


@dataclass(frozen=True)
class Config:
    database_url: str = ""
    redis_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8080

    # Connection pool (one per process, opened after gunicorn forks).
    pool_size_min: int = 2
    pool_size_max: int = 8
    pool_wait_timeout_seconds: float = 2.0
    pool_waiting_max: int = 64
    pool_connection_lifetime_seconds: float = 1800.0
    statement_timeout_ms: int = 5000
    lock_timeout_ms: int = 2000
    prepare_threshold: int = 0  # 0: prepare every statement at first use

    # Group commit: concurrent transfers in one process share a transaction
    # (payflow/batching.py); 1 turns it off. A few batches run at once, so one
    # waiting on a lock does not hold up the process's other transfers.
    transfer_batch_size_max: int = 32
    transfer_batches_in_flight_max: int = 2

    # Transactions that hit a deadlock or serialization failure are retried.
    transaction_retries_max: int = 3

    # Idempotency (DESIGN.md): keys live >= 24 h; the Redis in-flight lock is short.
    idempotency_scope: str = "default"
    idempotency_key_ttl_seconds: int = 24 * 3600
    idempotency_lock_ms: int = 10_000
    # A completed answer stays in Redis this long: replays inside it skip the
    # database (retries come within seconds; the database keeps keys for 24 h).
    idempotency_replay_cache_ms: int = 60_000
    redis_key_prefix: str = "payflow"
    redis_timeout_ms: int = 250
    redis_retry_after_failure_seconds: float = 1.0

    # Live API keys are cached per process this long; a revocation through
    # `payflow keys revoke` still takes effect at once (apikeys.KeyCache).
    api_key_cache_seconds: float = 10.0

    # Requests.
    request_body_bytes_max: int = 1024 * 1024
    # Per API key (1,000 requests/s on average over a minute); 0 turns it off.
    rate_limit_requests_per_minute: int = 60_000

    # When set, GET /metrics wants "Authorization: Bearer <this token>".
    metrics_token: str = ""

    # Audit behind /health.
    audit_max_age_ms: int = 1000
    audit_batch_entries_max: int = 200_000
    # Accounts checked against their latest entry per step (the check rotates).
    audit_accounts_per_step: int = 10_000
    # A horizon still unsettled after this long (a transaction held open
    # somewhere) makes /health unhealthy: the audit is no longer current.
    audit_stall_seconds_max: float = 60.0

    # Outbox workers.
    worker_batch_size_max: int = 32
    worker_lease_seconds: float = 30.0
    worker_poll_interval_seconds: float = 1.0  # fallback when no NOTIFY arrives
    worker_listen: bool = True  # False: poll only (PgBouncer in transaction mode)
    worker_prune_interval_seconds: float = 60.0
    worker_prune_batch_size: int = 10_000
    outbox_attempts_max: int = 10
    outbox_backoff_base_seconds: float = 1.0
    outbox_backoff_cap_seconds: float = 300.0
    outbox_retention_seconds: int = 7 * 24 * 3600

    # Payout providers: simulated (default), http, noop.
    payout_provider: str = "simulated"
    simulated_latency_ms: int = 0
    simulated_failure_rate: float = 0.0  # retryable failures
    simulated_permanent_failure_rate: float = 0.0
    simulated_fail_first_calls: int = 0  # retryable failures before the first success
    simulated_seed: int = 0
    payout_http_url: str = ""
    payout_http_timeout_seconds: float = 10.0
    webhook_timeout_seconds: float = 10.0

    # Reconciliation: a settlement dated within this many days of its payout's
    # success matches; a payout with none is missing once this has passed.
    reconciliation_window_days: int = 3
    # A run classifies every payout and settlement in one statement: more
    # than a request's statement timeout, still bounded.
    reconciliation_statement_timeout_ms: int = 60_000

    @classmethod
    def load(cls, overrides: Mapping | None = None, environ: Mapping | None = None) -> Config:
        environ = os.environ if environ is None else environ
        values: dict = {}
        for field in fields(cls):
            raw = environ.get(ENVIRONMENT_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _parse(field, raw)
        values.update(overrides or {})
        unknown = set(values) - {field.name for field in fields(cls)}
        if unknown:
            raise ValueError(f"unknown configuration: {', '.join(sorted(unknown))}")
        return cls(**values)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _parse(field: dataclasses.Field, raw: str):
    kind = _FIELD_TYPES[field.type]
    if kind is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    try:
        return kind(raw)
    except ValueError as error:
        raise ValueError(f"{ENVIRONMENT_PREFIX}{field.name.upper()}: {error}") from None
