"""Demo data for `make seed` / `make run`: a system account per currency and a
few customer accounts, funded by transfers out of the system account so that
the ledger still sums to zero (no money from nothing)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from payflow.config import Config
from payflow.db import create_pool
from payflow.idempotency import RedisGuard
from payflow.ledger import IdempotentRequest, Ledger
from payflow.queries import queries

SYSTEM_ACCOUNT_NAME = "World {currency}"
DEMO_ACCOUNTS = (("Alice", "USD", 100_000_00), ("Bob", "USD", 50_000_00), ("Carol", "EUR", 20_000_00))


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

        def ensure(name: str, currency: str, is_system: bool) -> tuple[dict, bool]:
            found = find(name, currency)
            if found:
                return found, False
            outcome = ledger.create_account(IdempotentRequest(None, None), name, currency,
                                            None if is_system else 0, is_system=is_system)
            return json.loads(outcome.body), True

        seeded = []
        for name, currency, opening_balance in DEMO_ACCOUNTS:
            world, _ = ensure(SYSTEM_ACCOUNT_NAME.format(currency=currency), currency, True)
            account, created = ensure(name, currency, False)
            if created:
                ledger.post_transfer(IdempotentRequest(None, None), {
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
