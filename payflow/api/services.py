"""The per-process objects a request needs, built once by create_app."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import psycopg_pool
from flask import current_app

from payflow.apikeys import KeyCache
from payflow.config import Config
from payflow.idempotency import RedisGuard
from payflow.ledger import Ledger
from payflow.ratelimit import RateLimiter


@dataclass
class Services:
    config: Config
    pool: psycopg_pool.ConnectionPool
    guard: RedisGuard
    ledger: Ledger
    rate_limiter: RateLimiter
    key_cache: KeyCache

    def ping_database(self) -> str:
        try:
            with self.pool.connection() as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, psycopg_pool.PoolTimeout):
            return "down"
        return "ok"

    def close(self) -> None:
        self.guard.close()
        self.pool.close()


def services() -> Services:
    return current_app.extensions["payflow"]
