"""Inbound webhook verification: each scheme checks the raw body bytes, before anything parses them.

``verify_delivery`` answers with the sender's delivery id (what a redelivery repeats) or raises
``SignatureError``. Signatures are compared with ``hmac.compare_digest`` on decoded bytes, so a malformed header
never reaches the comparison and no comparison leaks timing. A reason names the header and what was wrong with
it, never the secret or the signature that was expected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

from difyq.worker.config import HookVerify

Verifier = Callable[[HookVerify, dict[str, str], bytes, float], "str | None"]


class SignatureError(Exception):
    """A delivery that failed verification; ``reason`` is safe to send back to the caller."""

    def __init__(self, reason: str, hook: str = ""):
        self.reason = reason
        self.hook = hook
        super().__init__(reason)


def verify_delivery(name: str, verify: HookVerify, headers: Mapping[str, str], body: bytes, now: float) -> str | None:
    """Check hook ``name``'s delivery against its ``verify`` settings at unix time ``now``.

    Returns the delivery id the scheme carries (``X-GitHub-Delivery``, the Stripe event's ``id``, ``webhook-id``),
    None for schemes without one; raises SignatureError when the delivery is not authentic or too old.
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    try:
        return _VERIFIERS[verify.scheme](verify, lowered, body, now)
    except SignatureError as exc:
        exc.hook = name
        raise


def _secret(verify: HookVerify) -> bytes:
    assert verify.secret is not None, "HookVerify requires a secret for every scheme but none"
    return verify.secret.get_secret_value().encode()


def _header(headers: dict[str, str], name: str) -> str:
    value = headers.get(name.lower(), "").strip()
    if not value:
        raise SignatureError(f"missing {name} header")
    return value


def _from_hex(value: str, header: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise SignatureError(f"malformed {header} header: signature is not hex") from None


def _from_base64(value: str, header: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"malformed {header} header: signature is not base64") from None


def _any_matches(expected: bytes, candidates: list[bytes]) -> bool:
    """Compare every candidate (no early exit), each in constant time."""
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    return matched


def _parse_timestamp(value: str, header: str) -> int:
    """Unix seconds as plain ASCII digits (``int()`` alone would also take ``+1_700…`` or non-ASCII digits)."""
    if not (value.isascii() and value.isdigit() and len(value) <= 11):
        raise SignatureError(f"malformed {header} header: timestamp is not unix seconds")
    return int(value)


def _check_timestamp(timestamp: int, now: float, tolerance: float) -> None:
    if abs(now - timestamp) > tolerance:
        raise SignatureError("timestamp outside tolerance")


def _github(verify: HookVerify, headers: dict[str, str], body: bytes, now: float) -> str | None:
    """``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>``; GitHub signs no timestamp."""
    header = "X-Hub-Signature-256"
    value = _header(headers, header)
    algorithm, _, signature = value.partition("=")
    if algorithm != "sha256" or not signature:
        raise SignatureError(f"malformed {header} header: expected sha256=<hex>")
    provided = _from_hex(signature, header)
    expected = hmac.new(_secret(verify), body, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, provided):
        raise SignatureError("signature mismatch")
    return headers.get("x-github-delivery") or None


def _stripe(verify: HookVerify, headers: dict[str, str], body: bytes, now: float) -> str | None:
    """``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "{t}." + body)>[,v1=…]`` (several during a roll)."""
    header = "Stripe-Signature"
    timestamp: str | None = None
    signatures: list[str] = []
    for item in _header(headers, header).split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and timestamp is None:
            timestamp = value
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError(f"malformed {header} header: expected t=<timestamp>,v1=<hex>")
    sent_at = _parse_timestamp(timestamp, header)
    provided = [_from_hex(signature, header) for signature in signatures]
    expected = hmac.new(_secret(verify), timestamp.encode() + b"." + body, hashlib.sha256).digest()
    if not _any_matches(expected, provided):
        raise SignatureError("signature mismatch")
    _check_timestamp(sent_at, now, verify.tolerance)
    return _stripe_event_id(body)


def _stripe_event_id(body: bytes) -> str | None:
    """The verified event's ``id`` (``evt_…``): Stripe retries an event with the same id and a new signature."""
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        return None
    event_id = event.get("id") if isinstance(event, dict) else None
    return event_id if isinstance(event_id, str) and event_id else None


def _standard(verify: HookVerify, headers: dict[str, str], body: bytes, now: float) -> str | None:
    """Standard Webhooks: ``v1,<base64 HMAC-SHA256>`` over ``{id}.{timestamp}.{body}``, space-separated list.

    The ``standardwebhooks`` library decodes the ``whsec_`` secret and computes the signature; the timestamp is
    checked here against ``now`` and the hook's tolerance (the library's own ``verify`` reads the wall clock
    and fixes the tolerance at five minutes).
    """
    message_id = _header(headers, "webhook-id")
    timestamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    try:
        webhook = Webhook(verify.secret.get_secret_value() if verify.secret else "")
    except (binascii.Error, ValueError, EmptyWebhookSecretError):
        raise SignatureError("hook secret is not a valid Standard Webhooks (whsec_) secret") from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError("body is not UTF-8, so it cannot carry a Standard Webhooks signature") from None
    sent_at = _parse_timestamp(timestamp, "webhook-timestamp")
    signed = webhook.sign(message_id, datetime.fromtimestamp(sent_at, tz=UTC), text)
    expected = base64.b64decode(signed.partition(",")[2])
    provided = [
        _from_base64(signature, "webhook-signature")
        for version, _, signature in (entry.partition(",") for entry in signatures.split())
        if version == "v1"
    ]
    if not _any_matches(expected, provided):
        raise SignatureError("signature mismatch")
    _check_timestamp(sent_at, now, verify.tolerance)
    return message_id


def _hmac_sha256(verify: HookVerify, headers: dict[str, str], body: bytes, now: float) -> str | None:
    """HMAC-SHA256 of the body in a configured header, hex or base64, after an optional prefix (``sha256=``)."""
    assert verify.header is not None, "HookVerify requires a header for hmac-sha256"
    value = _header(headers, verify.header)
    if not value.startswith(verify.prefix):
        raise SignatureError(f"malformed {verify.header} header: expected the prefix {verify.prefix!r}")
    signature = value.removeprefix(verify.prefix).strip()
    decode = _from_hex if verify.encoding == "hex" else _from_base64
    provided = decode(signature, verify.header)
    expected = hmac.new(_secret(verify), body, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, provided):
        raise SignatureError("signature mismatch")
    return None


def _token(verify: HookVerify, headers: dict[str, str], body: bytes, now: float) -> str | None:
    """A shared token: ``Authorization: Bearer <token>``, or the whole value of a named header (after ``prefix``)."""
    if verify.header:
        value = _header(headers, verify.header)
        if not value.startswith(verify.prefix):
            raise SignatureError(f"malformed {verify.header} header: expected the prefix {verify.prefix!r}")
        token = value.removeprefix(verify.prefix).strip()
    else:
        scheme, _, token = _header(headers, "Authorization").partition(" ")
        if scheme.lower() != "bearer":
            raise SignatureError("malformed Authorization header: expected Bearer <token>")
        token = token.strip()
    if not hmac.compare_digest(_secret(verify), token.encode("utf-8", "surrogatepass")):
        raise SignatureError("token mismatch")
    return None


def _none(verify: HookVerify, headers: dict[str, str], body: bytes, now: float) -> str | None:
    """``scheme: none`` accepts every delivery; the config has to say so explicitly."""
    return None


_VERIFIERS: dict[str, Verifier] = {
    "github": _github,
    "stripe": _stripe,
    "standard": _standard,
    "hmac-sha256": _hmac_sha256,
    "token": _token,
    "none": _none,
}
