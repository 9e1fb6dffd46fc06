"""The documented verification recipe (payflow.webhooks.verify)."""

from __future__ import annotations

import pytest

from payflow import webhooks

BODY = b'{"id":"evt_1","type":"transfer.posted","data":{"transfer_id":"t"}}'
NOW = 1_800_000_000


@pytest.fixture
def secret():
    return webhooks.new_secret()


def test_a_signed_delivery_verifies(secret):
    headers = webhooks.headers_for(secret, "evt_1", BODY, now=NOW)
    webhooks.verify(secret, headers, BODY, now=NOW + 10)
    webhooks.verify(secret, {k.upper(): v for k, v in headers.items()}, BODY, now=NOW)


@pytest.mark.parametrize("tamper", ["body", "timestamp", "id", "secret", "signature"])
def test_any_change_fails(secret, tamper):
    headers = webhooks.headers_for(secret, "evt_1", BODY, now=NOW)
    body, key = BODY, secret
    if tamper == "body":
        body = BODY.replace(b"transfer_id", b"transfer_iD")
    elif tamper == "timestamp":
        headers["webhook-timestamp"] = str(NOW + 1)
    elif tamper == "id":
        headers["webhook-id"] = "evt_2"
    elif tamper == "secret":
        key = webhooks.new_secret()
    else:
        headers["webhook-signature"] = "v1," + "A" * 44
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(key, headers, body, now=NOW)


def test_old_and_future_timestamps_are_refused(secret):
    headers = webhooks.headers_for(secret, "evt_1", BODY, now=NOW)
    with pytest.raises(webhooks.WebhookVerificationError, match="tolerance"):
        webhooks.verify(secret, headers, BODY, now=NOW + 301)
    with pytest.raises(webhooks.WebhookVerificationError, match="tolerance"):
        webhooks.verify(secret, headers, BODY, now=NOW - 301)


def test_missing_headers_are_refused(secret):
    with pytest.raises(webhooks.WebhookVerificationError, match="missing"):
        webhooks.verify(secret, {}, BODY, now=NOW)


def test_one_matching_signature_among_several_is_enough(secret):
    headers = webhooks.headers_for(secret, "evt_1", BODY, now=NOW)
    headers["webhook-signature"] = "v1,bm9wZQ== " + headers["webhook-signature"]
    webhooks.verify(secret, headers, BODY, now=NOW)
