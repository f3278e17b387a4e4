"""verify_delivery: each scheme checked against requests signed exactly as its real senders sign them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from difyq.producers.hooks.verify import SignatureError, verify_delivery
from difyq.worker.config import HookVerify

FIXTURES = Path(__file__).parent / "fixtures" / "webhooks"
GITHUB_BODY = (FIXTURES / "github-issues-opened.json").read_bytes()
STRIPE_BODY = (FIXTURES / "stripe-invoice-paid.json").read_bytes()
GITHUB_SECRET = "It's a Secret to Everybody"
STRIPE_SECRET = "whsec_8f3b1c2d4e5f60718293a4b5c6d7e8f9"
STANDARD_SECRET = "whsec_" + base64.b64encode(b"difyq-test-standard-webhooks-key!").decode()

GITHUB = HookVerify(scheme="github", secret=GITHUB_SECRET)
STRIPE = HookVerify(scheme="stripe", secret=STRIPE_SECRET)
STANDARD = HookVerify(scheme="standard", secret=STANDARD_SECRET)


def flip_byte(body: bytes, index: int = 10) -> bytes:
    return body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]


def github_headers(body: bytes, secret: str = GITHUB_SECRET, delivery: str | None = None) -> dict[str, str]:
    """What GitHub sends: HMAC-SHA256 of the raw body, hex, as ``sha256=…`` (docs: validating webhook deliveries)."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-GitHub-Event": "issues",
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "292430182",
        "X-Hub-Signature-256": f"sha256={digest}",
        "User-Agent": "GitHub-Hookshot/a1b2c3d",
        "Content-Type": "application/json",
    }


