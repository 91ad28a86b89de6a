"""Webhook signatures: how the webhook action signs an event, and how a receiver checks it.

The sender puts two headers on every POST::

    X-Hbbus-Timestamp: 1732300000          (unix seconds, when this try was sent)
    X-Hbbus-Signature: sha256=<hex>        (HMAC-SHA256 of "<timestamp>." + body, shared secret)

A receiver verifies with :func:`verify`, which also refuses a timestamp older than
``tolerance_s`` (a replayed request) — any language can do the same in a few lines.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Hbbus-Signature"
TIMESTAMP_HEADER = "X-Hbbus-Timestamp"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify(
    secret: bytes,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    tolerance_s: float = 300.0,
    now_s: float | None = None,
) -> bool:
    """Whether ``signature`` is ours for ``body`` and ``timestamp`` is recent enough."""
    if not timestamp or not signature or not timestamp.isdigit():
        return False
    now = time.time() if now_s is None else now_s
    if abs(now - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)
