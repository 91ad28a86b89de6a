"""Prometheus metrics of the workers (served with ``--metrics-port``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

HEARTBEATS = Counter("hbbus_heartbeats_total", "Heartbeats applied to Redis")
STALE = Counter("hbbus_heartbeats_stale_total", "Duplicate or reordered heartbeats ignored")
INVALID = Counter("hbbus_heartbeats_invalid_total", "Heartbeats refused and parked", ["reason"])
EVENTS = Counter("hbbus_events_published_total", "Events published and confirmed", ["kind"])
PUBLISH_FAILURES = Counter("hbbus_event_publish_failures_total", "Event publishes not confirmed")
BATCH = Histogram(
    "hbbus_ingest_batch_size",
    "Heartbeats per ingest batch",
    buckets=(1, 5, 20, 50, 100, 200, 500, 1000, 2000),
)
HANDLED = Counter(
    "hbbus_failover_handled_total", "Failover events by outcome", ["group", "outcome"]
)


def serve(port: int, addr: str = "127.0.0.1") -> None:
    if port:
        start_http_server(port, addr=addr)
