"""Callback signatures, checked only with the standardwebhooks library's own ``Webhook.verify``."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta, timezone

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from difyq.worker.callbacks import USER_AGENT, deliver, signature_headers
from difyq.worker.config import CallbacksConfig
from tests.support.receiver import CallbackReceiver

BODY = b'{"type":"job.succeeded","timestamp":"2025-01-01T00:00:00.000Z","data":{"id":"job_1","answer":"h\xc3\xa9"}}'


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def test_headers_verify_with_the_reference_library() -> None:
    secret = new_secret()
    headers = signature_headers([secret], "job_01ABC", datetime.now(UTC), BODY)

    assert Webhook(secret).verify(BODY, headers)["data"]["id"] == "job_1"
    assert headers["webhook-id"] == "job_01ABC"
    assert headers["webhook-signature"].startswith("v1,")
    assert " " not in headers["webhook-signature"]
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == USER_AGENT == "difyq-webhooks/1"


def test_known_vector_from_the_standard_webhooks_spec() -> None:
    """The example of the Standard Webhooks spec and reference libraries, so the bytes signed are the spec's."""
    timestamp = datetime.fromtimestamp(1614265330, UTC)
    headers = signature_headers(
        ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"], "msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp, b'{"test": 2432232314}'
    )

    assert headers["webhook-timestamp"] == "1614265330"
    assert headers["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_rotation_signs_with_both_secrets_and_either_verifies() -> None:
    newest, previous, stranger = new_secret(), new_secret(), new_secret()
    headers = signature_headers([newest, previous], "job_rotate", datetime.now(UTC), BODY)

    assert len(headers["webhook-signature"].split(" ")) == 2
    assert all(part.startswith("v1,") for part in headers["webhook-signature"].split(" "))
    Webhook(newest).verify(BODY, headers)
    Webhook(previous).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(BODY, headers)


def test_a_changed_body_does_not_verify() -> None:
    secret = new_secret()
    headers = signature_headers([secret], "job_1", datetime.now(UTC), BODY)

    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"job_1", b"job_2"), headers)


@pytest.mark.parametrize("zone", [timezone(timedelta(hours=9)), timezone(timedelta(hours=-7)), None])
def test_timestamp_is_the_same_instant_in_any_zone(zone: timezone | None) -> None:
    instant = datetime.now(UTC).replace(microsecond=0)
    given = instant.astimezone(zone) if zone is not None else instant.replace(tzinfo=None)  # naive means UTC
    secret = new_secret()
    headers = signature_headers([secret], "job_1", given, BODY)

    assert headers["webhook-timestamp"] == str(int(instant.timestamp()))
    Webhook(secret).verify(BODY, headers)


@pytest.mark.parametrize("webhook_id", ["", "job.1"])
def test_rejects_ids_the_spec_forbids(webhook_id: str) -> None:
    with pytest.raises(ValueError):
        signature_headers([new_secret()], webhook_id, datetime.now(UTC), BODY)


def test_needs_a_secret() -> None:
    with pytest.raises(ValueError):
        signature_headers([], "job_1", datetime.now(UTC), BODY)


def test_delivered_callbacks_verify_at_the_receiver_with_old_and_new_secret() -> None:
    newest, previous = new_secret(), new_secret()
    config = CallbacksConfig(signing_secret=[newest, previous], allow_hosts=["127.0.0.1"], timeout=5)
    with CallbackReceiver() as receiver:
        attempt = deliver(receiver.url, BODY, "job_sig", config)

        assert attempt.outcome == "delivered"
        assert receiver.verify(newest)[0]["data"]["answer"] == "hé"
        assert receiver.verify(previous)[0]["data"]["id"] == "job_1"
        assert receiver.requests[0].body == BODY
        with pytest.raises(WebhookVerificationError):
            receiver.verify(new_secret())
