"""Payout providers: where a payout's money actually goes.

A provider is called outside any transaction, with an idempotency key derived
from the outbox task; delivery is at least once, so the provider dedupes on
the key and a retried call never pays twice.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

import psycopg_pool

from payflow.config import Config
from payflow.queries import queries


@dataclass(frozen=True)
class PayoutRequest:
    idempotency_key: str
    payout_id: str
    amount: int
    currency: str
    destination: dict


@dataclass(frozen=True)
class PayoutResult:
    """paid; permanent (refused for good: not paid); retryable (not paid this
    time, e.g. unavailable or rate limited); unknown (the call may have paid,
    e.g. a timeout after sending: only a retry with the same key can tell)."""

    outcome: str
    reference: str = ""
    reason: str = ""

    @classmethod
    def paid(cls, reference: str) -> PayoutResult:
        return cls("paid", reference=reference)

    @classmethod
    def retryable(cls, reason: str) -> PayoutResult:
        return cls("retryable", reason=reason)

    @classmethod
    def permanent(cls, reason: str) -> PayoutResult:
        return cls("permanent", reason=reason)

    @classmethod
    def unknown(cls, reason: str) -> PayoutResult:
        return cls("unknown", reason=reason)


class PayoutProvider(Protocol):
    def pay(self, request: PayoutRequest) -> PayoutResult: ...


class NoopProvider:
    """Pays instantly and remembers nothing: for benchmarks of the queue itself."""

    def pay(self, request: PayoutRequest) -> PayoutResult:
        return PayoutResult.paid(f"noop-{request.idempotency_key}")


class SimulatedProvider:
    """The default: configurable latency and failure rates, deterministic under
    a seed (the outcome of a call depends on the seed, the key and how many
    calls that key had), and it records every call it receives in the database
    so tests can prove that no payout was paid twice."""

    def __init__(self, config: Config, pool: psycopg_pool.ConnectionPool) -> None:
        self._config = config
        self._pool = pool

    def _draw(self, key: str, call_number: int) -> float:
        seed = hashlib.sha256(f"{self._config.simulated_seed}:{key}:{call_number}".encode()).digest()
        return random.Random(seed).random()

    def pay(self, request: PayoutRequest) -> PayoutResult:
        config = self._config
        if config.simulated_latency_ms:
            time.sleep(config.simulated_latency_ms / 1000)
        with self._pool.connection() as conn:
            call = conn.execute(queries["simulated_record_call"], {
                "key": request.idempotency_key, "payout_id": request.payout_id,
                "amount": request.amount}).fetchone()
            result = self._decide(request, call["call_number"], conn)
            conn.execute(queries["simulated_set_outcome"],
                         {"call_id": call["call_id"], "outcome": result.outcome})
        return result

    def _decide(self, request: PayoutRequest, call_number: int, conn) -> PayoutResult:
        config = self._config
        paid = conn.execute(queries["simulated_find_payment"], {"key": request.idempotency_key}).fetchone()
        if paid:  # a retried call: the payment already made, whatever else would happen
            return PayoutResult.paid(paid["reference"])
        if call_number <= config.simulated_fail_first_calls:
            return PayoutResult.retryable(f"simulated outage (call {call_number})")
        draw = self._draw(request.idempotency_key, call_number)
        if draw < config.simulated_permanent_failure_rate:
            return PayoutResult.permanent("simulated: destination account closed")
        if draw < config.simulated_permanent_failure_rate + config.simulated_failure_rate:
            return PayoutResult.retryable("simulated: provider unavailable (503), nothing paid")
        params = {"key": request.idempotency_key, "payout_id": request.payout_id,
                  "amount": request.amount, "reference": f"sim_{request.idempotency_key}"}
        row = conn.execute(queries["simulated_pay"], params).fetchone()
        if row is None:  # a concurrent call with the same key paid first; read its payment
            row = conn.execute(queries["simulated_pay"], params).fetchone()
        return PayoutResult.paid(row["reference"])


# Answers that say "not now" rather than "no": retry with the same key.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 409, 425, 429})
RESPONSE_BYTES_MAX = 64 * 1024


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect turns a POST into a GET: never follow one with money at stake."""

    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirects, urllib.request.ProxyHandler({}))


class HttpProvider:
    """POSTs the payout to a URL with an Idempotency-Key header.

    2xx: paid (the body's "reference", if any); 408/409/425/429, 3xx and a
    refused connection: retryable (nothing was paid); other 4xx: permanent;
    5xx and timeouts: unknown (it may have paid; a retry with the key tells)."""

    def __init__(self, config: Config) -> None:
        if not config.payout_http_url:
            raise ValueError("PAYFLOW_PAYOUT_HTTP_URL is required with the http provider")
        self._url = config.payout_http_url
        self._timeout_seconds = config.payout_http_timeout_seconds

    def pay(self, request: PayoutRequest) -> PayoutResult:
        body = json.dumps({"payout_id": request.payout_id, "amount": request.amount,
                           "currency": request.currency, "destination": request.destination})
        http_request = urllib.request.Request(
            self._url, data=body.encode(), method="POST",
            headers={"Content-Type": "application/json", "Idempotency-Key": request.idempotency_key})
        try:
            with _opener.open(http_request, timeout=self._timeout_seconds) as response:
                answer = response.read(RESPONSE_BYTES_MAX)
        except urllib.error.HTTPError as error:
            return _classify(error.code)
        except ConnectionRefusedError as error:
            return PayoutResult.retryable(f"provider unreachable: {error}")
        except urllib.error.URLError as error:
            if isinstance(error.reason, ConnectionRefusedError):
                return PayoutResult.retryable(f"provider unreachable: {error.reason}")
            return PayoutResult.unknown(f"provider call failed: {error.reason}")
        except (OSError, TimeoutError) as error:
            return PayoutResult.unknown(f"provider call failed: {error}")
        try:
            reference = str(json.loads(answer).get("reference") or request.idempotency_key)
        except (ValueError, AttributeError):
            reference = request.idempotency_key
        return PayoutResult.paid(reference)


def _classify(status: int) -> PayoutResult:
    reason = f"provider answered {status}"
    if status < 400 or status in RETRYABLE_CLIENT_STATUSES:
        return PayoutResult.retryable(reason)
    if status < 500:
        return PayoutResult.permanent(reason)
    return PayoutResult.unknown(reason)


def create_provider(config: Config, pool: psycopg_pool.ConnectionPool) -> PayoutProvider:
    match config.payout_provider:
        case "simulated":
            return SimulatedProvider(config, pool)
        case "http":
            return HttpProvider(config)
        case "noop":
            return NoopProvider()
    raise ValueError(f"unknown payout provider {config.payout_provider!r} (simulated, http, noop)")
