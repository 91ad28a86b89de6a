"""The Redis side: instance records, the deadline index, the outbox and the transition log,
all changed only by the Lua scripts in ``hbbus/lua``.

Key layout (``P`` = ``{<ns>}:``, see :mod:`hbbus.names`):

- ``P r:<xyz>``            hash of the packed records of the instances whose ``svc/inst`` has
  a SHA-1 starting with the hex digits ``xyz`` (4,096 buckets): field ``svc/inst``, value the
  record's fields in the order :data:`RECORD_FIELDS`, joined by tabs, the meta (JSON) last.
  Alive is a state: ``alive`` or ``suspect`` with ``last + ttl`` still ahead.
- ``P history:<svc>/<inst>`` string, the instance's older transitions, one line each (newest
  first, see :func:`history_event`); the newest is the record's ``hist``
- ``P dl:<xyz>``           sorted set: the bucket's instances -> the time of their next
  transition (ms; every record has one: a transition, or its purge); ``P dlmin``: bucket ->
  a time at or before its earliest deadline (never after)
- ``P scopes``             hash: ``service:<svc>`` / ``zone:<zone>`` -> how many of its
  instances are alive or suspect (the mass-expiry guard's totals)
- ``P outbox``             sorted set of unpublished event ids, oldest first; with
  ``P outbox:body`` (id -> instance, routing key, JSON), ``P outbox:pending`` (instance ->
  number of its unpublished events), ``P outbox:due`` (each instance's oldest -> the end of
  its lease, 0 if it may be handed out now) and ``P outbox:wait:<svc>/<inst>`` (the events
  behind it, by ord)
- ``P log``                capped stream of every transition (the history)
- ``P stats``              hash of counters

The earlier layout (a hash ``P inst:<svc>/<inst>``, ``P meta:``, ``P alive:`` keys, the set
``P instances`` and one sorted set ``P deadlines``) is moved into the buckets a thousand records
per script call (see ``migrate_one`` in hbbus/lua/common.lua); until then :meth:`Store.records`
and :meth:`Store.record` read it where it is. An outbox of the release before ``outbox:due``
(leases in a hash ``P outbox:lease``) is indexed once, by the first script that touches it.
"""

from __future__ import annotations

import hashlib
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
from hbbus.settings import Settings, redact
from hbbus.wire import WIRE_VERSION, Heartbeat, valid_name

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


#: The fields of a packed record, in order (``RF`` in hbbus/lua/common.lua: keep them together).
RECORD_FIELDS = (
    "state",
    "inc",
    "seq",
    "last",
    "ttl",
    "ivl",
    "ord",
    "first",
    "since",
    "zone",
    "hist",
    "meta",
    "pinc",
    "dttl",
    "sus",
    "status",
    "pub",
    "muted",
    "held",
    "flips",
    "flapping",
    "gn",
    "gm",
    "gv",
    "gaps",
)
#: the fields up to the meta are always there; the empty ones after it are left out
_CORE = RECORD_FIELDS.index("meta") + 1


def decode_record(iid: str, packed: str) -> dict[str, str]:
    """A packed record as its fields (the empty ones left out), with ``svc`` and ``inst``.
    The inverse of ``rec_pack`` in hbbus/lua/common.lua: since is a distance back from last,
    first a distance back from since, ord one on from since; the newest history line's
    incarnation and ttl are "=" when they are the record's, its at_ms a distance back from
    since; no dttl means the ttl, no status "ok". Without since, last is the base."""
    values = packed.split("\t")
    if not _CORE <= len(values) <= len(RECORD_FIELDS):
        raise ValueError(f"unreadable record of {iid}: {len(values)} fields")
    row = {name: value for name, value in zip(RECORD_FIELDS, values, strict=False) if value}
    if "state" in row:
        row["state"] = _WORD.get(row["state"], row["state"])
    last = row.get("last")
    if last is not None:
        since = int(last)
        if "since" in row:
            since -= int(row["since"])
            row["since"] = str(since)
        if "first" in row:
            row["first"] = str(since - int(row["first"]))
        if "ord" in row:
            row["ord"] = str(since + int(row["ord"]))
        if "hist" in row:
            row["hist"] = _newest_line(row["hist"], row.get("inc", ""), row.get("ttl", ""), since)
    if "ttl" in row:
        row.setdefault("dttl", row["ttl"])
    row.setdefault("status", "ok")
    row["svc"], _, row["inst"] = iid.partition("/")
    row.setdefault("meta", "{}")
    return row


#: the state, and the newest history line's kind and previous state, as one letter each
#: (CODE in hbbus/lua/common.lua)
_CODE = {
    "alive": "a",
    "suspect": "s",
    "dead": "d",
    "left": "l",
    "none": "n",
    "joined": "j",
    "recovered": "r",
    "restarted": "R",
    "flapping": "f",
    "stable": "S",
    "held": "h",
    "maintenance": "m",
}
_WORD = {code: word for word, code in _CODE.items()}


