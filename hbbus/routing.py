"""Routing tables, and :class:`Router`, the client-side rerouting a calling service uses.

A service's routing table lives in Redis (``{ns}:routes:<service>``): one entry per instance
that announced ``meta.endpoint``, with its ``role`` (``primary``/``replica``), ``weight``,
``load``, whether it is ``routable`` and whether it is ``fenced``. Failover actions keep it
(:class:`RoutingTable`); every change bumps the table's ``version`` and is announced by a
``routes`` event, which every :class:`Router` of that service listens to — so a router re-reads
the table once per change, never per request.

The table also holds the service's fencing ``epoch`` and its ``primary``: at most one entry
is a routable primary, and an instance that claims to be primary while another one is (an old
primary back from the dead) stays fenced until a promotion action has made it a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from redis.asyncio import Redis
from redis.exceptions import RedisError

from hbbus.amqp import AMQP_ERRORS, connect, declare_events
from hbbus.errors import ConfigError, HbbusError, Unavailable
from hbbus.names import Names
from hbbus.runtime import cancel_and_wait
from hbbus.settings import Settings, check_name
from hbbus.store import Store, connect_redis
from hbbus.wire import Event, new_event

log = logging.getLogger("hbbus.routing")

STRATEGIES = ("round_robin", "least_load")
_ROLES = {"master": "primary", "primary": "primary", "slave": "replica", "replica": "replica"}


class NoRoute(HbbusError):
    """Raised when a router has no routable endpoint for what was asked."""


def normalise_role(value: object) -> str:
    """``meta.role`` as the table stores it: primary, replica, or "" (no role)."""
    return _ROLES.get(str(value).lower(), "") if value is not None else ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance's entry in a routing table."""

    instance: str
    endpoint: str
    role: str = ""
    weight: int = 1
    load: float | None = None
    routable: bool = True
    fenced: bool = False
    reason: str = ""
    since_ms: int = 0

    @classmethod
    def from_json(cls, instance: str, raw: str | bytes) -> Endpoint:
        doc = orjson.loads(raw)
        load = doc.get("load")
        return cls(
            instance=instance,
            endpoint=str(doc.get("endpoint", "")),
            role=str(doc.get("role", "")),
            weight=max(int(doc.get("weight") or 1), 1),
            load=float(load) if isinstance(load, int | float) else None,
            routable=doc.get("routable") is True,
            fenced=doc.get("fenced") is True,
            reason=str(doc.get("reason", "")),
            since_ms=int(doc.get("since_ms") or 0),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "endpoint": self.endpoint,
            "role": self.role,
            "weight": self.weight,
            "load": self.load,
            "routable": self.routable,
            "fenced": self.fenced,
            "reason": self.reason,
            "since_ms": self.since_ms,
        }


@dataclass(frozen=True)
class Table:
    """A snapshot of one service's routing table."""

    service: str
    version: int = 0
    epoch: int = 0
    primary: str = ""
    entries: dict[str, Endpoint] = field(default_factory=dict)

    def routable(self, role: str | None = None) -> list[Endpoint]:
        return [
            e
            for _, e in sorted(self.entries.items())
            if e.routable and (role is None or e.role == role)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "version": self.version,
            "epoch": self.epoch,
            "primary": self.primary,
            "endpoints": [e.to_dict() for _, e in sorted(self.entries.items())],
        }


@dataclass(frozen=True)
class Change:
    """What a table operation did: whether routers must look again, and the table's state."""

    changed: bool
    version: int
    epoch: int
    primary: str


def _endpoint_fields(meta: dict[str, Any]) -> tuple[str, str, int, str] | None:
    endpoint = meta.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        return None
    weight = meta.get("weight", 1)
    weight = weight if isinstance(weight, int) and weight > 0 else 1
    load = meta.get("load")
    load_text = repr(float(load)) if isinstance(load, int | float) else ""
    return endpoint, normalise_role(meta.get("role")), weight, load_text


