"""One exception tree for hbbus. Every class says when it is raised."""

from __future__ import annotations


class HbbusError(Exception):
    """Base of every error hbbus raises on purpose."""


class ConfigError(HbbusError):
    """Raised when a setting or argument is invalid (bad URL scheme, bad name, bad number)."""


class InvalidMessage(HbbusError):
    """Raised when a heartbeat or event on the wire cannot be accepted.

    ``reason`` is a short, bounded code (used as a metric label and a header);
    the message text is the human explanation.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Unavailable(HbbusError):
    """Raised when RabbitMQ or Redis cannot be reached or answers with an error."""


class DeliveryFailed(Unavailable):
    """Raised when the broker did not accept or could not route a message hbbus must not lose."""


class NotFound(HbbusError):
    """Raised when an operator names an instance, group or queue that does not exist."""


class ActionFailed(HbbusError):
    """Raised by a failover handler (or the exec action) to ask for a retry."""


class PermanentFailure(ActionFailed):
    """Raised by a failover handler when retrying cannot help: the event goes to the DLQ."""


class SkipBeat(HbbusError):
    """Raised by a heartbeater's meta callable to say that what the heartbeat vouches for is
    not well (a sidecar's Redis does not answer): this beat is not sent."""