def _newest_line(line: str, inc: str, ttl: str, since: int, packing: bool = False) -> str:
    """The record's newest history line packed (or unpacked): its kind and previous state as
    letters, its incarnation and ttl "=" when they are the record's, its at_ms a distance back
    from since. A line of the earlier layout (10 fields) stays as it is."""
    fields = line.split(" ")
    if len(fields) != 9:
        return line
    words = _CODE if packing else _WORD
    fields[0], fields[1] = words.get(fields[0], fields[0]), words.get(fields[1], fields[1])
    for k, own in ((2, inc), (7, ttl)):
        if packing and fields[k] == own:
            fields[k] = "="
        elif not packing and fields[k] == "=":
            fields[k] = own
    fields[4] = str(since - int(fields[4]))
    return " ".join(fields)


def encode_record(row: dict[str, str]) -> str:
    """A record's fields packed as the scripts keep them (the inverse of decode_record)."""
    packed = {name: row.get(name, "") for name in RECORD_FIELDS}
    packed["state"] = _CODE.get(packed["state"], packed["state"])
    last = packed["last"]
    if last:
        since = int(packed["since"] or last)
        if packed["since"]:
            packed["since"] = str(int(last) - since)
        if packed["first"]:
            packed["first"] = str(since - int(packed["first"]))
        if packed["ord"]:
            packed["ord"] = str(int(packed["ord"]) - since)
        packed["hist"] = _newest_line(packed["hist"], packed["inc"], packed["ttl"], since, True)
    if packed["dttl"] == packed["ttl"]:
        packed["dttl"] = ""
    if packed["status"] == "ok":
        packed["status"] = ""
    values = list(packed.values())
    while len(values) > _CORE and not values[-1]:
        values.pop()
    return "\t".join(values)