class RoutingTable:
    """The Redis side of the routing tables of one namespace (used by failover actions)."""

    def __init__(self, redis: Redis, names: Names) -> None:
        self.redis = redis
        self.names = names
        source = resources.files("hbbus").joinpath("lua/routes.lua").read_text()
        self._script = redis.register_script(source)

    async def _run(self, op: str, service: str, instance: str, *args: Any) -> list[Any]:
        n = self.names
        keys = [
            n.routes_key(service),
            n.routes_state_key(service),
            n.promotion_key(service),
            n.routed_services_key,
            n.bucket_key(service, instance),
            n.alive_key(service, instance),
        ]
        out: Any = await self._script(keys=keys, args=[op, service, instance, *args])
        if not isinstance(out, list):
            out = [out]
        return [x.decode() if isinstance(x, bytes) else x for x in out]

    @staticmethod
    def _change(out: list[Any]) -> Change:
        return Change(bool(out[0]), int(out[1]), int(out[2]), str(out[3]))

    async def upsert(self, event: Event) -> Change | None:
        """Make ``event``'s instance routable from its meta; None when it has no endpoint."""
        fields = _endpoint_fields(event.meta)
        if fields is None:
            return None
        endpoint, role, weight, load = fields
        out = await self._run(
            "upsert", event.service, event.instance, endpoint, role, weight, load, event.ord
        )
        return self._change(out)

    async def remove(self, service: str, instance: str, why: str) -> Change:
        """Take an instance out of routing (its entry stays, with the reason)."""
        return self._change(await self._run("remove", service, instance, why))

    async def fence(self, service: str, instance: str, why: str) -> Change:
        """Keep an instance out of routing, whatever it announces, until :meth:`unfence`."""
        return self._change(await self._run("fence", service, instance, why))

    async def unfence(self, service: str, instance: str, ord_: int) -> Change:
        """An instance has been made a replica of the primary: routable again, as a replica."""
        return self._change(await self._run("unfence", service, instance, ord_))

    async def begin_promotion(
        self, service: str, dead: str, owner: str, lease_ms: int
    ) -> tuple[str, int, str, str]:
        """Take the promotion lock for ``dead``: (verdict, epoch, old primary, candidate)."""
        out = await self._run("begin", service, dead, owner, lease_ms)
        return str(out[0]), int(out[1]), str(out[2]), str(out[3])

    async def promotion_step(
        self,
        service: str,
        epoch: int,
        owner: str,
        lease_ms: int,
        name: str = "",
        value: str = "",
    ) -> bool:
        """Renew the lock (and record a step); False when the lock is no longer ours."""
        out = await self._run("step", service, "", epoch, owner, lease_ms, name, value)
        return bool(out[0])

    async def commit_promotion(
        self, service: str, epoch: int, owner: str, candidate: str, old: str
    ) -> Change | None:
        """Make ``candidate`` the primary of ``epoch``; None when the lock is no longer ours."""
        out = await self._run("commit", service, candidate, epoch, owner, old)
        return self._change(out) if out[0] else None

    async def abort_promotion(self, service: str, old: str, epoch: int, owner: str) -> None:
        """Give the lock up without a promotion: ``old`` stays the primary, routable again if
        it came back meanwhile and is alive."""
        await self._run("abort", service, old, epoch, owner)

    async def promotion(self, service: str) -> dict[str, str]:
        raw: dict[bytes | str, bytes | str] = await self.redis.hgetall(  # type: ignore[misc]
            self.names.promotion_key(service)
        )
        return {_text(k): _text(v) for k, v in raw.items()}

    async def read(self, service: str) -> Table:
        return await read_table(self.redis, self.names, service)

    async def services(self) -> list[str]:
        members = await self.redis.smembers(self.names.routed_services_key)  # type: ignore[misc]
        return sorted(_text(m) for m in members)

    def change_event(self, service: str, instance: str, change: Change, what: str) -> Event:
        """The ``routes`` event that tells routers to look again."""
        return new_event(
            "routes",
            service,
            instance,
            key=f"{service}|{change.version}",
            at_ms=int(time.time() * 1000),
            data={
                "version": change.version,
                "epoch": change.epoch,
                "primary": change.primary,
                "change": what,
            },
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def read_table(redis: Redis, names: Names, service: str) -> Table:
    """One consistent read of a service's table (a MULTI of two reads)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(names.routes_key(service))
        pipe.hmget(names.routes_state_key(service), "version", "epoch", "primary")
        raw, state = await pipe.execute()
    entries = {_text(k): Endpoint.from_json(_text(k), v) for k, v in raw.items()}
    version, epoch, primary = (_text(x) if x is not None else "" for x in state)
    return Table(service, int(version or 0), int(epoch or 0), primary, entries)


class Router:
    """Pick a healthy endpoint of ``service`` — round robin (weighted by ``meta.weight``) or
    least load (``meta.load``) — from a copy of its routing table held in memory.

    The copy is re-read when a ``routes`` event of the service arrives, every ``refresh_s``
    as a safety net, and after a reconnect; :meth:`pick` and :meth:`primary` never touch the
    network::

        async with Router("db", settings=settings) as router:
            endpoint = router.primary().endpoint
    """

    def __init__(
        self,
        service: str,
        *,
        settings: Settings | None = None,
        strategy: str = "round_robin",
        refresh_s: float = 10.0,
    ) -> None:
        self.service = check_name(service, "service")
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        if not refresh_s > 0:
            raise ConfigError("refresh_s must be positive")
        self.settings = settings or Settings.from_env()
        self.names = Names(self.settings.namespace)
        self.strategy = strategy
        self.refresh_s = refresh_s
        self.table = Table(self.service)
        self.refreshes = 0
        self._current: dict[str, int] = {}  # smooth weighted round robin
        self._changed = asyncio.Condition()
        self._dirty = asyncio.Event()
        self._redis: Redis | None = None
        self._connection: AbstractRobustConnection | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to the service's ``routes`` events, then read the table (no gap)."""
        self._redis = connect_redis(self.settings, f"hbbus-router-{self.service}")
        try:
            self._connection = await connect(self.settings, f"hbbus-router {self.service}")
            channel = await self._connection.channel()
            exchange = await declare_events(channel, self.names)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange, f"routes.{self.service}.*")
            await queue.consume(self._on_message, no_ack=True)
            self._connection.reconnect_callbacks.add(self._on_reconnect)
            await self.refresh()
        except (RedisError, OSError) as exc:
            await self.close()
            raise Unavailable(f"routing table of {self.service!r} unreadable: {exc}") from None
        except BaseException:
            await self.close()
            raise
        self._task = asyncio.create_task(self._refresher(), name=f"hbbus-router-{self.service}")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._connection is not None:
            with contextlib.suppress(*AMQP_ERRORS):
                await self._connection.close()
            self._connection = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- refreshing ---------------------------------------------------------------------------
    async def refresh(self) -> Table:
        """Read the table now (also the loads the instances report in their heartbeats)."""
        assert self._redis is not None
        table = await read_table(self._redis, self.names, self.service)
        table = await self._with_loads(table)
        async with self._changed:
            if table.version != self.table.version:
                self._current = {}
            self.table = table
            self.refreshes += 1
            self._changed.notify_all()
        return table

    async def _with_loads(self, table: Table) -> Table:
        if self.strategy != "least_load" or not table.entries:
            return table
        assert self._redis is not None
        instances = sorted(table.entries)
        records = await Store(self._redis, self.names).records_of(self.service, instances)
        metas = [record["meta"] if record else None for record in records]
        entries = dict(table.entries)
        for instance, raw in zip(instances, metas, strict=True):
            load = _load_of(raw)
            if load is not None:
                entry = entries[instance]
                entries[instance] = Endpoint(**{**entry.to_dict(), "load": load})
        return Table(table.service, table.version, table.epoch, table.primary, entries)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._dirty.set()

    def _on_reconnect(self, *args: object) -> None:
        self._dirty.set()  # events may have passed while the queue was gone

    async def _refresher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_s):
                    await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                log.warning("router %s: table unreadable (%s); keeping the last copy", self, exc)
                await asyncio.sleep(min(1.0, self.refresh_s))
                self._dirty.set()

    def __repr__(self) -> str:
        return f"Router({self.service}, v{self.table.version}, epoch {self.table.epoch})"

    async def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        """Wait until ``predicate(table)`` holds (after a refresh); False on timeout."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: bool(predicate(self.table)))
        except TimeoutError:
            return False
        return True

    # -- picking (no I/O) ---------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.table.epoch

    def endpoints(self, role: str | None = None) -> list[Endpoint]:
        return self.table.routable(role)

    def primary(self) -> Endpoint:
        """The service's primary, if it is routable; NoRoute otherwise (e.g. mid-failover)."""
        entry = self.table.entries.get(self.table.primary)
        if entry is None or not entry.routable or entry.role != "primary":
            raise NoRoute(f"{self.service} has no routable primary (epoch {self.table.epoch})")
        return entry

    def pick(self, role: str | None = None) -> Endpoint:
        """One routable endpoint (of ``role``, if given) by the router's strategy."""
        candidates = self.endpoints(role)
        if not candidates:
            what = f"{role} " if role else ""
            raise NoRoute(f"{self.service} has no routable {what}endpoint")
        if self.strategy == "least_load":
            return self._least_load(candidates)
        return self._weighted_round_robin(candidates)

    def _weighted_round_robin(self, candidates: list[Endpoint]) -> Endpoint:
        """Smooth weighted round robin: each pick adds every weight to its counter, takes the
        largest and subtracts the total from it (spreads picks evenly, in proportion)."""
        total = 0
        best: Endpoint | None = None
        for entry in candidates:
            total += entry.weight
            current = self._current.get(entry.instance, 0) + entry.weight
            self._current[entry.instance] = current
            if best is None or current > self._current[best.instance]:
                best = entry
        assert best is not None
        self._current[best.instance] -= total
        return best

    def _least_load(self, candidates: list[Endpoint]) -> Endpoint:
        def score(entry: Endpoint) -> float:
            return (entry.load or 0.0) / entry.weight

        lowest = min(score(e) for e in candidates)
        return self._weighted_round_robin([e for e in candidates if score(e) == lowest])


def _load_of(raw: bytes | str | None) -> float | None:
    if raw is None:
        return None
    try:
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    load = meta.get("load") if isinstance(meta, dict) else None
    return float(load) if isinstance(load, int | float) else None
