"""hbbus: a heartbeat bus on RabbitMQ and Redis.

Services use :class:`Heartbeater` (asyncio) or :class:`SyncHeartbeater` (a thread); failover
code uses :class:`FailoverConsumer`. Everything else is for the workers and the CLI.
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
    Unavailable,
)
from hbbus.failover import FailoverConsumer, RetryPolicy
from hbbus.settings import Settings
from hbbus.wire import Event, Heartbeat

__version__ = "0.1.0"

__all__ = [
    "ActionFailed",
    "ConfigError",
    "Event",
    "FailoverConsumer",
    "HbbusError",
    "Heartbeat",
    "Heartbeater",
    "InvalidMessage",
    "NotFound",
    "PermanentFailure",
    "RetryPolicy",
    "Settings",
    "SyncHeartbeater",
    "Unavailable",
    "__version__",
]
