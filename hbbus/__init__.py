"""hbbus: a heartbeat bus on RabbitMQ and Redis.

Services use :class:`Heartbeater` (asyncio) or :class:`SyncHeartbeater` (a thread), and
:class:`Router` to pick a healthy endpoint of another service; failover code uses
:class:`FailoverConsumer` (and :class:`Action`). Everything else is for the workers and the CLI.
"""

from __future__ import annotations

from hbbus.client import Heartbeater, SyncHeartbeater
from hbbus.errors import (
    ActionFailed,
    ConfigError,
    HbbusError,
    InvalidMessage,
    NotFound,
    PermanentFailure,
    SkipBeat,
    Unavailable,
)
from hbbus.failover import Action, FailoverConsumer, RetryPolicy
from hbbus.routing import Endpoint, NoRoute, Router
from hbbus.settings import Settings
from hbbus.wire import Event, Heartbeat

__version__ = "0.1.0"

__all__ = [
    "Action",
    "ActionFailed",
    "ConfigError",
    "Endpoint",
    "Event",
    "FailoverConsumer",
    "HbbusError",
    "Heartbeat",
    "Heartbeater",
    "InvalidMessage",
    "NoRoute",
    "NotFound",
    "PermanentFailure",
    "RetryPolicy",
    "Router",
    "Settings",
    "SkipBeat",
    "SyncHeartbeater",
    "Unavailable",
    "__version__",
]
