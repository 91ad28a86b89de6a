"""The webhook action: POST each event to a URL, signed, with a timeout.

The body is the event JSON as published. Headers: ``Content-Type: application/json``,
``X-Hbbus-Event-Id`` (receivers deduplicate by it: a retry after a lost answer repeats it),
``X-Hbbus-Event-Kind``, ``X-Hbbus-Timestamp`` and ``X-Hbbus-Signature``
(see :mod:`hbbus.signing`). A 2xx answer is success. A 408, 425, 429 or 5xx answer, a refused
connection or a timeout is a failure the failover framework retries with backoff (durable retry
queues); any other 4xx is permanent — the event goes to the group's dead-letter queue at once.
"""

from __future__ import annotations

import time
from typing import ClassVar

import httpx

from hbbus.errors import ActionFailed, ConfigError, PermanentFailure
from hbbus.failover import Action, FailoverConsumer
from hbbus.settings import env_secret
from hbbus.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from hbbus.wire import Event

RETRYABLE = frozenset({408, 425, 429})


def read_secret(secret_env: str | None, secret_file: str | None) -> bytes | None:
    """The signing secret from an environment variable or a file (never from the config
    file itself, which is often committed)."""
    if secret_env and secret_file:
        raise ConfigError("give secret_env or secret_file, not both")
    if secret_env:
        return env_secret(secret_env, "webhook secret").encode()
    if secret_file:
        try:
            with open(secret_file, "rb") as fh:
                value_bytes = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"webhook secret file {secret_file}: {exc.strerror}") from None
        if not value_bytes:
            raise ConfigError(f"webhook secret file {secret_file} is empty")
        return value_bytes
    return None


class WebhookAction(Action):
    type: ClassVar[str] = "webhook"

    def __init__(
        self,
        url: str,
        *,
        secret: bytes | None = None,
        timeout_s: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"webhook url must be http(s)://…, got {url!r}")
        if not timeout_s > 0:
            raise ConfigError("webhook timeout_s must be positive")
        self.url = url
        self.secret = secret
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self._client: httpx.AsyncClient | None = None

    async def start(self, consumer: FailoverConsumer) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _headers(self, event: Event) -> dict[str, str]:
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "User-Agent": "hbbus-webhook",
            "X-Hbbus-Event-Id": event.id,
            "X-Hbbus-Event-Kind": event.kind,
        }
        if self.secret is not None:
            timestamp = int(time.time())
            headers[TIMESTAMP_HEADER] = str(timestamp)
            headers[SIGNATURE_HEADER] = sign(self.secret, timestamp, event.raw)
        return headers

    async def handle(self, event: Event) -> object:
        assert self._client is not None, "the action has not started"
        try:
            answer = await self._client.post(
                self.url, content=event.raw, headers=self._headers(event)
            )
        except httpx.TimeoutException:
            raise ActionFailed(f"POST {self.url}: no answer within {self.timeout_s:g}s") from None
        except httpx.HTTPError as exc:
            raise ActionFailed(f"POST {self.url}: {exc or type(exc).__name__}") from None
        status = answer.status_code
        if 200 <= status < 300:
            return f"POST {self.url}: {status}"
        text = f"POST {self.url}: HTTP {status} {answer.text[:200]!r}"
        if status >= 500 or status in RETRYABLE:
            raise ActionFailed(text)
        raise PermanentFailure(text)
