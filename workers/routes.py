"""The routing action: keeps each service's routing table (hbbus.routing) from the events.

``joined``, ``recovered`` and ``restarted`` make an instance routable (from ``meta.endpoint``,
``meta.role``, ``meta.weight``, ``meta.load``); ``dead`` and ``left`` take it out. Every change
of a table is announced by a ``routes`` event, which :class:`hbbus.routing.Router` follows.
On start it reconciles the tables with the instances the store knows, so a routing worker
started after its services is right from its first second.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import orjson

from hbbus.failover import Action, FailoverConsumer
from hbbus.routing import Change, RoutingTable
from hbbus.store import Store
from hbbus.wire import Event

log = logging.getLogger("hbbus.routes")

UP_KINDS = frozenset({"joined", "recovered", "restarted"})
DOWN_KINDS = frozenset({"dead", "left"})
#: the lifecycle kinds routing-like actions follow (routes, haproxy, redis-promote)
LIFECYCLE_KINDS = tuple(sorted(UP_KINDS | DOWN_KINDS))
DEFAULT_BINDINGS = tuple(f"{kind}.*.*" for kind in LIFECYCLE_KINDS)


class RoutesAction(Action):
    """Keep the routing tables of ``services`` (every service when empty)."""

    type: ClassVar[str] = "routes"
    kinds: ClassVar[frozenset[str]] = UP_KINDS | DOWN_KINDS

    def __init__(self, services: tuple[str, ...] = ()) -> None:
        self.services = services
        self._consumer: FailoverConsumer | None = None
        self._table: RoutingTable | None = None

    @property
    def table(self) -> RoutingTable:
        assert self._table is not None, "the action has not started"
        return self._table

    async def start(self, consumer: FailoverConsumer) -> None:
        self._consumer = consumer
        self._table = RoutingTable(consumer.redis, consumer.names)
        await self.reconcile()

    async def apply(self, event: Event) -> tuple[Change | None, str]:
        """Apply one event to its service's table: (the change, what was done)."""
        if event.kind in DOWN_KINDS:
            removed = await self.table.remove(event.service, event.instance, event.kind)
            return removed, f"{event.instance} out of {event.service} routes ({event.kind})"
        change = await self.table.upsert(event)
        if change is None:
            return None, f"{event.instance} has no meta.endpoint: not routed"
        entry = (await self.table.read(event.service)).entries.get(event.instance)
        if entry is not None and entry.fenced:
            return change, f"{event.instance} fenced: {entry.reason}"
        return change, f"{event.instance} routable in {event.service} ({entry and entry.endpoint})"

    async def announce(self, service: str, instance: str, change: Change | None, what: str) -> None:
        """Publish the table's version (also unchanged: a retry after a failed publish must
        still move the routers; the event id is the version, so copies are one event)."""
        if change is not None:
            assert self._consumer is not None
            routes = self.table.change_event(service, instance, change, what)
            await self._consumer.publish(routes)

    async def handle(self, event: Event) -> object:
        if self.services and event.service not in self.services:
            return "not a routed service"
        change, what = await self.apply(event)
        await self.announce(event.service, event.instance, change, what)
        return what

    async def reconcile(self) -> None:
        """Apply every known instance's current state (of ``services``) to the routing
        tables, as if its last published transition were handled now: a routing worker
        started after its services is right from its first second. ``pub`` is the state
        failover was told (common.lua): a death kept quiet stays out of routing too."""
        assert self._consumer is not None
        store = Store(self._consumer.redis, self._consumer.names)
        changed = 0
        for record in await store.records():
            event = _event_of(record)
            if event is None or (self.services and event.service not in self.services):
                continue
            state = record.get("state")
            change: Change | None
            if state == "left" or record.get("pub") == "dead":
                # the reason failover was told ("dead" also while a muted recovery is alive)
                reason = "left" if state == "left" else "dead"
                change = await self.table.remove(event.service, event.instance, reason)
            elif state in ("alive", "suspect"):
                change = await self.table.upsert(event)
            else:  # a death that was not published (maintenance, the guard, flap damping):
                continue  # failover was not told, so routing is not changed either
            if change is not None and change.changed:
                changed += 1
                await self.announce(event.service, event.instance, change, "reconciled")
        log.info("routes: reconciled with the store ◆ %d entries changed", changed)


def _event_of(record: dict[str, Any]) -> Event | None:
    """A record as the event that would have announced its current state."""
    try:
        meta = orjson.loads(record.get("meta") or "{}")
        return Event(
            id="",
            kind="joined",
            service=str(record["svc"]),
            instance=str(record["inst"]),
            incarnation=str(record.get("inc", "")),
            seq=int(record.get("seq") or 0),
            ord=int(record.get("ord") or 0),
            at_ms=0,
            last_seen_ms=0,
            ttl_ms=0,
            prev="",
            meta=meta if isinstance(meta, dict) else {},
        )
    except (KeyError, ValueError, orjson.JSONDecodeError):
        return None
