"""Idempotency keys: the header, the request fingerprint, and the Redis
in-flight lock.

PostgreSQL is the truth (payflow_idempotency_begin_v1): the stored response
and a transaction-scoped advisory lock decide replay, reuse and "still
running". Redis only sheds load: a concurrent duplicate is answered 409 without
touching the database. Redis holds nothing that cannot be lost: when it is down
we skip it (logged, shown on /ready) and the database alone stays correct.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from payflow import errors, metrics
from payflow.config import Config

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADERS = ("X-Idempotency-Key", "Idempotency-Key")
KEY_CHARS_MAX = 255

# Deletes the lock only if it is still ours (it may have expired and been retaken).
_RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def key_from_headers(headers, required: bool) -> str | None:
    key = next((headers[name] for name in IDEMPOTENCY_HEADERS if name in headers), None)
    if key is None:
        if required:
            raise errors.IdempotencyKeyMissing()
        return None
    if not 1 <= len(key) <= KEY_CHARS_MAX or not all(" " <= char <= "~" for char in key):
        raise errors.IdempotencyKeyInvalid(details={"max_length": KEY_CHARS_MAX})
    return key


def fingerprint(method: str, path: str, body: object) -> str:
    """sha256 of method, path and the canonical JSON body: the same request
    written with other spacing or key order has the same fingerprint."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256()
    for part in (method.upper(), path, canonical):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class InFlightLock:
    acquired: bool
    name: str = ""
    token: str = ""
    retry_after_seconds: int = 1


class RedisGuard:
    """The in-flight lock. Failures open a short circuit so a dead Redis costs
    one timeout per `redis_retry_after_failure_seconds`, not one per request."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._client = (
            redis.Redis.from_url(
                config.redis_url,
                socket_timeout=config.redis_timeout_ms / 1000,
                socket_connect_timeout=config.redis_timeout_ms / 1000,
                retry_on_timeout=False,
            )
            if config.redis_url
            else None
        )
        self._release = self._client.register_script(_RELEASE_SCRIPT) if self._client else None
        self._down_until = 0.0
        self._lock = threading.Lock()

    def _available(self) -> bool:
        return self._client is not None and time.monotonic() >= self._down_until

    def _failed(self, error: Exception) -> None:
        metrics.REDIS_ERRORS.inc()
        with self._lock:
            self._down_until = time.monotonic() + self._config.redis_retry_after_failure_seconds
        log.warning("redis unavailable, serving from PostgreSQL alone: %s", error)

    def acquire(self, scope: str, key: str) -> InFlightLock:
        if not self._available():
            return InFlightLock(acquired=True)  # degraded: the database decides alone
        name = f"{self._config.redis_key_prefix}:idem:{scope}:{key}"
        token = uuid.uuid4().hex
        try:
            if self._client.set(name, token, nx=True, px=self._config.idempotency_lock_ms):
                return InFlightLock(acquired=True, name=name, token=token)
            remaining_ms = self._client.pttl(name)
        except redis.RedisError as error:
            self._failed(error)
            return InFlightLock(acquired=True)
        return InFlightLock(acquired=False, retry_after_seconds=max(1, -(-remaining_ms // 1000)))

    def release(self, lock: InFlightLock) -> None:
        if not lock.name or not self._available():
            return
        try:
            self._release(keys=[lock.name], args=[lock.token])
        except redis.RedisError as error:
            self._failed(error)  # the lock expires by itself

    def count_in_window(self, name: str, window_seconds: int) -> int | None:
        """Increments a counter that expires with its window; None when Redis
        is unavailable (callers fail open)."""
        if not self._available():
            return None
        try:
            pipeline = self._client.pipeline(transaction=False)
            pipeline.incr(name)
            pipeline.expire(name, window_seconds)  # the name carries its window: no drift
            count, _ = pipeline.execute()
        except redis.RedisError as error:
            self._failed(error)
            return None
        return count

    def ping(self) -> str:
        """'ok', 'down' or 'not configured', for /ready."""
        if self._client is None:
            return "not configured"
        try:
            self._client.ping()
        except redis.RedisError as error:
            self._failed(error)
            return "down"
        with self._lock:
            self._down_until = 0.0
        return "ok"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
