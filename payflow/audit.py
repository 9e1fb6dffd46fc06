"""The ledger audit: the cheap incremental one behind /health, and the full
one behind `payflow audit` that names every offending account."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC

import psycopg
import psycopg_pool

from payflow.config import Config
from payflow.queries import queries


@dataclass(frozen=True)
class HealthReport:
    healthy: bool
    body: dict


def health(config: Config, pool: psycopg_pool.ConnectionPool) -> HealthReport:
    """The cached incremental audit (at most `audit_max_age_ms` old)."""
    try:
        with pool.connection() as conn:
            row = conn.execute(queries["audit_status"], {
                "batch_size": config.audit_batch_entries_max,
                "accounts_per_step": config.audit_accounts_per_step,
                "max_age_ms": config.audit_max_age_ms,
            }).fetchone()
    except psycopg_pool.PoolTimeout:
        return _unhealthy("database busy: no pooled connection was free")
    except psycopg.OperationalError as error:
        return _unhealthy(f"database unreachable: {type(error).__name__}")
    except psycopg.Error as error:
        return _unhealthy(f"audit did not complete: {type(error).__name__}")
    problems = list(row["problems"])
    horizon_age = row["horizon_age_seconds"]
    if horizon_age is not None and horizon_age > config.audit_stall_seconds_max:
        problems.append({"code": "audit_stalled", "horizon_age_seconds": round(horizon_age, 3),
                         "unaudited_entries": row["unaudited_entries"]})
    healthy = row["entries_sum"] == 0 and not problems
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "ledger_integrity_sum": int(row["entries_sum"]),
        "audited_at": _rfc3339(row["audited_at"]),
        "audited_through_entry_id": row["checkpoint_entry_id"],
        "unaudited_entries": row["unaudited_entries"],
        "problems": problems,
    }
    if not healthy:
        body["reason"] = ", ".join(sorted({problem["code"] for problem in problems})) \
            or "entries do not sum to zero"
    return HealthReport(healthy, body)


def _unhealthy(reason: str) -> HealthReport:
    return HealthReport(False, {
        "status": "unhealthy", "reason": reason, "ledger_integrity_sum": None,
        "audited_at": None, "audited_through_entry_id": None, "unaudited_entries": None,
        "problems": [],
    })


def _rfc3339(moment) -> str | None:
    # The same form as every other timestamp of the API (payflow_timestamp_json).
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if moment else None


@dataclass
class FullAudit:
    currency_sums: list[dict] = field(default_factory=list)
    balance_mismatches: list[dict] = field(default_factory=list)
    broken_chains: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (all(row["entries_sum"] == 0 for row in self.currency_sums)
                and not self.balance_mismatches and not self.broken_chains)


def rebuild(database_url: str) -> None:
    """Start the incremental audit over from the first entry."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(queries["audit_rebuild"])


def full_audit(database_url: str) -> FullAudit:
    """Scans every entry in one consistent snapshot (REPEATABLE READ, read only)."""
    from psycopg.rows import dict_row

    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return FullAudit(
            currency_sums=conn.execute(queries["audit_currency_sums"]).fetchall(),
            balance_mismatches=conn.execute(queries["audit_account_balances"]).fetchall(),
            broken_chains=conn.execute(queries["audit_entry_chains"]).fetchall(),
        )
