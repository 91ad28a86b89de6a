"""Connection settings: a frozen dataclass, read from the environment only at the edges."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

from hbbus.errors import ConfigError

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "hbbus"

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_AMQP_SCHEMES = ("amqp", "amqps")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a valid service, instance, group or namespace name."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ConfigError(f"invalid {what} {value!r}: use 1-64 of A-Z a-z 0-9 _ -")
    return value


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); ConfigError when it is not one."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def env_secret(variable: str, what: str) -> str:
    """A secret from the environment variable the configuration names; ConfigError when it is
    not set or empty (a typo must fail at start, not as an auth error on the first failover)."""
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"{what}: environment variable {variable} is not set")
    return value


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs, reprs and error messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _check_url(url: str, schemes: tuple[str, ...], what: str) -> str:
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        raise ConfigError(f"invalid {what} URL {redact(url)!r}") from None
    if scheme not in schemes:
        raise ConfigError(
            f"invalid {what} URL {redact(url)!r}: scheme must be one of {', '.join(schemes)}"
        )
    return url


@dataclass(frozen=True)
class Settings:
    """Where RabbitMQ and Redis are, and which namespace this deployment uses."""

    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        _check_url(self.amqp_url, _AMQP_SCHEMES, "AMQP")
        _check_url(self.redis_url, _REDIS_SCHEMES, "Redis")
        check_name(self.namespace, "namespace")

    def __repr__(self) -> str:
        return (
            f"Settings(amqp_url={redact(self.amqp_url)!r}, "
            f"redis_url={redact(self.redis_url)!r}, namespace={self.namespace!r})"
        )

    __str__ = __repr__

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: str | None) -> Settings:
        """Settings from ``HBBUS_AMQP_URL``, ``HBBUS_REDIS_URL``, ``HBBUS_NAMESPACE``.

        Keyword overrides that are not None win over the environment.
        """
        env = os.environ if env is None else env
        values = {
            "amqp_url": env.get("HBBUS_AMQP_URL") or DEFAULT_AMQP_URL,
            "redis_url": env.get("HBBUS_REDIS_URL") or DEFAULT_REDIS_URL,
            "namespace": env.get("HBBUS_NAMESPACE") or DEFAULT_NAMESPACE,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_namespace(self, namespace: str) -> Settings:
        return replace(self, namespace=namespace)
