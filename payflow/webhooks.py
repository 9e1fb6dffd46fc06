"""Signed webhooks, in the manner of Standard Webhooks (and Stripe-Signature).

Each delivery carries three headers:
    webhook-id:        the event id (the same on every retry: dedupe on it)
    webhook-timestamp: Unix seconds when this attempt was signed
    webhook-signature: "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))
where key is the base64-decoded part of the endpoint's secret after "whsec_".

A receiver verifies with `verify(secret, headers, body)`: it recomputes the
signature over the raw body bytes, compares in constant time, and refuses
timestamps more than `tolerance_seconds` away from now (replays).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300


class WebhookVerificationError(Exception):
    """The webhook's signature or timestamp does not verify."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def headers_for(secret: str, message_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, message_id, timestamp, body)}


def verify(secret: str, headers: Mapping[str, str], body: bytes,
           tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS, now: float | None = None) -> None:
    """Raises WebhookVerificationError unless the headers sign this body."""
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        message_id = lowered["webhook-id"]
        raw_timestamp = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"].split()
    except KeyError:
        raise WebhookVerificationError("missing webhook headers") from None
    if not (raw_timestamp.isascii() and raw_timestamp.isdigit()):
        raise WebhookVerificationError("malformed webhook-timestamp")
    timestamp = int(raw_timestamp)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise WebhookVerificationError("timestamp outside the tolerance: a replay?")
    expected = sign(secret, message_id, timestamp, body).encode()
    # A sender may list several signatures (during a secret rotation). Bytes,
    # so that a non-ASCII header is a mismatch, not a TypeError.
    if not any(hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
               for candidate in signatures):
        raise WebhookVerificationError("signature does not match")


RESPONSE_BYTES_MAX = 64 * 1024


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a 3xx is a failed delivery, not a hop to wherever it points


_opener = urllib.request.build_opener(_NoRedirects, urllib.request.ProxyHandler({}))


def deliver(url: str, secret: str, message_id: str, body: bytes, timeout_seconds: float) -> str | None:
    """POSTs one signed delivery; None on a 2xx, else why it failed (to retry)."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "payflow-webhooks/1",
        **headers_for(secret, message_id, body)})
    try:
        with _opener.open(request, timeout=timeout_seconds) as response:
            response.read(RESPONSE_BYTES_MAX)
    except urllib.error.HTTPError as error:
        return f"endpoint answered {error.code}"
    except (OSError, TimeoutError) as error:
        return f"endpoint unreachable: {error}"
    return None
