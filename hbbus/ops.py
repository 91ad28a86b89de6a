"""What the operator commands do, as library calls (the CLI only parses and renders)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from redis.exceptions import RedisError

from hbbus.amqp import AMQP_ERRORS, connect, declare_events, declare_heartbeats
from hbbus.detect import DetectorConfig, GapStats, explain
from hbbus.errors import ConfigError, NotFound, Unavailable
from hbbus.names import Names
from hbbus.settings import Settings, redact
from hbbus.store import Store
from hbbus.wire import Heartbeat, decode_event

STATES = ("alive", "suspect", "dead", "left")


def topic_match(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pat: list[str], words: list[str]) -> bool:
    if not pat:
        return not words
    head, rest = pat[0], pat[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    store = Store.from_settings(settings, client_name="hbbus-cli")
    try:
        await store.ping(settings.redis_url)
        yield store
    except RedisError as exc:
        raise Unavailable(f"Redis at {redact(settings.redis_url)}: {exc}") from None
    finally:
        await store.close()


def record_row(record: dict[str, str], now_ms: int) -> dict[str, Any]:
    """A stored record as typed fields, with the age of its last heartbeat."""
    return {
        "service": record["svc"],
        "instance": record["inst"],
        "state": record.get("state", "?"),
        "status": record.get("status", ""),
        "age_ms": now_ms - int(record.get("last", now_ms)),
        "seq": int(record.get("seq", 0)),
        "incarnation": record.get("inc", ""),
        "interval_ms": int(record.get("ivl", 0)),
        "ttl_ms": int(record.get("ttl", 0)),
        "last_seen_ms": int(record.get("last", 0)),
        "first_seen_ms": int(record.get("first", 0)),
        "since_ms": int(record.get("since", 0)),
        "meta": orjson.loads(record.get("meta", "{}")),
        "muted": record.get("muted") == "1" and not record.get("held"),
        "held": record.get("held") or None,
        "flapping": record.get("flapping") == "1",
    }


def alive_for_ms(record: dict[str, str], now_ms: int) -> int | None:
    """How long the instance stays alive without another heartbeat (its TTL's rest), or None
    when it is not alive (dead, left, or alive by its state but past its TTL)."""
    if record.get("state") not in ("alive", "suspect"):
        return None
    left = int(record.get("last", 0)) + int(record.get("ttl", 0)) - now_ms
    return left if left > 0 else None


async def status(
    settings: Settings, service: str | None = None, state: str | None = None
) -> list[dict[str, Any]]:
    async with open_store(settings) as store:
        now_ms = await store.time_ms()
        rows = [record_row(r, now_ms) for r in await store.records()]
    return [
        r
        for r in rows
        if (service is None or r["service"] == service) and (state is None or r["state"] == state)
    ]


async def routes(settings: Settings, service: str | None = None) -> list[dict[str, Any]]:
    """The routing tables (``hbbus routes``); NotFound when a named service has none."""
    from hbbus.routing import RoutingTable

    async with open_store(settings) as store:
        table = RoutingTable(store.redis, store.names)
        services = [service] if service is not None else await table.services()
        tables = [(await table.read(s)).to_dict() for s in services]
    if service is not None and not tables[0]["endpoints"]:
        raise NotFound(f"no routing table for {service!r} in namespace {settings.namespace!r}")
    return tables


async def observer(settings: Settings) -> dict[str, Any]:
    """The observer's own health (see Store.observer)."""
    async with open_store(settings) as store:
        return await store.observer()


def observer_line(obs: dict[str, Any]) -> str:
    """One line on the observer's health, for the top of `hbbus status`."""
    live = len(obs["aggregators"])
    if obs["state"] == "degraded":
        for_s = (obs["now_ms"] - obs["since_ms"]) / 1000
        return f"observer: DEGRADED for {for_s:.1f}s — {obs['reason']}"
    if not live:
        return "observer: no aggregator running — nobody is judged until one catches up"
    return (
        f"observer: ok — watermark {obs['lag_ms']} ms behind, "
        f"{live} aggregator{'s' if live != 1 else ''}"
    )


DURATION_UNITS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """``90s``, ``30m``, ``2h``, ``1d`` (or a bare number of seconds) -> milliseconds."""
    value, unit = (text[:-1], text[-1]) if text and text[-1] in DURATION_UNITS else (text, "s")
    try:
        ms = round(float(value) * DURATION_UNITS[unit])
    except ValueError:
        raise ConfigError(f"invalid duration {text!r}: use e.g. 90s, 30m, 2h, 1d") from None
    if ms <= 0:
        raise ConfigError(f"invalid duration {text!r}: it must be positive")
    return ms


async def maintenance_on(settings: Settings, target: str, duration_ms: int, reason: str) -> int:
    async with open_store(settings) as store:
        return await store.maintenance_on(target, duration_ms, reason)


async def maintenance_off(settings: Settings, target: str) -> None:
    async with open_store(settings) as store:
        if not await store.maintenance_off(target):
            raise NotFound(
                f"no maintenance window for {target} in namespace {settings.namespace!r}"
            )


async def maintenance_list(settings: Settings) -> list[dict[str, Any]]:
    async with open_store(settings) as store:
        return await store.maintenance()


async def guard_status(settings: Settings) -> list[dict[str, Any]]:
    async with open_store(settings) as store:
        return await store.guard()


async def guard_release(settings: Settings, scopes: list[str]) -> tuple[int, list[str]]:
    async with open_store(settings) as store:
        released, done = await store.release(scopes)
    if scopes and not done:
        raise NotFound(
            f"nothing is held for {', '.join(scopes)} in namespace {settings.namespace!r}"
        )
    return released, done


async def detector_set(settings: Settings, service: str, config: DetectorConfig) -> None:
    async with open_store(settings) as store:
        await store.detector_set(service, config)


async def detector_off(settings: Settings, service: str) -> None:
    async with open_store(settings) as store:
        if not await store.detector_off(service):
            raise NotFound(f"service {service!r} has no adaptive detector")


async def detectors(settings: Settings) -> dict[str, DetectorConfig]:
    async with open_store(settings) as store:
        return await store.detectors()


async def why(settings: Settings, service: str, instance: str) -> dict[str, Any]:
    """Everything that explains an instance's verdict: its gaps, its deadline and how it was
    computed, what the observer, maintenance, the guard and flap damping are doing to it,
    and its transitions."""
    async with open_store(settings) as store:
        now_ms = await store.time_ms()
        record = await store.record(service, instance)
        if record is None:
            raise NotFound(f"no instance {service}/{instance} in namespace {settings.namespace!r}")
        config = (await store.detectors()).get(service)
        windows = [
            w
            for w in await store.maintenance()
            if w["target"] in (service, f"{service}/{instance}")
        ]
        observer = await store.observer()
        history = await store.history(service, instance, 20)
    row = record_row(record, now_ms)
    ivl, dttl = int(record.get("ivl", 0)), int(record.get("dttl", record.get("ttl", 0)))
    stats = GapStats(
        int(record.get("gn", 0)),
        float(record.get("gm", 0)),
        float(record.get("gv", 0)),
        [int(g) for g in record.get("gaps", "").split()],
    )
    sus = record.get("sus", "")
    if config is None:
        how = (
            f"declared: interval {ivl} ms x {dttl // max(ivl, 1)} misses = {dttl} ms"
            f" (clamped by the aggregator); suspect after 1.5 intervals"
        )
    else:
        how = explain(stats, config, dttl)
    last = int(record.get("last", 0))
    ttl = int(record.get("ttl", 0))
    return {
        **row,
        "detector": config.encode() if config else "declared",
        "gaps_ms": stats.recent,
        "gap_mean_ms": round(stats.mean, 1) if config else None,
        "gap_sigma_ms": round(stats.sigma, 1) if config else None,
        "deadline": how,
        "suspect_at_ms_from_now": (last + (int(sus) if sus else ivl * 3 // 2)) - now_ms,
        "dead_at_ms_from_now": last + ttl - now_ms,
        "observer": observer_line(observer),
        "maintenance": windows,
        "held_by": record.get("held") or None,
        "history": history,
    }


async def show(
    settings: Settings, service: str, instance: str, history: int = 20
) -> dict[str, Any]:
    async with open_store(settings) as store:
        now_ms = await store.time_ms()
        record = await store.record(service, instance)
        if record is None:
            raise NotFound(f"no instance {service}/{instance} in namespace {settings.namespace!r}")
        row = record_row(record, now_ms)
        row["alive_for_ms"] = alive_for_ms(record, now_ms)
        row["history"] = await store.history(service, instance, history)
    return row


async def forget(settings: Settings, service: str, instance: str) -> None:
    async with open_store(settings) as store:
        if not await store.forget(service, instance):
            raise NotFound(f"no instance {service}/{instance} in namespace {settings.namespace!r}")


async def recent_events(settings: Settings, pattern: str, count: int) -> list[dict[str, Any]]:
    async with open_store(settings) as store:
        events = await store.recent_events(count * 4 if pattern != "#" else count)
    keyed = [
        e for e in events if topic_match(pattern, f"{e['kind']}.{e['service']}.{e['instance']}")
    ]
    return keyed[-count:] if count else []


async def follow_events(
    settings: Settings, pattern: str, count: int, stop: asyncio.Event
) -> AsyncIterator[dict[str, Any]]:
    """Recent history matching ``pattern``, then live events until ``stop``; each once."""
    names = Names(settings.namespace)
    connection = await connect(settings, "hbbus-cli events", robust=True)
    async with connection:
        channel = await connection.channel()
        exchange = await declare_events(channel, names)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, pattern)  # bound before history is read: no gap
        seen: set[str] = set()
        for event in await recent_events(settings, pattern, count):
            seen.add(event["id"])
            yield event
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(inbox.put, no_ack=True)
        while not stop.is_set():
            getter = asyncio.ensure_future(inbox.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if getter not in done:
                getter.cancel()
                break
            event = decode_event(getter.result().body).to_dict()
            if event["id"] not in seen:
                seen.add(event["id"])
                yield event


async def send_once(settings: Settings, beat: Heartbeat) -> None:
    """Publish one heartbeat (``hbbus send`` without ``--every``)."""
    connection = await connect(settings, "hbbus-cli send", robust=False)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await declare_heartbeats(channel, Names(settings.namespace))
        await exchange.publish(
            aio_pika.Message(beat.encode(), content_type="application/json"),
            beat.routing_key,
            mandatory=False,
            timeout=10,
        )


# -- doctor -------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, warning: bool = False) -> None:
        self.checks.append(Check(name, ok, detail, warning))


#: ``hash-max-listpack-value`` that keeps the buckets of packed records compact
LISTPACK_VALUE = 1024


def listpack_advice(value: int) -> tuple[bool, str]:
    """Whether Redis keeps the buckets of packed records in the compact listpack encoding
    (records are about 200 bytes with typical meta), and what to do if not."""
    if value >= LISTPACK_VALUE:
        return True, f"hash-max-listpack-value {value}: records are kept compact"
    return False, (
        f"hash-max-listpack-value is {value}: each tracked instance takes about 50 bytes "
        f"more than it would with `CONFIG SET hash-max-listpack-value {LISTPACK_VALUE}` "
        "(and the same in redis.conf)"
    )


async def _doctor_redis(settings: Settings, report: DoctorReport) -> None:
    try:
        async with open_store(settings) as store:
            info = await store.redis.info("server")
            report.add(
                "redis", True, f"{redact(settings.redis_url)} — Redis {info['redis_version']}"
            )
            t0 = time.time() * 1000
            server_ms = await store.time_ms()
            t1 = time.time() * 1000
            offset = server_ms - (t0 + t1) / 2
            report.add(
                "clock",
                abs(offset) < 1000,
                f"this host's clock is {offset:+.0f} ms from Redis time (rtt {t1 - t0:.1f} ms); "
                "liveness uses Redis time only",
                warning=True,
            )
            try:
                value = await store.listpack_value()
            except (RedisError, KeyError, ValueError) as exc:  # CONFIG may be renamed away
                report.add("redis memory", False, f"cannot read its settings ({exc})", True)
            else:
                report.add("redis memory", *listpack_advice(value), warning=True)
            obs = await store.observer()
            report.add(
                "observer",
                obs["state"] != "degraded" and bool(obs["aggregators"]),
                observer_line(obs),
            )
            records = await store.records()
            states = {s: sum(1 for r in records if r.get("state") == s) for s in STATES}
            report.add(
                "state",
                True,
                f"{len(records)} instances: " + ", ".join(f"{n} {s}" for s, n in states.items()),
            )
            oldest = await store.redis.zrange(store.names.outbox_key, 0, 0, withscores=True)
            stuck_ms = server_ms - int(oldest[0][1]) if oldest else 0
            report.add(
                "outbox",
                stuck_ms < 2 * store.config.lease_ms,
                "no event waits to be published"
                if not oldest
                else f"the oldest unpublished event is {stuck_ms} ms old"
                + (
                    ""
                    if stuck_ms < 2 * store.config.lease_ms
                    else ": is any aggregator running, can it reach RabbitMQ?"
                ),
            )
    except Unavailable as exc:
        report.add("redis", False, str(exc))


async def _passive(connection: aio_pika.abc.AbstractConnection, kind: str, name: str) -> Any | None:
    channel = await connection.channel()
    try:
        if kind == "exchange":
            return await channel.get_exchange(name, ensure=True)
        return await channel.declare_queue(name, passive=True)
    except AMQP_ERRORS:
        return None
    finally:
        with contextlib.suppress(*AMQP_ERRORS):
            await channel.close()


async def _doctor_amqp(settings: Settings, report: DoctorReport) -> None:
    names = Names(settings.namespace)
    try:
        connection = await connect(settings, "hbbus-cli doctor", robust=False)
    except Unavailable as exc:
        report.add("rabbitmq", False, str(exc))
        return
    async with connection:
        underlay = getattr(getattr(connection, "transport", None), "connection", None)
        props = getattr(underlay, "server_properties", None) or {}
        version = props.get("version", "?")
        version = version.decode() if isinstance(version, bytes) else version
        report.add("rabbitmq", True, f"{redact(settings.amqp_url)} — RabbitMQ {version}")
        for name in (names.heartbeats_exchange, names.events_exchange):
            found = await _passive(connection, "exchange", name)
            report.add(
                f"exchange {name}",
                found is not None,
                "declared" if found else "missing: no aggregator has run in this namespace",
            )
        queue = await _passive(connection, "queue", names.aggregator_queue)
        if queue is None:
            report.add(
                "aggregators",
                False,
                f"queue {names.aggregator_queue} missing: start one with `hbbus aggregator`",
            )
            return
        result = queue.declaration_result
        report.add(
            "aggregators",
            result.consumer_count > 0,
            f"{result.consumer_count} consuming {names.aggregator_queue}"
            if result.consumer_count
            else f"nobody consumes {names.aggregator_queue}: start one with `hbbus aggregator`",
        )
        report.add(
            "backlog",
            result.message_count < 10_000,
            f"{result.message_count} heartbeats waiting in {names.aggregator_queue}",
            warning=True,
        )
        invalid = await _passive(connection, "queue", names.invalid_queue)
        if invalid is not None:
            parked = invalid.declaration_result.message_count
            report.add(
                "invalid",
                parked == 0,
                f"{parked} refused heartbeats parked in {names.invalid_queue}",
                warning=True,
            )


async def doctor(settings: Settings) -> DoctorReport:
    report = DoctorReport()
    await _doctor_amqp(settings, report)
    await _doctor_redis(settings, report)
    return report
