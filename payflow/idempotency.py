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
from payflow.redis_scripts import ScriptRunner

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADERS = ("X-Idempotency-Key", "Idempotency-Key")
KEY_CHARS_MAX = 255

# One round trip before a request runs: the caller's rate-limit counter,
# whether its API key was just revoked (see apikeys.KeyCache) and, for a keyed
# write under the limit, the in-flight lock, or the completed response cached
# in its place. Every name carries the caller's key id as a hash tag, so Redis
# Cluster keeps them in one slot.
# KEYS[1] counter, KEYS[2] revocation mark, KEYS[3] lock (when ARGV[1] = 'lock')
# ARGV: mode ('count' | 'lock'), limit (0: none), window s, token, lock ms
_ADMIT_SCRIPT = """
local count = redis.call('incr', KEYS[1])
if count == 1 then redis.call('expire', KEYS[1], ARGV[3]) end
local revoked = redis.call('exists', KEYS[2])
if revoked == 1 or ARGV[1] ~= 'lock' or (tonumber(ARGV[2]) > 0 and count > tonumber(ARGV[2])) then
  return {count, revoked, false, false}
end
if redis.call('set', KEYS[3], ARGV[4], 'NX', 'PX', ARGV[5]) then return {count, 0, 'acquired', false} end
local held = redis.call('get', KEYS[3])
if held and string.sub(held, 1, 5) == 'done:' then return {count, 0, 'done', held} end
return {count, 0, 'held', redis.call('pttl', KEYS[3])}
"""

# The lock becomes the completed response (a replay then needs no database),
# only if it is still ours: it may have expired and been retaken.
_COMPLETE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 0
"""

# Deletes the lock only if it is still ours (it may have expired and been retaken).
_RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_DONE = "done:"
_ADMIT, _COMPLETE, _RELEASE = map(ScriptRunner.script, (_ADMIT_SCRIPT, _COMPLETE_SCRIPT, _RELEASE_SCRIPT))


def key_from_headers(headers, required: bool) -> str | None:
    key = next((headers[name] for name in IDEMPOTENCY_HEADERS if name in headers), None)
    if key is None:
        if required:
            raise errors.IdempotencyKeyMissing()
        return None
    if not 1 <= len(key) <= KEY_CHARS_MAX or not (key.isascii() and key.isprintable()):  # " " to "~"
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


@dataclass(frozen=True)
class Completed:
    """A completed request's answer, as cached in Redis after its commit."""
    fingerprint: str
    status: int
    body: str

    def encode(self) -> str:
        return f"{_DONE}{self.fingerprint}:{self.status}:{self.body}"

    @classmethod
    def decode(cls, value: str) -> Completed:
        fingerprint, status, body = value.removeprefix(_DONE).split(":", 2)
        return cls(fingerprint, int(status), body)


@dataclass
class InFlightLock:
    acquired: bool
    name: str = ""
    token: str = ""
    retry_after_seconds: int = 1
    completed: Completed | None = None  # held by a finished request: its answer
    settled: bool = False  # completed or released by its owner


@dataclass(frozen=True)
class Admission:
    count: int | None  # requests in the caller's window; None: Redis unavailable
    lock: InFlightLock | None  # None: no lock asked for (or over the limit, or revoked)
    revoked: bool = False  # the caller's key was revoked moments ago


class RedisGuard:
    """The in-flight lock and the rate counter. Failures open a short circuit
    so a dead Redis costs one timeout per `redis_retry_after_failure_seconds`,
    not one per request."""

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
        # The per-request scripts skip redis-py's command path (see redis_scripts).
        self._scripts = ScriptRunner(self._client) if self._client else None
        self._down_until = 0.0
        self._lock = threading.Lock()

    def _available(self) -> bool:
        return self._client is not None and time.monotonic() >= self._down_until

    def _failed(self, error: Exception) -> None:
        metrics.REDIS_ERRORS.inc()
        with self._lock:
            self._down_until = time.monotonic() + self._config.redis_retry_after_failure_seconds
        log.warning("redis unavailable, serving from PostgreSQL alone: %s", error)

    def _name(self, scope: str, kind: str, suffix: str) -> str:
        return f"{self._config.redis_key_prefix}:{{{scope}}}:{kind}:{suffix}"

    def admit(self, scope: str, key: str | None, limit: int, window_seconds: int,
              window: int) -> Admission:
        """Counts the request in the caller's rate window and, when `key` is
        given and the count is within `limit` (0: no limit), takes the key's
        in-flight lock: one round trip."""
        if not self._available():
            return Admission(None, InFlightLock(acquired=True) if key else None)  # the database decides
        counter = self._name(scope, "rate", str(window))
        token = uuid.uuid4().hex
        keys = [counter, self._name(scope, "revoked", "")]
        if key:
            keys.append(self._name(scope, "idem", key))
        try:
            count, revoked, state, value = self._scripts.run(_ADMIT, keys, [
                "lock" if key else "count", limit, window_seconds, token,
                self._config.idempotency_lock_ms])
        except redis.RedisError as error:
            self._failed(error)
            return Admission(None, InFlightLock(acquired=True) if key else None)
        match state:
            case b"acquired":
                lock = InFlightLock(acquired=True, name=keys[2], token=token)
            case b"done":
                lock = InFlightLock(acquired=False, completed=Completed.decode(value.decode()))
            case b"held":
                lock = InFlightLock(acquired=False, retry_after_seconds=max(1, -(-int(value) // 1000)))
            case _:
                lock = None
        return Admission(count, lock, revoked=bool(revoked))

    @property
    def available(self) -> bool:
        """False while Redis is down or not configured: callers that cache
        what Redis must be able to invalidate stop caching."""
        return self._available()

    def mark_revoked(self, scope: str, keep_ms: int) -> bool:
        """Tells every API process at once that the key `scope` is revoked
        (their key caches hold it at most `keep_ms`); False if Redis is not
        reachable."""
        if self._client is None:
            return False
        try:
            self._client.set(self._name(scope, "revoked", ""), "1", px=keep_ms)
        except redis.RedisError as error:
            self._failed(error)
            return False
        return True

    def acquire(self, scope: str, key: str) -> InFlightLock:
        """The in-flight lock alone, for callers outside a request (no rate limit)."""
        lock = self.admit(scope, key, limit=0, window_seconds=1, window=0).lock
        return lock or InFlightLock(acquired=True)  # no lock taken (a revoked scope): the database decides

    def complete(self, lock: InFlightLock, completed: Completed) -> None:
        """Swap our lock for the committed answer, kept for
        `idempotency_replay_cache_ms`: replays inside it skip the database."""
        lock.settled = True
        if not lock.name or not self._available():
            return
        try:
            # Never longer than the database keeps the key.
            keep_ms = min(self._config.idempotency_replay_cache_ms,
                          self._config.idempotency_key_ttl_seconds * 1000)
            self._scripts.run(_COMPLETE, [lock.name], [lock.token, completed.encode(), keep_ms])
        except redis.RedisError as error:
            self._failed(error)  # the lock expires by itself

    def release(self, lock: InFlightLock) -> None:
        lock.settled = True
        if not lock.name or not self._available():
            return
        try:
            self._scripts.run(_RELEASE, [lock.name], [lock.token])
        except redis.RedisError as error:
            self._failed(error)  # the lock expires by itself

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
            self._scripts.close()
            self._client.close()
