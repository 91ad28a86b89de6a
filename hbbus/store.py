"""The Redis side: instance records, alive keys with TTL, the deadline index, the outbox and
the transition log, all changed only by the Lua scripts in ``hbbus/lua``.

Key layout (``P`` = ``{<ns>}:``, see :mod:`hbbus.names`):

- ``P inst:<svc>/<inst>``  hash, the instance record
- ``P meta:<svc>/<inst>``  string, the instance's latest meta (JSON; kept out of the record,
  which then stays a compact listpack)
- ``P alive:<svc>/<inst>`` string with a TTL; exists exactly while the instance is alive
- ``P history:<svc>/<inst>`` string, the instance's last transitions, one line each (newest
  first, see :func:`history_event`)
- ``P instances``          set of known ``svc/inst``
- ``P deadlines``          sorted set: ``svc/inst`` -> the time of its next transition (ms)
- ``P outbox``             sorted set of unpublished event ids, oldest first; with
  ``P outbox:body`` (id -> instance, routing key, JSON), ``P outbox:lease`` (id -> lease end)
  and ``P outbox:pending`` (instance -> number of its unpublished events)
- ``P log``                capped stream of every transition (the history)
- ``P stats``              hash of counters
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hbbus.detect import DetectorConfig
from hbbus.errors import Unavailable
from hbbus.names import Names
from hbbus.settings import NAME_RE, Settings, redact
from hbbus.wire import WIRE_VERSION, Heartbeat

_LUA = Path(__file__).with_name("lua")


def _script(name: str) -> str:
    return (_LUA / "common.lua").read_text() + "\n" + (_LUA / name).read_text()


@dataclass(frozen=True)
class StoreConfig:
    """Timing of the store. ``lease_ms``: how long a claimed event may stay unpublished before
    another reaper publishes it; ``retention_ms``: how long a dead or left record is kept;
    the observer settings: see DESIGN.md section 6.3 and the README."""

    lease_ms: int = 5_000
    retention_ms: int = 24 * 3600 * 1000
    log_maxlen: int = 10_000
    history_len: int = 20
    #: an aggregator not heard from for this long no longer holds the watermark back
    observer_ttl_ms: int = 1_000
    #: the watermark lagging more than this makes the observer degraded
    degraded_after_ms: int = 2_000
    #: after the observer recovers, instances not heard since get max(ttl, grace) more
    grace_ms: int = 6_000
    #: after Redis lost its data, `joined` events are marked as a resync for this long
    resync_ms: int = 60_000
    #: the mass-expiry guard trips when more than this share of a service's (or zone's)
    #: instances fail within the window, and at least ``mass_min`` of them
    mass_share: float = 0.5
    mass_min: int = 3
    mass_window_ms: int = 30_000
    #: held deaths are released only by `hbbus guard release`, unless this is set: then one
    #: every ``release_every_ms`` once they have been held this long
    release_after_ms: int = 0
    release_every_ms: int = 1_000
    #: flapping: more than ``flap_max`` dead/recovered changes within ``flap_window_ms``;
    #: damped until there has been none for ``flap_stable_ms``
    flap_max: int = 2
    flap_window_ms: int = 60_000
    flap_stable_ms: int = 30_000


@dataclass(frozen=True, slots=True)
class OutEvent:
    """An event claimed for publishing: its id, routing key and JSON body."""

    id: str
    routing_key: str
    body: str


@dataclass(frozen=True)
class ClaimResult:
    now_ms: int
    next_due_ms: int | None
    events: list[OutEvent]
    #: when ``next_due_ms`` is already past (it waits for the watermark): the first deadline
    #: after ``now_ms``, if any
    upcoming_ms: int | None = None


def _events(flat: Sequence[Any]) -> list[OutEvent]:
    return [OutEvent(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]


def zone_of(beat: Heartbeat) -> str:
    """``meta.zone`` when it is a valid name (it becomes part of keys and routing keys)."""
    zone = beat.meta.get("zone")
    return zone if isinstance(zone, str) and NAME_RE.fullmatch(zone) else ""


def history_event(service: str, instance: str, line: str) -> dict[str, Any]:
    """One line of an instance's history (common.lua, ``emit``) as its event's fields."""
    evid, kind, prev, inc, seq, ord_, at, last, ttl, flags = line.split(" ")
    event: dict[str, Any] = {
        "v": WIRE_VERSION,
        "id": evid,
        "kind": kind,
        "service": service,
        "instance": instance,
        "incarnation": inc,
        "seq": int(seq),
        "ord": int(ord_),
        "at_ms": int(at),
        "last_seen_ms": int(last),
        "ttl_ms": int(ttl),
        "prev": prev,
    }
    for flag in flags.split(","):
        if flag == "r":
            event["resync"] = True
        elif flag == "m":
            event["muted"] = True
        elif flag.startswith("h"):
            event["held"] = flag[1:]
    return event


def ingest_arg(beat: Heartbeat, interval_ms: int, ttl_ms: int) -> bytes:
    """One heartbeat as ingest.lua reads it: one argument, tab-separated, meta last."""
    head = (
        f"{beat.service}\t{beat.instance}\t{beat.incarnation}\t{beat.seq}\t{interval_ms}\t"
        f"{ttl_ms}\t{beat.status}\t{zone_of(beat)}\t"
    )
    return head.encode() + orjson.dumps(beat.meta)


def connect_redis(settings: Settings, name: str = "hbbus") -> aioredis.Redis:
    """A Redis client for ``settings`` (no I/O yet)."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        client_name=name,
        socket_connect_timeout=5,
        socket_timeout=10,
        health_check_interval=15,
    )


