"""Per API key rate limit: a fixed one-minute window counted in Redis, in the
same round trip as the idempotency lock (RedisGuard.admit).

It fails open: with Redis down, requests are served (and the outage is
logged and shown on /ready); correctness never depended on it.
"""

from __future__ import annotations

import time

from payflow import errors
from payflow.config import Config
from payflow.idempotency import Admission, RedisGuard

WINDOW_SECONDS = 60


class RateLimiter:
    def __init__(self, config: Config, guard: RedisGuard) -> None:
        self._limit = config.rate_limit_requests_per_minute
        self._guard = guard

    def admit(self, key_id: str, idempotency_key: str | None) -> Admission:
        """Counts the request and, under the limit, takes the idempotency
        key's in-flight lock (see RedisGuard.admit)."""
        now = time.time()
        admission = self._guard.admit(key_id, idempotency_key, max(self._limit, 0), WINDOW_SECONDS,
                                      int(now // WINDOW_SECONDS))
        if admission.revoked:
            return admission  # the caller hears 401 (auth), not "retry later"
        if self._limit > 0 and admission.count is not None and admission.count > self._limit:
            error = errors.RateLimited(details={"limit_per_minute": self._limit})
            error.retry_after_seconds = max(1, int(WINDOW_SECONDS - now % WINDOW_SECONDS))
            raise error
        return admission
