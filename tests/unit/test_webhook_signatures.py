"""The documented verification recipe (payflow.webhooks.verify)."""

from __future__ import annotations

import pytest

from payflow import webhooks

BODY = b'{"id":"evt_1","type":"transfer.posted","data":{"transfer_id":"t"}}'
NOW = 1_800_000_000


@pytest.fixture
def secret():
    return webhooks.new_secret()


def test_the_standard_webhooks_test_vector():
    """The published example of the Standard Webhooks specification."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    signature = webhooks.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": signature}
    webhooks.verify(secret, headers, body, now=1614265330)


@pytest.mark.parametrize(("name", "value"), [("webhook-timestamp", "1_800_000_000"),
                                             ("webhook-timestamp", " 1800000000"),
                                             ("webhook-signature", "v1,ünïcode")])
def test_malformed_headers_fail_cleanly(secret, name, value):
    headers = webhooks.headers_for(secret, "evt_1", BODY, now=NOW)
    headers[name] = value
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(secret, headers, BODY, now=NOW)


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