def stripe_signature(body: bytes, timestamp: int, secret: str = STRIPE_SECRET) -> str:
    """What Stripe computes: HMAC-SHA256 with the ``whsec_…`` string as key over ``"{t}." + body``, hex."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def stripe_headers(body: bytes, timestamp: int, *signatures: str) -> dict[str, str]:
    v1 = ",".join(f"v1={signature}" for signature in signatures or [stripe_signature(body, timestamp)])
    return {"Stripe-Signature": f"t={timestamp},{v1}", "Content-Type": "application/json; charset=utf-8"}


def standard_headers(body: bytes, timestamp: float, message_id: str = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W") -> dict:
    """What a Standard Webhooks sender does with the reference library."""
    sent_at = datetime.fromtimestamp(timestamp, tz=UTC)
    signature = Webhook(STANDARD_SECRET).sign(message_id, sent_at, body.decode())
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def rejection(verify: HookVerify, headers: dict[str, str], body: bytes, now: float | None = None) -> str:
    with pytest.raises(SignatureError) as caught:
        verify_delivery("hook", verify, headers, body, time.time() if now is None else now)
    return caught.value.reason


class TestGitHub:
    def test_a_signed_delivery_verifies_and_yields_the_delivery_guid(self):
        guid = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
        headers = github_headers(GITHUB_BODY, delivery=guid)
        assert verify_delivery("gh", GITHUB, headers, GITHUB_BODY, time.time()) == guid

    def test_header_names_are_case_insensitive(self):
        headers = {key.lower(): value for key, value in github_headers(GITHUB_BODY, delivery="abc").items()}
        assert verify_delivery("gh", GITHUB, headers, GITHUB_BODY, time.time()) == "abc"

    def test_one_tampered_byte_is_rejected(self):
        assert rejection(GITHUB, github_headers(GITHUB_BODY), flip_byte(GITHUB_BODY)) == "signature mismatch"

    def test_another_secret_is_rejected(self):
        assert rejection(GITHUB, github_headers(GITHUB_BODY, secret="not it"), GITHUB_BODY) == "signature mismatch"

    def test_no_signature_header_is_rejected(self):
        headers = github_headers(GITHUB_BODY)
        del headers["X-Hub-Signature-256"]
        assert rejection(GITHUB, headers, GITHUB_BODY) == "missing X-Hub-Signature-256 header"

    @pytest.mark.parametrize("value", ["sha1=0123abcd", "0123abcd", "sha256=", "sha256=not-hex"])
    def test_a_malformed_header_is_rejected(self, value):
        headers = {**github_headers(GITHUB_BODY), "X-Hub-Signature-256": value}
        assert rejection(GITHUB, headers, GITHUB_BODY).startswith("malformed X-Hub-Signature-256 header")

    def test_no_delivery_header_means_no_delivery_id(self):
        headers = github_headers(GITHUB_BODY)
        del headers["X-GitHub-Delivery"]
        assert verify_delivery("gh", GITHUB, headers, GITHUB_BODY, time.time()) is None

    def test_github_signs_no_timestamp_so_replays_are_left_to_delivery_dedupe(self):
        headers = github_headers(GITHUB_BODY, delivery="d1")
        assert verify_delivery("gh", GITHUB, headers, GITHUB_BODY, time.time() + 30 * 86_400) == "d1"


class TestStripe:
    def test_a_signed_event_verifies_and_yields_the_event_id(self):
        now = time.time()
        headers = stripe_headers(STRIPE_BODY, int(now))
        assert verify_delivery("stripe", STRIPE, headers, STRIPE_BODY, now) == "evt_1PeQ2vLkdIwHu7ixQ5Zr6Hx3"

    def test_several_v1_signatures_during_a_secret_roll(self):
        now = int(time.time())
        old = stripe_signature(STRIPE_BODY, now, secret="whsec_the_previous_secret")
        headers = stripe_headers(STRIPE_BODY, now, old, stripe_signature(STRIPE_BODY, now))
        headers["Stripe-Signature"] += ",v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"
        assert verify_delivery("stripe", STRIPE, headers, STRIPE_BODY, now) == "evt_1PeQ2vLkdIwHu7ixQ5Zr6Hx3"

    def test_one_tampered_byte_is_rejected(self):
        now = int(time.time())
        assert rejection(STRIPE, stripe_headers(STRIPE_BODY, now), flip_byte(STRIPE_BODY, 200), now) == (
            "signature mismatch"
        )

    def test_a_signature_moved_to_another_timestamp_is_rejected(self):
        now = int(time.time())
        headers = {"Stripe-Signature": f"t={now},v1={stripe_signature(STRIPE_BODY, now - 600)}"}
        assert rejection(STRIPE, headers, STRIPE_BODY, now) == "signature mismatch"

    def test_an_old_timestamp_is_rejected_after_300_seconds(self):
        now = int(time.time())
        assert verify_delivery("stripe", STRIPE, stripe_headers(STRIPE_BODY, now - 299), STRIPE_BODY, now)
        assert rejection(STRIPE, stripe_headers(STRIPE_BODY, now - 301), STRIPE_BODY, now) == (
            "timestamp outside tolerance"
        )

    def test_a_timestamp_from_the_future_is_rejected_too(self):
        now = int(time.time())
        assert rejection(STRIPE, stripe_headers(STRIPE_BODY, now + 301), STRIPE_BODY, now) == (
            "timestamp outside tolerance"
        )

    def test_no_header_is_rejected(self):
        assert rejection(STRIPE, {"Content-Type": "application/json"}, STRIPE_BODY) == "missing Stripe-Signature header"

    @pytest.mark.parametrize("value", ["t=1721406125", "v1=abcd", "t=abc,v1=abcd", "t=1721406125,v1=zz", "garbage"])
    def test_a_malformed_header_is_rejected(self, value):
        assert rejection(STRIPE, {"Stripe-Signature": value}, STRIPE_BODY).startswith("malformed Stripe-Signature")

    def test_the_secret_is_used_as_is_not_base64_decoded(self):
        now = int(time.time())
        decoded_key = STRIPE_SECRET.removeprefix("whsec_")
        headers = stripe_headers(STRIPE_BODY, now, stripe_signature(STRIPE_BODY, now, secret=decoded_key))
        assert rejection(STRIPE, headers, STRIPE_BODY, now) == "signature mismatch"

    def test_a_body_without_an_event_id_verifies_with_no_delivery_id(self):
        now = int(time.time())
        body = b'{"object": "event"}'
        assert verify_delivery("stripe", STRIPE, stripe_headers(body, now), body, now) is None


class TestStandardWebhooks:
    def test_a_library_signed_message_verifies_and_yields_webhook_id(self):
        now = time.time()
        headers = standard_headers(STRIPE_BODY, now)
        assert verify_delivery("std", STANDARD, headers, STRIPE_BODY, now) == "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
        Webhook(STANDARD_SECRET).verify(STRIPE_BODY, headers)  # the reference verifier agrees

    def test_a_rotated_signature_list_verifies(self):
        now = time.time()
        headers = standard_headers(STRIPE_BODY, now)
        stale = "v1," + base64.b64encode(secrets.token_bytes(32)).decode()
        headers["webhook-signature"] = f"v1a,c2lnbmVk {stale} {headers['webhook-signature']}"
        assert verify_delivery("std", STANDARD, headers, STRIPE_BODY, now)

    def test_one_tampered_byte_is_rejected(self):
        now = time.time()
        tampered = flip_byte(STRIPE_BODY, 40)
        headers = standard_headers(STRIPE_BODY, now)
        assert rejection(STANDARD, headers, tampered, now) == "signature mismatch"
        with pytest.raises(WebhookVerificationError):
            Webhook(STANDARD_SECRET).verify(tampered, headers)

    def test_another_message_id_is_rejected(self):
        now = time.time()
        headers = {**standard_headers(STRIPE_BODY, now), "webhook-id": "msg_other"}
        assert rejection(STANDARD, headers, STRIPE_BODY, now) == "signature mismatch"

    def test_an_old_timestamp_is_rejected_like_the_reference_library_does(self):
        now = time.time()
        headers = standard_headers(STRIPE_BODY, now - 301)
        assert rejection(STANDARD, headers, STRIPE_BODY, now) == "timestamp outside tolerance"
        with pytest.raises(WebhookVerificationError, match="too old"):
            Webhook(STANDARD_SECRET).verify(STRIPE_BODY, headers)

    def test_a_timestamp_from_the_future_is_rejected(self):
        now = time.time()
        assert rejection(STANDARD, standard_headers(STRIPE_BODY, now + 301), STRIPE_BODY, now) == (
            "timestamp outside tolerance"
        )

    @pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
    def test_each_missing_header_is_rejected(self, missing):
        headers = standard_headers(STRIPE_BODY, time.time())
        del headers[missing]
        assert rejection(STANDARD, headers, STRIPE_BODY) == f"missing {missing} header"

    def test_a_configured_tolerance_applies(self):
        verify = HookVerify(scheme="standard", secret=STANDARD_SECRET, tolerance="10m")
        now = time.time()
        assert verify_delivery("std", verify, standard_headers(STRIPE_BODY, now - 599), STRIPE_BODY, now)

    def test_a_body_that_is_not_utf8_is_rejected(self):
        headers = standard_headers(b"{}", time.time())
        assert "UTF-8" in rejection(STANDARD, headers, b"\xff\xfe")

    @pytest.mark.parametrize("value", ["v1,not base64!", "v1,@@@@"])
    def test_a_malformed_signature_is_rejected(self, value):
        headers = {**standard_headers(STRIPE_BODY, time.time()), "webhook-signature": value}
        assert rejection(STANDARD, headers, STRIPE_BODY).startswith("malformed webhook-signature header")


class TestHmacSha256:
    def test_hex_with_a_prefix_in_a_configured_header(self):
        verify = HookVerify(scheme="hmac-sha256", secret="s3cret", header="X-Signature", prefix="sha256=")
        digest = hmac.new(b"s3cret", GITHUB_BODY, hashlib.sha256).hexdigest()
        assert verify_delivery("crm", verify, {"x-signature": f"sha256={digest}"}, GITHUB_BODY, time.time()) is None
        assert rejection(verify, {"X-Signature": f"sha256={digest}"}, flip_byte(GITHUB_BODY)) == "signature mismatch"
        assert rejection(verify, {"X-Signature": digest}, GITHUB_BODY).startswith("malformed X-Signature header")

    def test_base64_without_a_prefix(self):
        verify = HookVerify(scheme="hmac-sha256", secret="s3cret", header="X-Shopify-Hmac-Sha256", encoding="base64")
        digest = base64.b64encode(hmac.new(b"s3cret", STRIPE_BODY, hashlib.sha256).digest()).decode()
        assert verify_delivery("shop", verify, {"X-Shopify-Hmac-Sha256": digest}, STRIPE_BODY, time.time()) is None
        assert rejection(verify, {}, STRIPE_BODY) == "missing X-Shopify-Hmac-Sha256 header"
        assert rejection(verify, {"X-Shopify-Hmac-Sha256": digest}, flip_byte(STRIPE_BODY)) == "signature mismatch"


class TestToken:
    def test_bearer_token(self):
        verify = HookVerify(scheme="token", secret="t0ken")
        assert verify_delivery("crm", verify, {"Authorization": "Bearer t0ken"}, b"{}", time.time()) is None
        assert rejection(verify, {"Authorization": "Bearer t0ke"}, b"{}") == "token mismatch"
        assert rejection(verify, {"Authorization": "Basic dDBrZW4="}, b"{}").startswith("malformed Authorization")
        assert rejection(verify, {}, b"{}") == "missing Authorization header"

    def test_named_header(self):
        verify = HookVerify(scheme="token", secret="t0ken", header="X-Gitlab-Token")
        assert verify_delivery("gl", verify, {"X-Gitlab-Token": "t0ken"}, b"{}", time.time()) is None
        assert rejection(verify, {"X-Gitlab-Token": "nope"}, b"{}") == "token mismatch"
        assert rejection(verify, {"Authorization": "Bearer t0ken"}, b"{}") == "missing X-Gitlab-Token header"


def test_scheme_none_accepts_anything_but_must_be_explicit():
    assert verify_delivery("open", HookVerify(scheme="none"), {}, b"anything", time.time()) is None
    with pytest.raises(ValueError, match="secret is required"):
        HookVerify(scheme="github")


def test_no_reason_reveals_the_secret_or_the_expected_signature():
    now = int(time.time())
    expected = [
        hmac.new(GITHUB_SECRET.encode(), GITHUB_BODY, hashlib.sha256).hexdigest(),
        stripe_signature(STRIPE_BODY, now),
        standard_headers(STRIPE_BODY, now)["webhook-signature"].partition(",")[2],
    ]
    reasons = [
        rejection(GITHUB, github_headers(GITHUB_BODY, secret="wrong"), GITHUB_BODY),
        rejection(GITHUB, {"X-Hub-Signature-256": "sha256=00"}, GITHUB_BODY),
        rejection(STRIPE, stripe_headers(STRIPE_BODY, now, "00" * 32), STRIPE_BODY, now),
        rejection(STRIPE, stripe_headers(STRIPE_BODY, now - 900), STRIPE_BODY, now),
        rejection(STANDARD, {**standard_headers(STRIPE_BODY, now), "webhook-id": "x"}, STRIPE_BODY, now),
        rejection(HookVerify(scheme="token", secret="t0ken"), {"Authorization": "Bearer t0k"}, b""),
    ]
    for reason in reasons:
        for hidden in [GITHUB_SECRET, STRIPE_SECRET, STANDARD_SECRET, STANDARD_SECRET[6:], "t0ken", *expected]:
            assert hidden not in reason


@settings(max_examples=150, deadline=None)
@given(body=st.binary(min_size=1, max_size=2048), data=st.data())
def test_any_single_byte_change_is_rejected_by_every_signing_scheme(body, data):
    index = data.draw(st.integers(0, len(body) - 1))
    mask = data.draw(st.integers(1, 255))
    tampered = body[:index] + bytes([body[index] ^ mask]) + body[index + 1 :]
    now = int(time.time())
    assert verify_delivery("gh", GITHUB, github_headers(body), body, now)
    assert rejection(GITHUB, github_headers(body), tampered, now) == "signature mismatch"
    verify_delivery("stripe", STRIPE, stripe_headers(body, now), body, now)
    assert rejection(STRIPE, stripe_headers(body, now), tampered, now) == "signature mismatch"


@settings(max_examples=150, deadline=None)
@given(
    scheme=st.sampled_from(["github", "stripe", "standard", "hmac-sha256", "token"]),
    headers=st.dictionaries(
        st.sampled_from(["X-Hub-Signature-256", "Stripe-Signature", "webhook-id", "webhook-timestamp",
                         "webhook-signature", "X-Signature", "Authorization"]),
        st.text(max_size=80),
    ),
    body=st.binary(max_size=256),
)
def test_arbitrary_headers_only_ever_raise_signature_error(scheme, headers, body):
    header = "X-Signature" if scheme == "hmac-sha256" else None
    verify = HookVerify(scheme=scheme, secret=STANDARD_SECRET, header=header)
    try:
        verify_delivery("fuzz", verify, headers, body, time.time())
    except SignatureError as exc:
        assert exc.hook == "fuzz" and exc.reason


def test_the_fixtures_are_the_events_they_claim_to_be():
    assert json.loads(GITHUB_BODY)["action"] == "opened"
    assert json.loads(STRIPE_BODY)["type"] == "invoice.paid"
