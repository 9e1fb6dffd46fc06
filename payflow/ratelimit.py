"""Per API key rate limit: a fixed one-minute window counted in Redis.

It fails open: with Redis down, requests are served (and the outage is
logged and shown on /ready); correctness never depended on it.
"""

from __future__ import annotations

import time

from payflow import errors
from payflow.config import Config
from payflow.idempotency import RedisGuard

WINDOW_SECONDS = 60


class RateLimiter:
    def __init__(self, config: Config, guard: RedisGuard) -> None:
        self._limit = config.rate_limit_requests_per_minute
        self._prefix = config.redis_key_prefix
        self._guard = guard

    def check(self, key_id: str) -> None:
        if self._limit <= 0:
            return
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        count = self._guard.count_in_window(f"{self._prefix}:rate:{key_id}:{window}", WINDOW_SECONDS)
        if count is not None and count > self._limit:
            error = errors.RateLimited(details={"limit_per_minute": self._limit})
            error.retry_after_seconds = max(1, int(WINDOW_SECONDS - now % WINDOW_SECONDS))
            raise error
