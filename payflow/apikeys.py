"""API keys: `pf_live_…` secrets shown once; only their sha256 is stored.

A secret carries 256 random bits, so a fast hash is enough (nothing to brute
force); the lookup is by hash, and the hash found is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

import psycopg

from payflow.queries import queries

SECRET_PREFIX = "pf_live_"
SCOPES = ("read", "transfers:write", "admin")
SECRET_CHARS_MAX = 200
KEY_CACHE_ENTRIES_MAX = 10_000  # per process; live keys are far fewer


@dataclass(frozen=True)
class Caller:
    key_id: str
    name: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def owner(self) -> str | None:
        """The owner to filter on: None (everything) for an admin key."""
        return None if self.is_admin else self.key_id

    def may(self, scope: str) -> bool:
        # admin may do anything; transfers:write includes reading.
        return self.is_admin or scope in self.scopes or (scope == "read" and "transfers:write" in self.scopes)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def create(conn: psycopg.Connection, name: str, scopes: list[str]) -> tuple[str, str]:
    """Returns (key id, secret). The secret is not stored: show it once."""
    unknown = set(scopes) - set(SCOPES)
    if unknown or not scopes:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)}")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    row = conn.execute(queries["create_api_key"], {
        "name": name, "scopes": sorted(set(scopes)), "secret_sha256": _digest(secret),
        "prefix": secret[: len(SECRET_PREFIX) + 4]}).fetchone()
    key_id = row["id"] if isinstance(row, dict) else row[0]
    return str(key_id), secret


def well_formed(secret: str) -> bool:
    return secret.startswith(SECRET_PREFIX) and len(secret) <= SECRET_CHARS_MAX


def authenticate(conn: psycopg.Connection, secret: str) -> Caller | None:
    if not well_formed(secret):
        return None
    digest = _digest(secret)
    row = conn.execute(queries["authenticate_api_key"], {"secret_sha256": digest}).fetchone()
    if row is None or not hmac.compare_digest(bytes(row["secret_sha256"]), digest):
        return None
    return Caller(str(row["id"]), row["name"], frozenset(row["scopes"]))


def list_keys(conn: psycopg.Connection) -> list[dict]:
    return conn.execute(queries["list_api_keys"]).fetchall()


def revoke(conn: psycopg.Connection, key_id: str) -> str | None:
    """'revoked', 'already revoked', or None when no key has this id."""
    row = conn.execute(queries["revoke_api_key"], {"id": key_id}).fetchone()
    if row is None:
        return None
    was_live = row["was_live"] if isinstance(row, dict) else row[1]
    return "revoked" if was_live else "already revoked"


class KeyCache:
    """Live keys this process has looked up, for `ttl_seconds`: a request then
    needs no database round trip to authenticate.

    Revocation stays immediate: `payflow keys revoke` also marks the key
    revoked in Redis (RedisGuard.mark_revoked, kept longer than any entry
    here), and every request reads that mark in the Redis round trip it makes
    anyway (RedisGuard.admit). The cache is used only while Redis answers;
    a revocation Redis never heard of (plain SQL, Redis down) takes effect
    within `ttl_seconds`."""

    def __init__(self, ttl_seconds: float) -> None:
        self._ttl_seconds = ttl_seconds
        self._entries: dict[bytes, tuple[Caller, float]] = {}
        self._lock = threading.Lock()

    def get(self, secret: str) -> Caller | None:
        entry = self._entries.get(_digest(secret))
        if entry is None or time.monotonic() >= entry[1]:
            return None
        return entry[0]

    def put(self, secret: str, caller: Caller) -> None:
        if self._ttl_seconds <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._entries) >= KEY_CACHE_ENTRIES_MAX:  # bounded: drop the expired
                self._entries = {digest: entry for digest, entry in self._entries.items() if entry[1] > now}
                if len(self._entries) >= KEY_CACHE_ENTRIES_MAX:
                    self._entries.clear()
            self._entries[_digest(secret)] = (caller, now + self._ttl_seconds)

    def drop(self, key_id: str) -> None:
        with self._lock:
            self._entries = {digest: entry for digest, entry in self._entries.items()
                             if entry[0].key_id != key_id}
