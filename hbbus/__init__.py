"""hbbus: a heartbeat bus on RabbitMQ and Redis."""

from __future__ import annotations

__version__ = "0.1.0"
