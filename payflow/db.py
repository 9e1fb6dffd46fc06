"""The connection pool, and the one place psycopg errors become payflow errors."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from payflow import errors
from payflow.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")

POOL_OPEN_TIMEOUT_SECONDS = 30
CONNECT_TIMEOUT_SECONDS = 5


def connection_options(config: Config) -> str:
    # UTC so timestamps never depend on the server's zone; timeouts so that no
    # request holds a lock or a connection forever.
    settings = {
        "TimeZone": "UTC",
        "statement_timeout": config.statement_timeout_ms,
        "lock_timeout": config.lock_timeout_ms,
        "idle_in_transaction_session_timeout": 10 * config.statement_timeout_ms,
    }
    return " ".join(f"-c {name}={value}" for name, value in settings.items())


def create_pool(config: Config) -> psycopg_pool.ConnectionPool:
    """One pool per process, created after gunicorn forks; fails fast if the
    database does not answer."""
    pool = psycopg_pool.ConnectionPool(
        config.database_url,
        min_size=config.pool_size_min,
        max_size=config.pool_size_max,
        timeout=config.pool_wait_timeout_seconds,
        max_waiting=config.pool_waiting_max,
        max_lifetime=config.pool_connection_lifetime_seconds,
        kwargs={
            # Every posting is one statement (a SQL function) in its own
            # implicit transaction; explicit transactions use conn.transaction().
            "autocommit": True,
            "prepare_threshold": config.prepare_threshold,
            "options": connection_options(config),
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "row_factory": dict_row,
        },
        open=False,
        name="payflow",
    )
    pool.open(wait=True, timeout=POOL_OPEN_TIMEOUT_SECONDS)
    return pool


class RetryableConflict(errors.PayflowError):
    """PostgreSQL aborted the transaction (deadlock or serialization failure); it is safe to retry."""


@contextlib.contextmanager
def wrap_errors() -> Iterator[None]:
    """Translate psycopg and pool errors into payflow's own, keeping the constraint name."""
    try:
        yield
    except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as error:
        raise RetryableConflict(str(error)) from error
    except (psycopg_pool.PoolTimeout, psycopg_pool.TooManyRequests) as error:
        raise errors.Unavailable("No database connection is free; retry later.") from error
    except pg_errors.UniqueViolation as error:
        if error.diag.constraint_name == "idempotency_keys_pkey":
            raise errors.IdempotencyKeyInUse() from error
        raise _constraint_error(error) from error
    except psycopg.IntegrityError as error:
        raise _constraint_error(error) from error
    except pg_errors.LockNotAvailable as error:
        raise errors.LockUnavailable("A row this request needs is locked; retry later.") from error
    except pg_errors.QueryCanceled as error:
        raise errors.Unavailable("The database took too long; retry later.") from error
    except psycopg.DataError as error:
        # Validation should have stopped this input; answer 4xx, but say so in the log.
        log.warning("data error reached the database: %s", error)
        raise errors.ValidationFailed(details={"_schema": [error.diag.message_primary]}) from error
    except (psycopg.OperationalError, psycopg.InterfaceError) as error:
        log.warning("database unavailable: %s", error)
        raise errors.Unavailable() from error
    except psycopg.Error as error:
        # E.g. a pooled connection now on a read-only replica after a failover:
        # the client can retry (with its idempotency key), so 503, not 500.
        log.error("unexpected database error: %r", error)
        raise errors.Unavailable() from error


def _constraint_error(error: psycopg.Error) -> errors.ConstraintViolated:
    return errors.ConstraintViolated(
        details={"constraint": error.diag.constraint_name, "reason": error.diag.message_primary}
    )


def run_with_retries(config: Config, operation: Callable[[], T]) -> T:
    """Run `operation` (one transaction), retrying a bounded number of times
    when PostgreSQL aborts it for a deadlock or serialization failure."""
    for attempt in range(config.transaction_retries_max + 1):
        try:
            with wrap_errors():
                return operation()
        except RetryableConflict:
            log.warning("transaction aborted by a conflict, attempt %d", attempt + 1)
    raise errors.Unavailable("The database kept aborting this transaction; retry later.")