def _events(flat: Sequence[Any]) -> list[OutEvent]:
    return [OutEvent(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]


def zone_of(beat: Heartbeat) -> str:
    """``meta.zone`` when it is a valid name (it becomes part of keys and routing keys)."""
    zone = beat.meta.get("zone")
    return zone if valid_name(zone) else ""


def history_event(service: str, instance: str, line: str) -> dict[str, Any]:
    """One line of an instance's history (common.lua, ``emit``) as its event's fields."""
    fields = line.split(" ")
    if len(fields) == 10:  # the earlier layout: the id first, ord and last_seen_ms whole
        evid, kind, prev, inc, seq, ord_, at, last, ttl, flags = fields
        ord_ms, at_ms, last_ms = int(ord_), int(at), int(last)
    else:
        kind, prev, inc, seq, at, d_ord, d_last, ttl, flags = fields
        at_ms = int(at)
        ord_ms, last_ms = at_ms + int(d_ord), at_ms - int(d_last)
        evid = hashlib.sha1(f"{kind}|{service}/{instance}|{inc}|{ord_ms}".encode()).hexdigest()
        evid = evid[:24]
    event: dict[str, Any] = {
        "v": WIRE_VERSION,
        "id": evid,
        "kind": kind,
        "service": service,
        "instance": instance,
        "incarnation": inc,
        "seq": int(seq),
        "ord": ord_ms,
        "at_ms": at_ms,
        "last_seen_ms": last_ms,
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
    """One heartbeat as ingest.lua reads it: one argument, tab-separated, meta last; first
    the instance's bucket (Redis would spend 2 µs of its time per heartbeat on the SHA-1)."""
    head = (
        f"{Names.bucket(beat.service, beat.instance)}\t"
        f"{beat.service}\t{beat.instance}\t{beat.incarnation}\t{beat.seq}\t{interval_ms}\t"
        f"{ttl_ms}\t{beat.status}\t{zone_of(beat)}\t"
    )
    return head.encode() + orjson.dumps(beat.meta)


def _old_row(row: dict[str, str], meta: str | None) -> dict[str, str]:
    """A record of the earlier layout (a hash, and its meta in a key of its own)."""
    return {**row, "meta": meta or row.get("meta") or "{}"}


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
        self._forget = redis.register_script(_script("forget.lua"))
        self.epoch = ""  # the store epoch this client saw last (see ingest.lua)
        c = self.config
        self._keys = [
            names.deadlines_key,
            names.instances_key,
            names.outbox_key,
            names.outbox_body_key,
            names.outbox_due_key,
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

    async def listpack_value(self) -> int:
        """Redis' ``hash-max-listpack-value`` (whether the buckets of packed records stay
        listpacks: see ``hbbus.ops.listpack_advice``), ``hash-max-ziplist-value`` on a Redis
        older than 7 (the same limit under its earlier name). Raises RedisError where CONFIG
        is refused or renamed away, as managed Redis services often do; KeyError or
        ValueError where the answer has no number."""
        conf = await self.redis.config_get("hash-max-*-value")
        value = conf.get("hash-max-listpack-value", conf.get("hash-max-ziplist-value"))
        if value is None:
            raise KeyError(f"CONFIG GET hash-max-*-value answered {conf!r}")
        return int(value)

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
            n = self.names
            async with self.redis.pipeline(transaction=True) as pipe:
                for r in quiet:
                    pipe.zadd(
                        n.deadline_key(r["svc"], r["inst"]), {f"{r['svc']}/{r['inst']}": now_ms}
                    )
                    pipe.zadd(n.dlmin_key, {n.bucket(r["svc"], r["inst"]): now_ms}, lt=True)
                await pipe.execute()
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
        n = self.names
        # Records of the earlier layout first, then the buckets: one moved meanwhile is then
        # read in its bucket (and wins there), not lost between the two reads.
        old: set[str] = await self.redis.smembers(n.instances_key)  # type: ignore[assignment]
        async with self.redis.pipeline(transaction=False) as pipe:
            for iid in old:
                pipe.hgetall(n.key_prefix + "inst:" + iid)
                pipe.get(n.key_prefix + "meta:" + iid)
            replies = await pipe.execute()
        rows = {
            f"{row['svc']}/{row['inst']}": _old_row(row, meta)
            for row, meta in zip(replies[::2], replies[1::2], strict=True)
            if row
        }
        buckets: list[str] = await self.redis.zrange(n.dlmin_key, 0, -1)  # type: ignore[assignment]
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in buckets:  # every bucket with a record (each has a deadline)
                pipe.hgetall(n.key_prefix + "r:" + bucket)
            packed_buckets = await pipe.execute()
        for packed in packed_buckets:
            rows.update({iid: decode_record(iid, value) for iid, value in packed.items()})
        return sorted(rows.values(), key=lambda row: (row["svc"], row["inst"]))

    async def record(self, service: str, instance: str) -> dict[str, str] | None:
        """The instance's record, with its meta (JSON) as ``meta``."""
        return (await self.records_of(service, [instance]))[0]

    async def records_of(
        self, service: str, instances: Sequence[str]
    ) -> list[dict[str, str] | None]:
        """The records of these instances of ``service`` (None for an unknown one), in one
        round trip."""
        n = self.names
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance in instances:
                pipe.hget(n.bucket_key(service, instance), f"{service}/{instance}")
                pipe.hgetall(n.record_key(service, instance))
                pipe.get(n.meta_key(service, instance))
            replies = await pipe.execute()
        out: list[dict[str, str] | None] = []
        for k, instance in enumerate(instances):
            packed, row, meta = replies[3 * k : 3 * k + 3]
            if packed is not None:
                out.append(decode_record(f"{service}/{instance}", packed))
            else:
                out.append(_old_row(row, meta) if row else None)
        return out

    async def history(self, service: str, instance: str, count: int = 20) -> list[dict[str, Any]]:
        """The instance's latest transitions, newest first: each as its event was published,
        without the meta (the log keeps whole events; the history keeps one line each)."""
        n = self.names
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(n.bucket_key(service, instance), f"{service}/{instance}")
            pipe.get(n.history_key(service, instance))
            packed, older = await pipe.execute()
        lines = older.split("\n") if older else []
        if packed is not None:  # (else the earlier layout: every line in the history key)
            newest = decode_record(f"{service}/{instance}", packed).get("hist")
            lines = [newest, *lines] if newest else []
        return [history_event(service, instance, line) for line in lines[:count]]

    async def deadline(self, service: str, instance: str) -> int | None:
        """When the instance's next transition (or its purge) is due, ms."""
        iid, n = f"{service}/{instance}", self.names
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(n.deadline_key(service, instance), iid)
            pipe.zscore(n.deadlines_key, iid)  # a record of the earlier layout, not moved yet
            at, old = await pipe.execute()
        at = at if at is not None else old
        return None if at is None else int(at)

    async def instance_count(self) -> int:
        """How many instances the namespace tracks (one deadline each)."""
        n = self.names
        buckets: list[str] = await self.redis.zrange(n.dlmin_key, 0, -1)  # type: ignore[assignment]
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.zcard(n.key_prefix + "dl:" + bucket)
            pipe.scard(n.instances_key)  # records of the earlier layout, not moved yet
            return sum(await pipe.execute())

    async def recent_events(self, count: int = 50) -> list[dict[str, Any]]:
        """The latest transitions of the whole namespace, oldest first."""
        entries: list[Any] = await self.redis.xrevrange(self.names.log_key, count=count)  # type: ignore[assignment]
        return [orjson.loads(fields["e"]) for _, fields in reversed(entries)]

    async def pending_events(self) -> int:
        return int(await self.redis.zcard(self.names.outbox_key))

    async def forget(self, service: str, instance: str) -> bool:
        """Remove every trace of one instance. Returns whether it was known."""
        args = [*self._common, f"{service}/{instance}"]
        return bool(await self._forget(keys=self._keys, args=args))

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
