"""Demo data for `make seed` / `make run`: a system account per currency and a
few customer accounts, funded by transfers out of the system account so that
the ledger still sums to zero (no money from nothing)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from payflow.config import Config
from payflow.db import create_pool
from payflow.idempotency import RedisGuard, fingerprint
from payflow.ledger import IdempotentRequest, Ledger
from payflow.queries import queries

SYSTEM_ACCOUNT_NAME = "World {currency}"
DEMO_ACCOUNTS = (("Alice", "USD", 100_000_00), ("Bob", "USD", 50_000_00), ("Carol", "EUR", 20_000_00))


def _request(key: str) -> IdempotentRequest:
    return IdempotentRequest(key, fingerprint("POST", "seed", key))


@dataclass(frozen=True)
class SeededAccount:
    id: str
    name: str
    currency: str
    balance: int


def seed(config: Config) -> list[SeededAccount]:
    """Creates what is missing; running it again changes nothing."""
    config = config.replace(pool_size_min=1, pool_size_max=2, redis_url="")
    pool = create_pool(config)
    try:
        ledger = Ledger(config, pool, RedisGuard(config))

        def find(name: str, currency: str) -> dict | None:
            with pool.connection() as conn:
                return conn.execute(queries["account_by_name"],
                                    {"name": name, "currency": currency}).fetchone()

        def ensure(name: str, currency: str, is_system: bool) -> dict:
            # Deterministic idempotency keys: two seeds at once create one account.
            key = f"seed:account:{name}:{currency}"
            found = find(name, currency)
            if found:
                return found
            outcome = ledger.create_account(_request(key), name, currency,
                                            None if is_system else 0, is_system=is_system)
            return json.loads(outcome.body)

        seeded = []
        for name, currency, opening_balance in DEMO_ACCOUNTS:
            world = ensure(SYSTEM_ACCOUNT_NAME.format(currency=currency), currency, True)
            account = ensure(name, currency, False)
            if account["version"] == 0:  # never funded (even if a seed died in between)
                ledger.post_transfer(_request(f"seed:fund:{account['id']}"), {
                    "from_account_id": world["id"], "to_account_id": account["id"],
                    "amount": opening_balance, "description": "opening balance",
                })
            seeded.append(find(name, currency))
        for currency in sorted({currency for _, currency, _ in DEMO_ACCOUNTS}):
            seeded.insert(0, find(SYSTEM_ACCOUNT_NAME.format(currency=currency), currency))
        return [SeededAccount(str(row["id"]), row["name"], row["currency"], row["balance"])
                for row in seeded]
    finally:
        pool.close()