class Store:
    """Typed access to the Redis state of one namespace."""

    def __init__(self, redis: aioredis.Redis, names: Names, config: StoreConfig | None = None):
        self.redis = redis
        self.names = names
        self.config = config or StoreConfig()
        self._ingest = redis.register_script(_script("ingest.lua"))
        self._claim = redis.register_script(_script("claim.lua"))
        self._finalize = redis.register_script(_script("finalize.lua"))
        self._release = redis.register_script(_script("release.lua"))
        self.epoch = ""  # the store epoch this client saw last (see ingest.lua)
        c = self.config
        self._keys = [
            names.deadlines_key,
            names.instances_key,
            names.outbox_key,
            names.outbox_body_key,
            names.outbox_lease_key,
            names.outbox_pending_key,
            names.log_key,
            names.observers_key,
            names.observer_key,
            names.maintenance_key,
            names.guard_key,
            names.flapcheck_key,
            names.detectors_key,
        ]
        self._common: list[Any] = [
            names.key_prefix,
            c.lease_ms,
            c.retention_ms,
            c.log_maxlen,
            c.history_len,
            c.observer_ttl_ms,
            c.degraded_after_ms,
            c.grace_ms,
            c.mass_share,
            c.mass_min,
            c.mass_window_ms,
            c.release_after_ms,
            c.release_every_ms,
            c.flap_max,
            c.flap_window_ms,
            c.flap_stable_ms,
        ]

    @classmethod
    def from_settings(
        cls, settings: Settings, config: StoreConfig | None = None, client_name: str = "hbbus"
    ) -> Store:
        return cls(connect_redis(settings, client_name), Names(settings.namespace), config)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self, url: str = "") -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis at {redact(url)}: {exc}") from None

    # -- the hot path ------------------------------------------------------------------------
    async def ingest(
        self,
        beats: Sequence[tuple[Heartbeat, int, int]],
        aggregator: str = "",
        probe_ms: int = 0,
    ) -> tuple[int, list[OutEvent]]:
        """Apply heartbeats, each with its clamped ``(interval_ms, ttl_ms)``, in one Lua call,
        and record that ``aggregator`` has applied everything it was handed before the probe
        stamped ``probe_ms`` (0: no probe in this batch; a first call registers it; no
        ``aggregator``: a tool, not an observer).

        Returns the number of stale heartbeats ignored and the events of the transitions made.
        """
        args: list[Any] = [*self._common, aggregator, probe_ms, len(beats)]
        args += [ingest_arg(beat, interval_ms, ttl_ms) for beat, interval_ms, ttl_ms in beats]
        args += (self.epoch, secrets.token_hex(8), self.config.resync_ms)
        reply = await self._ingest(keys=self._keys, args=args)
        self.epoch = reply[1]
        return int(reply[0]), _events(reply[2:])

    async def claim(self, limit: int = 1000, aggregator: str = "") -> ClaimResult:
        """Claim due transitions and expired outbox leases (the reaper's step); ``aggregator``
        is the caller, alive even while its ingest waits."""
        reply = await self._claim(keys=self._keys, args=[*self._common, limit, aggregator])
        nxt, upcoming = int(reply[1]), int(reply[2])
        return ClaimResult(
            int(reply[0]),
            nxt if nxt >= 0 else None,
            _events(reply[3:]),
            upcoming if upcoming >= 0 else None,
        )

    async def finalize(self, event_ids: Iterable[str]) -> int:
        """Drop published (confirmed) events from the outbox. Returns how many of them have a
        later event of their instance waiting (a reaper may hand it out now)."""
        ids = list(event_ids)
        if not ids:
            return 0
        return int(await self._finalize(keys=self._keys, args=[*self._common, *ids]))

    async def release_events(self, event_ids: Iterable[str]) -> None:
        """Give back events that could not be published: a reaper retries them at once."""
        ids = list(event_ids)
        if ids:
            await self._finalize(keys=self._keys, args=[*self._common, "release", *ids])

    async def unregister(self, aggregator: str) -> None:
        """An aggregator that stops cleanly no longer holds the watermark back."""
        await self.redis.hdel(self.names.observers_key, aggregator)

    async def observer(self) -> dict[str, Any]:
        """The observer's health: state, since, reason, watermark lag, live aggregators."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.names.observer_key)
            pipe.hgetall(self.names.observers_key)
            pipe.time()
            state, entries, (sec, usec) = await pipe.execute()
        now_ms = int(sec) * 1000 + int(usec) // 1000
        aggregators = {}
        for name, value in entries.items():
            probe_ms, seen_ms = (int(x) for x in value.split())
            aggregators[name] = {
                "behind_ms": now_ms - probe_ms if probe_ms else None,
                "seen_ms_ago": now_ms - seen_ms,
            }
        last_wm = int(state.get("last_wm", now_ms))
        return {
            "state": state.get("state", "ok"),
            "since_ms": int(state.get("since", 0)),
            "reason": state.get("reason", ""),
            "lag_ms": now_ms - last_wm,
            "now_ms": now_ms,
            "aggregators": aggregators,
        }

    # -- the mass-expiry guard --------------------------------------------------------------
    async def release(self, scopes: Sequence[str] = ()) -> tuple[int, list[str]]:
        """Publish the deaths held by these scopes (all tripped scopes if none); returns how
        many and which scopes were released. A reaper publishes the events."""
        reply = await self._release(keys=self._keys, args=[*self._common, *scopes])
        return int(reply[0]), list(reply[1:])

    async def guard(self) -> list[dict[str, Any]]:
        """Tripped scopes: since when, and the deaths they hold."""
        now_ms = await self.time_ms()
        raw: dict[str, str] = await self.redis.hgetall(self.names.guard_key)  # type: ignore[assignment]
        out = []
        for scope, value in sorted(raw.items()):
            tripped_ms = int(value.split()[0])
            held = await self.redis.zrange(self.names.held_key(scope), 0, -1)
            out.append({"scope": scope, "tripped_ms_ago": now_ms - tripped_ms, "held": held})
        return out

    # -- adaptive detectors ------------------------------------------------------------------
    async def detector_set(self, service: str, config: DetectorConfig) -> None:
        await self.redis.hset(self.names.detectors_key, service, config.encode())

    async def detector_off(self, service: str) -> bool:
        return bool(await self.redis.hdel(self.names.detectors_key, service))

    async def detectors(self) -> dict[str, DetectorConfig]:
        raw: dict[str, str] = await self.redis.hgetall(self.names.detectors_key)  # type: ignore[assignment]
        return {svc: DetectorConfig.decode(v) for svc, v in sorted(raw.items())}

    # -- maintenance -------------------------------------------------------------------------
    async def maintenance_on(self, target: str, duration_ms: int, reason: str) -> int:
        """Quiet `suspect`/`dead` for a service or service/instance until now + duration;
        returns the end (Redis time, ms)."""
        until_ms = await self.time_ms() + duration_ms
        await self.redis.hset(self.names.maintenance_key, target, f"{until_ms} {reason}")
        return until_ms

    async def maintenance_off(self, target: str) -> bool:
        """End a window early: deaths it kept quiet are announced by the next reaper step."""
        ended = bool(await self.redis.hdel(self.names.maintenance_key, target))
        now_ms = await self.time_ms()
        quiet = [
            r
            for r in await self.records()
            if r.get("muted") == "1" and target in (r["svc"], f"{r['svc']}/{r['inst']}")
        ]
        if quiet:
            await self.redis.zadd(
                self.names.deadlines_key, {f"{r['svc']}/{r['inst']}": now_ms for r in quiet}
            )
        return ended

    async def maintenance(self) -> list[dict[str, Any]]:
        """The windows still open; expired ones are removed."""
        now_ms = await self.time_ms()
        raw: dict[str, str] = await self.redis.hgetall(self.names.maintenance_key)  # type: ignore[assignment]
        windows, expired = [], []
        for target, value in sorted(raw.items()):
            until_s, _, reason = value.partition(" ")
            if int(until_s) <= now_ms:
                expired.append(target)
            else:
                windows.append(
                    {
                        "target": target,
                        "until_ms": int(until_s),
                        "left_ms": int(until_s) - now_ms,
                        "reason": reason,
                    }
                )
        if expired:
            await self.redis.hdel(self.names.maintenance_key, *expired)
        return windows

    # -- counters ----------------------------------------------------------------------------
    async def count(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, n in counts.items():
                pipe.hincrby(self.names.stats_key, name, n)
            await pipe.execute()

    async def stats(self) -> dict[str, int]:
        raw: dict[str, str] = await self.redis.hgetall(self.names.stats_key)  # type: ignore[assignment]
        return {k: int(v) for k, v in raw.items()}

    # -- reading, for operators ----------------------------------------------------------------
    async def time_ms(self) -> int:
        sec, usec = await self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def records(self) -> list[dict[str, str]]:
        """Every known instance record, sorted by service and instance."""
        ids: list[str] = sorted(await self.redis.smembers(self.names.instances_key))  # type: ignore[arg-type]
        async with self.redis.pipeline(transaction=False) as pipe:
            for iid in ids:
                pipe.hgetall(self.names.key_prefix + "inst:" + iid)
                pipe.get(self.names.key_prefix + "meta:" + iid)
            replies = await pipe.execute()
        return [
            {**row, "meta": meta or row.get("meta") or "{}"}
            for row, meta in zip(replies[::2], replies[1::2], strict=True)
            if row
        ]

    async def record(self, service: str, instance: str) -> dict[str, str] | None:
        """The instance's record, with its meta (JSON) as ``meta``."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.names.record_key(service, instance))
            pipe.get(self.names.meta_key(service, instance))
            row, meta = await pipe.execute()
        return {**row, "meta": meta or row.get("meta") or "{}"} if row else None

    async def history(self, service: str, instance: str, count: int = 20) -> list[dict[str, Any]]:
        """The instance's latest transitions, newest first: each as its event was published,
        without the meta (the log keeps whole events; the history keeps one line each)."""
        raw: str | None = await self.redis.get(self.names.history_key(service, instance))  # type: ignore[assignment]
        lines = raw.split("\n")[:count] if raw else []
        return [history_event(service, instance, line) for line in lines]

    async def recent_events(self, count: int = 50) -> list[dict[str, Any]]:
        """The latest transitions of the whole namespace, oldest first."""
        entries: list[Any] = await self.redis.xrevrange(self.names.log_key, count=count)  # type: ignore[assignment]
        return [orjson.loads(fields["e"]) for _, fields in reversed(entries)]

    async def pending_events(self) -> int:
        return int(await self.redis.zcard(self.names.outbox_key))

    async def forget(self, service: str, instance: str) -> bool:
        """Remove every trace of one instance. Returns whether it was known."""
        iid = f"{service}/{instance}"
        n = self.names
        fields: list[str | None] = await self.redis.hmget(  # type: ignore[assignment]
            n.record_key(service, instance), "zone", "held"
        )
        zone, held = fields
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(n.record_key(service, instance), n.meta_key(service, instance))
            pipe.delete(n.alive_key(service, instance), n.history_key(service, instance))
            pipe.delete(f"{n.key_prefix}hist:{iid}")  # the history list of the earlier layout
            pipe.zrem(n.deadlines_key, iid)
            pipe.zrem(n.flapcheck_key, iid)
            pipe.srem(n.instances_key, iid)
            pipe.zrem(n.notalive_key, iid)
            pipe.srem(n.service_members_key(service), iid)
            if zone:
                pipe.srem(f"{n.key_prefix}zone:{zone}", iid)
            if held:
                pipe.zrem(n.held_key(held), iid)
            existed, *_ = await pipe.execute()
        return bool(existed)

    async def drop_namespace(self) -> int:
        """Delete every key of this namespace (tests and the demo clean up with it)."""
        pattern = self.names.key_prefix.replace("{", "\\{").replace("}", "\\}") + "*"
        deleted, batch = 0, []
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:  # one call per thousand keys, not one per key
                deleted += await self.redis.unlink(*batch)
                batch = []
        if batch:
            deleted += await self.redis.unlink(*batch)
        return deleted
