"""Standard Webhooks headers for a callback: who sent it, when, and an HMAC any stock library can check.

The signature itself comes from the ``standardwebhooks`` reference library, so what we send is by construction
what its ``Webhook.verify`` accepts. During a secret rotation two secrets are configured and the header carries
one ``v1,<base64>`` per secret, space-separated, so receivers holding either secret verify the callback.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from standardwebhooks import Webhook

USER_AGENT = "difyq-webhooks/1"
CONTENT_TYPE = "application/json"


def _as_utc(timestamp: datetime) -> datetime:
    """The same instant in UTC; a naive ``timestamp`` is taken to be UTC already.

    ``Webhook.sign`` replaces the zone with UTC instead of converting, so an aware time in another zone must be
    converted here or the signed timestamp would differ from the header.
    """
    if timestamp.tzinfo is None:
        return timestamp.replace(tzinfo=UTC)
    return timestamp.astimezone(UTC)


def signature_headers(secrets: list[str], webhook_id: str, timestamp: datetime, body: bytes) -> dict[str, str]:
    """The headers of one callback attempt: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``, plus
    ``Content-Type`` and ``User-Agent``.

    ``secrets`` are ``whsec_`` secrets, newest first (one, or two during a rotation); ``body`` is the exact bytes
    that will be sent and must be UTF-8 (the library signs text). ``webhook_id`` stays the same on every retry;
    ``timestamp`` is the time of this attempt.
    """
    if not secrets:
        raise ValueError("at least one signing secret is needed")
    if not webhook_id or "." in webhook_id:
        raise ValueError("webhook_id must be non-empty and must not contain '.' (Standard Webhooks)")
    text = body.decode("utf-8")
    signed_at = _as_utc(timestamp)
    signatures = [Webhook(secret).sign(webhook_id, signed_at, text) for secret in secrets]
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(math.floor(signed_at.timestamp())),
        "webhook-signature": " ".join(signatures),
        "Content-Type": CONTENT_TYPE,
        "User-Agent": USER_AGENT,
    }
