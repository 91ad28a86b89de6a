"""The aggregator: competing consumer of ``<ns>.aggregator`` (ingest) plus a reaper.

Ingest: deliveries are buffered and applied as one batch — validate, park what is invalid,
coalesce repeated heartbeats of one instance, one Lua call, then one multiple-ack. The
transitions the call made are in the Redis outbox (with a lease) by then, and are published
in the background while ingest goes on. Redis trouble holds the batch (unacked, bounded by
the prefetch) and retries it; nothing is acked before it is in Redis.

The hot path consumes with aiormq directly, on the channel underneath aio-pika's robust
channel: aio-pika's per-message wrapping cost more than everything else the aggregator does
per heartbeat (see docs/benchmarks.md). The robust connection still reconnects and restores
the channel, its QoS and the topology; the consumer is re-issued from the channel's reopen
callback.

Reaper: claims due deadlines and expired outbox leases in one Lua call, publishes the events
with publisher confirms and mandatory, finalises those the broker confirmed, then sleeps until
the next deadline (at most ``reaper_max_sleep_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange
from aiormq.abc import DeliveredMessage, FieldValue
from pamqp.header import ContentHeader
from redis.exceptions import RedisError

from hbbus import metrics
from hbbus.amqp import (
    AMQP_ERRORS,
    can_publish_batch,
    connect,
    declare_events,
    declare_heartbeats,
    declare_ingest,
    publish_batch,
    publish_confirmed,
)
from hbbus.errors import DeliveryFailed, InvalidMessage
from hbbus.names import Names
from hbbus.ops import listpack_advice
from hbbus.runtime import cancel_and_wait, sleep_or_stop, stop_reason, wait_event
from hbbus.settings import Settings
from hbbus.store import ClaimResult, OutEvent, Store, StoreConfig
from hbbus.wire import MAX_MESSAGE_BYTES, Heartbeat, decode_heartbeat, decode_probe, encode_probe

try:  # the buffered reader's direct deliveries (aiormq internals: may be missing)
    from hbbus.frames import receiver_of
except (ImportError, AttributeError):  # pragma: no cover

    def receiver_of(frame: object) -> None:  # type: ignore[misc]
        return None


log = logging.getLogger("hbbus.aggregator")
REDIS_ERRORS = (RedisError, OSError)


#: the reaper's kicks send a probe at most this often (200 a second), whatever the deadlines
PROBE_MIN_GAP_MS = 5
#: batches of ingest's events being published at once (each up to max_lua_batch events)
SENDING_BATCHES = 4
#: on stop, how long to wait for the consume channel to cancel our consumer (the broker away)
STOP_CONSUMING_S = 5.0
#: the longest the start waits to read Redis' settings for _advise_on_redis_memory
ADVICE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class AggregatorConfig:
    """Ingest and reaper tuning. A sender's declared interval and misses are clamped to
    ``[min_interval_ms, max_interval_ms]`` and ``[1, max_misses]``."""

    prefetch: int = 2000
    min_interval_ms: int = 50
    max_interval_ms: int = 3_600_000
    max_misses: int = 100
    max_lua_batch: int = 1000
    reaper_limit: int = 1000
    reaper_max_sleep_ms: int = 50
    #: how often each aggregator sends a watermark probe through the heartbeat queue
    probe_interval_ms: int = 20
    #: with fewer than ``linger_below`` heartbeats in hand and no verdict waiting for a
    #: probe, wait this long for more before applying them: fewer, bigger batches (each
    #: costs a Redis round trip and an ack). 0: apply what is in hand at once.
    linger_ms: float = 5.0
    linger_below: int = 200
    store: StoreConfig = field(default_factory=StoreConfig)

    def clamp(self, beat: Heartbeat) -> tuple[int, int]:
        interval_ms = min(max(beat.interval_ms, self.min_interval_ms), self.max_interval_ms)
        misses = min(max(beat.misses, 1), self.max_misses)
        return interval_ms, interval_ms * misses


def coalesce(beats: Sequence[Heartbeat]) -> list[Heartbeat]:
    """Keep one heartbeat per instance: the newest (a new incarnation, or a higher seq)."""
    latest: dict[tuple[str, str], Heartbeat] = {}
    for beat in beats:
        seen = latest.get(beat.key)
        if seen is None or seen.incarnation != beat.incarnation or beat.seq > seen.seq:
            latest[beat.key] = beat
    return list(latest.values())


def event_kind(routing_key: str) -> str:
    """``dead.api.api-1`` -> ``dead``; ``observer.degraded`` stays as it is."""
    return routing_key if routing_key.startswith("observer.") else routing_key.split(".", 1)[0]


class Incoming(Protocol):
    """A delivery as ingest reads it: aiormq's ``DeliveredMessage``, or the buffered
    reader's ``hbbus.frames.Delivery``."""

    @property
    def body(self) -> bytes: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def delivery_tag(self) -> int | None: ...
    @property
    def channel(self) -> aiormq.abc.AbstractChannel: ...


def delivery_tag(message: Incoming) -> int:
    """A delivery's tag. Never 0: with ``multiple``, 0 means every unacked delivery, those
    not yet in Redis included."""
    if not message.delivery_tag:
        raise ValueError(f"a delivery without a tag: {message!r}")
    return message.delivery_tag


async def nack_all(last: Incoming) -> None:
    """Give back every unacked delivery on ``last``'s channel, up to ``last``."""
    await last.channel.basic_nack(delivery_tag(last), multiple=True, requeue=True)


def direct_delivery(channel: aiormq.abc.AbstractChannel, take: Callable[[Incoming], None]) -> bool:
    """Hand ``channel``'s deliveries to ``take`` from its frame reader, instead of aiormq
    starting a task per delivery for the consumer callback (that task, with its bookkeeping,
    cost about a tenth of the aggregator's CPU). ``take`` must not block. Deliveries for a
    consumer tag the channel does not know are dropped, and an exception from ``take`` is
    logged, as aiormq does for its callbacks. Uses the channel's protected per-delivery hook
    (aiormq 7.2; ``tests/test_bus.py`` checks it installs); where an aiormq lacks it, nothing
    changes and the consumer callback gets the deliveries. True if installed.

    On a connection that reads through :class:`hbbus.frames.BufferedFrameReceiver` (the
    workers'), the first delivery through the hook also registers the channel with that
    reader, which from then on hands most deliveries to ``take`` itself, as
    ``hbbus.frames.Delivery``, without unmarshalling them or passing them through the
    channel's queue."""
    consumers = getattr(channel, "consumers", None)
    get_frame = getattr(channel, "_get_frame", None)
    read_content = getattr(channel, "_read_content", None)
    if not (
        isinstance(consumers, dict)
        and callable(get_frame)
        and callable(read_content)
        and hasattr(channel, "_on_deliver_frame")
    ):
        return False

    async def on_deliver(frame: aiormq.spec.Basic.Deliver) -> None:
        header = await get_frame()
        if not isinstance(header, ContentHeader):
            raise ValueError(f"unexpected frame {header!r} instead of a content header")
        message = await read_content(frame, header)
        if frame.consumer_tag not in consumers:
            return  # as aiormq does: not (or no longer) a consumer of this channel
        try:
            take(message)
        except Exception:  # as aiormq does: a failing callback must not close the channel
            log.exception("taking a delivery failed")
        receiver = receiver_of(frame)
        if receiver is not None:  # from now on its reader hands deliveries out itself
            receiver.deliver_directly(channel, take)

    setattr(channel, "_on_deliver_frame", on_deliver)  # noqa: B010 (a protected hook)
    return True


async def _advise_on_redis_memory(store: Store) -> None:
    """One warning at start where Redis keeps the buckets of packed records as hashtables
    (about 50 bytes more per tracked instance): what ``hbbus doctor`` says, for a deployment
    that never runs it. Nothing is changed in Redis: its settings are the operator's. Only
    advice: whatever goes wrong reading the setting (CONFIG refused or renamed away, as
    managed services do; a slow proxy) is said at debug level and never delays the start
    by more than ADVICE_TIMEOUT_S."""
    try:
        async with asyncio.timeout(ADVICE_TIMEOUT_S):
            value = await store.listpack_value()
    except Exception as exc:
        log.debug("cannot read Redis' hash-max-listpack-value: %s", str(exc) or repr(exc))
        return
    compact, advice = listpack_advice(value)
    if not compact:
        log.warning("Redis memory: %s", advice)


def worker_name(role: str) -> str:
    # random suffix: two containers on one host can both be pid 1
    return f"hbbus-{role}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class EventPublisher:
    """Publishes claimed events with confirms and finalises the confirmed ones.
    ``claim_again`` is called when an event of an instance held back behind one just
    finalised is ready to be handed out, which a reaper would otherwise find only after its
    sleep. Events whose publish failed are released and wait for the reaper's next look: a
    broker that refuses them at once is not asked again in a busy loop."""

    def __init__(
        self, exchange: AbstractExchange, store: Store, claim_again: Callable[[], None]
    ) -> None:
        self.exchange = exchange
        self.store = store
        self.claim_again = claim_again

    async def _one(self, event: OutEvent) -> None:
        await publish_confirmed(
            self.exchange,
            event.body.encode(),
            event.routing_key,
            message_id=event.id,
            kind=event_kind(event.routing_key),
        )

    async def _publish_all(self, events: Sequence[OutEvent]) -> list[BaseException | None]:
        """Publish, as one batch where the channel allows it; per event None (confirmed) or
        the error."""
        channel = cast(aio_pika.abc.AbstractChannel, self.exchange.channel)  # type: ignore[attr-defined]
        if not channel.is_closed:
            try:
                underlay = await channel.get_underlay_channel()
            except AMQP_ERRORS as exc:
                return [exc] * len(events)
            if can_publish_batch(underlay):
                messages = [
                    (
                        e.body.encode(),
                        e.routing_key,
                        aiormq.spec.Basic.Properties(  # as publish_confirmed's
                            content_type="application/json",
                            headers={},
                            delivery_mode=2,  # persistent
                            priority=0,
                            message_id=e.id,
                            message_type=event_kind(e.routing_key),
                        ),
                    )
                    for e in events
                ]
                try:
                    return await publish_batch(underlay, self.exchange.name, messages)
                except AMQP_ERRORS as exc:
                    return [exc] * len(events)
        results = await asyncio.gather(*(self._one(e) for e in events), return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def publish(self, events: Sequence[OutEvent]) -> int:
        """Publish, then finalise what the broker confirmed. Unconfirmed events stay in the
        outbox and are published again when their lease runs out."""
        results = await self._publish_all(events)
        for result in results:  # a bug, not the broker: do not hide it
            if isinstance(result, BaseException) and not isinstance(
                result, (*AMQP_ERRORS, DeliveryFailed)
            ):
                raise result
        done = [e for e, ok in zip(events, results, strict=True) if ok is None]
        failed = [e for e, ok in zip(events, results, strict=True) if ok is not None]
        if failed:
            metrics.PUBLISH_FAILURES.inc(len(failed))
            errors = {repr(r) for r in results if r is not None}
            log.warning(
                "%d of %d events not confirmed (%s); a reaper retries them in order",
                len(failed),
                len(events),
                "; ".join(sorted(errors))[:300],
            )
            await self.store.release_events(e.id for e in failed)
        if done:
            if await self.store.finalize(e.id for e in done):
                self.claim_again()
            for event in done:
                metrics.EVENTS.labels(event_kind(event.routing_key)).inc()
        return len(done)


class Aggregator:
    """One aggregator process's work. ``await Aggregator(settings).run(stop)`` until ``stop``."""

    def __init__(
        self, settings: Settings, config: AggregatorConfig | None = None, name: str | None = None
    ) -> None:
        self.settings = settings
        self.config = config or AggregatorConfig()
        self.names = Names(settings.namespace)
        self.name = name or worker_name("aggregator")
        self.counts: Counter[str] = Counter()
        self._buffer: list[Incoming] = []
        self._wake = asyncio.Event()
        self._watermark_moved = asyncio.Event()  # a probe was applied: due verdicts may go
        self._claim_now = asyncio.Event()  # events are ready to be handed out (or we stop)
        self._probe_now = asyncio.Event()  # a deadline passed: send a probe without waiting
        self._probe_stamp_ms = 0  # the stamp of the newest probe sent
        self._probe_due_ms = 0  # the latest past deadline a verdict waits on a probe for
        self._probe_applied_ms = 0  # the newest probe stamp this aggregator applied
        self._flush = asyncio.Event()  # ends a linger: a verdict waits, or we stop
        # publishes of the events ingest recorded, running while ingest goes on (at most
        # SENDING_BATCHES batches of them); a bug in one is raised by the ingest loop
        self._sending: set[asyncio.Task[None]] = set()
        self._send_error: BaseException | None = None
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.store: Store | None = None
        self.publisher: EventPublisher | None = None
        self._pub_channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._consume_channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._consumer_tag: str | None = None
        # whether we mean to consume: only the start, a Redis outage (off, then on) and the
        # stop change it; _sync_consumer makes the channel match it
        self._want_consumer = False
        self._consume_lock = asyncio.Lock()
        self._resync: asyncio.Task[None] | None = None  # retrying _sync_consumer
        self._restore_queue = False  # the next sync declares the queue again (it was deleted)
        self.redis_ok = True
        self._clock_offset_ms = 0.0

    def __repr__(self) -> str:
        return f"Aggregator({self.name!r}, ns={self.settings.namespace!r})"

    async def run(self, stop: asyncio.Event) -> Counter[str]:
        store = Store.from_settings(self.settings, self.config.store, client_name=self.name)
        self.store = store
        try:
            await store.ping(self.settings.redis_url)
            await _advise_on_redis_memory(store)
            connection = await connect(self.settings, self.name)
            try:
                await self._serve(connection, store, stop)
            finally:
                await connection.close()
        finally:
            await store.close()
        log.info(
            "aggregator %s stopped on %s ◆ %d heartbeats ◆ %d stale ◆ %d invalid ◆ %d events",
            self.name,
            stop_reason(stop),
            self.counts["heartbeats"],
            self.counts["stale"],
            self.counts["invalid"],
            self.counts["events"],
        )
        return self.counts

    async def _serve(
        self, connection: aio_pika.abc.AbstractRobustConnection, store: Store, stop: asyncio.Event
    ) -> None:
        consume_channel: aio_pika.abc.AbstractRobustChannel = await connection.channel()  # type: ignore[assignment]
        await consume_channel.set_qos(prefetch_count=self.config.prefetch)
        self._consume_channel = consume_channel
        consume_channel.reopen_callbacks.add(self._on_reopen)
        queue = await declare_ingest(consume_channel, self.names)
        self._pub_channel = await connection.channel(publisher_confirms=True)
        events = await declare_events(self._pub_channel, self.names)
        self.publisher = EventPublisher(events, store, self._claim_again)
        # registered before consuming: the watermark waits for us until our first probe
        await store.ingest([], self.name, 0)
        self._clock_offset_ms = await store.time_ms() - time.time() * 1000
        heartbeats = await declare_heartbeats(consume_channel, self.names)
        ingest = asyncio.create_task(self._ingest_loop(store), name="hbbus-ingest")
        reaper = asyncio.create_task(self._reaper_loop(store), name="hbbus-reaper")
        prober = asyncio.create_task(self._probe_loop(heartbeats), name="hbbus-probe")
        self._queue = queue
        self._want_consumer = True
        await self._sync_consumer()
        log.info("aggregator %s consuming %s", self.name, queue.name)
        self.ready.set()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                [stopped, ingest, reaper, prober], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopped.cancel()
            await self._stop_consuming(STOP_CONSUMING_S)
            self._stopping.set()
            if self._resync is not None:
                await cancel_and_wait(self._resync)
            self._wake.set()
            self._probe_now.set()
            self._flush.set()
            self._claim_again()
            await asyncio.gather(ingest, reaper, prober, return_exceptions=True)
            with contextlib.suppress(*REDIS_ERRORS):  # our watermark no longer holds others
                await store.unregister(self.name)
            if self._sending:  # what is not confirmed by then stays in the outbox: a reaper
                # publishes it when its lease runs out, so waiting longer than that buys nothing
                _, late = await asyncio.wait(
                    self._sending, timeout=self.config.store.lease_ms / 1000
                )
                await cancel_and_wait(*late)
            for task in (ingest, reaper, prober):
                if task.done() and not task.cancelled() and task.exception():
                    raise task.exception()  # type: ignore[misc]
            if self._send_error is not None:  # a send that failed after ingest had stopped
                raise self._send_error

    # -- ingest ------------------------------------------------------------------------------
    async def _stop_consuming(self, timeout_s: float | None = None) -> None:
        """Cancel our consumer, waiting for the channel at most ``timeout_s``: a channel
        that is not back by then (the broker away) has no consumer of ours either, and what
        we held goes back to the queue when the connection closes."""
        self._want_consumer = False
        with contextlib.suppress(*AMQP_ERRORS):  # (TimeoutError is an OSError)
            await asyncio.wait_for(self._sync_consumer(), timeout_s)

    async def _sync_consumer(self) -> None:
        """Make the consume channel match ``_want_consumer``: our consumer on the robust
        channel's current aiormq channel (one, never two), or none. Serialised, so a reconnect,
        a broker cancel, a Redis outage and the stop cannot interleave their changes.
        With ``_restore_queue`` set, the queue and its bindings are declared again first
        (the broker cancelled the consumer because the queue was deleted)."""
        assert self._consume_channel is not None and self._queue is not None
        async with self._consume_lock:
            if not self._want_consumer and self._consumer_tag is None:
                return  # nothing to cancel: no need for a channel (nor to wait for the broker)
            if not self._want_consumer and self._consume_channel.is_closed:
                # the channel went (the broker away): our consumer went with it, and what it
                # held goes back to the queue; waiting for a new channel to cancel on could
                # wait as long as the outage
                self._consumer_tag = None
                return
            channel = cast(aiormq.Channel, await self._consume_channel.get_underlay_channel())
            tag = self._consumer_tag
            ours = tag is not None and tag in channel.consumers
            if not self._want_consumer:
                self._consumer_tag = None
                if ours and tag is not None:
                    await channel.basic_cancel(tag)
                return
            if ours:
                self._restore_queue = False  # a queue we consume from exists
                return
            if self._restore_queue:  # read under the lock: a retry waiting here sees it
                await cast(aio_pika.abc.AbstractRobustQueue, self._queue).restore()
                self._restore_queue = False
            if not direct_delivery(channel, self._take):
                log.info("this aiormq has no per-delivery hook: deliveries go through tasks")
            channel.on_consumer_cancel_callbacks.add(self._on_cancelled)
            # the tag is ours before the call: a broker cancel that comes before its reply
            # (the queue deleted meanwhile) must be recognised as a cancel of this consumer
            tag = self._consumer_tag = f"hbbus-ingest.{secrets.token_hex(8)}"
            try:
                await channel.basic_consume(self._queue.name, self._on_message, consumer_tag=tag)
            except BaseException:
                if self._consumer_tag == tag:
                    self._consumer_tag = None
                raise

    def _resync_consumer(self, why: str, restore_queue: bool = False) -> None:
        """Sync the consumer in a task, retrying every second while the broker refuses (one
        such task at a time: a later call while it runs is covered by it, since it goes on
        until the channel matches the intent as it is then, and restores the queue first if
        any call asked for that)."""
        self._restore_queue = self._restore_queue or restore_queue
        if self._resync is not None and not self._resync.done():
            return

        async def resync() -> None:
            while not self._stopping.is_set():
                try:
                    await self._sync_consumer()
                except AMQP_ERRORS as exc:
                    log.warning("aggregator %s: consuming again failed (%s)", self.name, exc)
                    await sleep_or_stop(self._stopping, 1.0)
                    continue
                matches = self._want_consumer == (self._consumer_tag is not None)
                if matches and not self._restore_queue:  # (a cancel meanwhile asks again)
                    if self._want_consumer:
                        log.warning("aggregator %s consuming again (%s)", self.name, why)
                    return

        self._resync = asyncio.create_task(resync(), name="hbbus-consume-again")

    def _on_cancelled(self, frame: aiormq.spec.Basic.Cancel) -> None:
        """The broker cancelled our consumer (the queue was deleted, its node went away): the
        robust channel does not know this consumer (we consume on its aiormq channel), so we
        restore the queue and consume again ourselves (in a task: this runs in the reader)."""
        if frame.consumer_tag != self._consumer_tag:
            return
        self._consumer_tag = None
        log.warning("aggregator %s: the broker cancelled its consumer", self.name)
        self._resync_consumer("after the broker cancelled it", restore_queue=True)

    async def _on_reopen(self, *_: object) -> None:
        """The robust connection reopened the channel: what was in hand went back to the
        queue with the old channel; consume again on the new one (aio-pika drops what a
        reopen callback raises, hence the retrying task)."""
        self._buffer = []
        self._resync_consumer("after a reconnect")

    def _take(self, message: Incoming) -> None:
        if self._stopping.is_set():  # a consumer the stop could not cancel in time: left
            return  # unacked, the delivery goes back to the queue when the connection closes
        self._buffer.append(message)
        self._wake.set()

    async def _on_message(self, message: DeliveredMessage) -> None:
        self._take(message)

    async def _ingest_loop(self, store: Store) -> None:
        while True:
            if self._send_error is not None:
                raise self._send_error
            if not self._buffer:
                if self._stopping.is_set():
                    return
                await self._wake.wait()  # cleared below, once what woke us is in the batch
            await self._linger()
            batch, self._buffer = self._buffer, []
            self._wake.clear()  # what woke us is in the batch
            if batch:
                await self._process(store, batch)

    async def _linger(self) -> None:
        """Let the batch grow a little (fewer, bigger batches: each costs a Redis round trip
        and an ack) when :meth:`_may_linger`; a verdict that starts waiting ends it."""
        if self._may_linger():
            self._flush.clear()
            await wait_event(self._flush, self.config.linger_ms / 1000)

    def _may_linger(self) -> bool:
        """Whether to let the batch grow a little before applying it: not when it is big
        already, not while a verdict waits for a probe (the probe may be in hand; a verdict
        that starts waiting during a linger ends it), not when stopping."""
        return (
            self.config.linger_ms > 0
            and 0 < len(self._buffer) < self.config.linger_below
            and self._probe_applied_ms >= self._probe_due_ms
            and not self._stopping.is_set()
        )

    async def _process(self, store: Store, batch: list[Incoming]) -> None:
        valid: list[Heartbeat] = []
        invalid: list[tuple[Incoming, InvalidMessage]] = []
        probe_ms = 0
        for message in batch:
            try:
                if message.routing_key and message.routing_key.startswith("probe."):
                    probe_ms = max(probe_ms, decode_probe(message.body))
                else:
                    valid.append(decode_heartbeat(message.body, message.routing_key))
            except InvalidMessage as exc:
                invalid.append((message, exc))
        if (valid or probe_ms) and not await self._apply(store, valid, probe_ms, batch[-1]):
            return  # Redis is away: the batch went back to the queue for the other aggregators
        parked = not invalid or await self._park(store, invalid)
        last = batch[-1]
        try:
            if parked:
                await last.channel.basic_ack(delivery_tag(last), multiple=True)
            else:  # redelivered: the valid ones are then stale (seq), the invalid parked again
                await nack_all(last)
        except AMQP_ERRORS as exc:  # the channel went away: the broker redelivers; seq dedupes
            log.warning(
                "ack of %d heartbeats failed (%s); they will be redelivered", len(batch), exc
            )

    async def _apply(
        self, store: Store, valid: list[Heartbeat], probe_ms: int, last: Incoming
    ) -> bool:
        """Apply valid heartbeats (in chunks of one Lua call each), then the batch's newest
        probe (with the last chunk: the watermark moves only once all of them are in).
        False if Redis failed."""
        beats = coalesce(valid)
        clamped = [(b, *self.config.clamp(b)) for b in beats]
        size = self.config.max_lua_batch
        chunks = [clamped[i : i + size] for i in range(0, len(clamped), size)] or [[]]
        try:
            for n, chunk in enumerate(chunks):
                probe = probe_ms if n == len(chunks) - 1 else 0
                await self._send_slot()  # before the call that starts the events' leases
                stale, events = await store.ingest(chunk, self.name, probe)
                if probe:
                    self._probe_applied_ms = max(self._probe_applied_ms, probe)
                    self._watermark_moved.set()
                self.counts["stale"] += stale
                metrics.STALE.inc(stale)
                if events:
                    self._send(events)
        except REDIS_ERRORS as exc:
            await self._redis_lost(store, exc, last)
            return False
        self.counts["heartbeats"] += len(valid)
        metrics.HEARTBEATS.inc(len(valid))
        if valid:  # a probe alone is not an ingest batch
            metrics.BATCH.observe(len(valid))
        return True

    async def _redis_lost(self, store: Store, exc: BaseException, last: Incoming) -> None:
        """Stop consuming, give every unacked heartbeat back to the queue (other aggregators
        take them), wait for Redis, then consume again."""
        log.warning("Redis failed (%s): pausing ingest, heartbeats go back to the queue", exc)
        self.redis_ok = False
        await self._stop_consuming()
        held, self._buffer = self._buffer, []
        with contextlib.suppress(*AMQP_ERRORS):
            # multiple=True covers every unacked delivery up to the latest on this channel
            await nack_all(held[-1] if held else last)
        while not self._stopping.is_set():
            try:
                await store.redis.ping()
                break
            except REDIS_ERRORS:
                await sleep_or_stop(self._stopping, 0.5)
        if self._stopping.is_set():
            return
        self.redis_ok = True
        log.warning("Redis is back: ingest resumes")
        with contextlib.suppress(*REDIS_ERRORS):  # hold the watermark before consuming again
            await store.ingest([], self.name, 0)
        self._want_consumer = True
        self._resync_consumer("after the Redis outage")

    async def _park(self, store: Store, invalid: list[tuple[Incoming, InvalidMessage]]) -> bool:
        """Refuse heartbeats: park each, with its reason, in ``<ns>.invalid``, and count them.
        False if parking failed (the caller then does not ack them)."""
        assert self._pub_channel is not None
        reasons: Counter[str] = Counter()
        publishes = []
        for message, exc in invalid:
            reasons[exc.reason] += 1
            log.debug("parked heartbeat from %r: %s", message.routing_key, exc)
            body = message.body
            headers: dict[str, FieldValue] = {
                "x-hbbus-reason": exc.reason,
                "x-hbbus-detail": exc.detail[:500],
                "x-hbbus-routing-key": message.routing_key or "",
                "x-hbbus-size": len(body),
            }
            if len(body) > MAX_MESSAGE_BYTES:
                body, headers["x-hbbus-truncated"] = body[:MAX_MESSAGE_BYTES], True
            publishes.append(
                self._pub_channel.default_exchange.publish(
                    aio_pika.Message(body, headers=headers), self.names.invalid_queue, timeout=10
                )
            )
        try:
            await asyncio.gather(*publishes)
            await store.count({f"invalid:{r}": n for r, n in reasons.items()})
        except (*AMQP_ERRORS, *REDIS_ERRORS) as err:
            log.warning("could not park %d invalid heartbeats: %s", len(invalid), err)
            return False
        for reason, n in reasons.items():
            metrics.INVALID.labels(reason).inc(n)
        self.counts["invalid"] += len(invalid)
        return True

    async def _publish(self, events: Sequence[OutEvent]) -> None:
        assert self.publisher is not None
        done = await self.publisher.publish(events)  # not `+= await`: that reads the count
        self.counts["events"] += done  # before the wait, and concurrent publishes lose theirs

    async def _send_slot(self) -> None:
        """Until fewer than SENDING_BATCHES batches of events are being published: a slow
        broker then slows ingest, never memory. Awaited before the Lua call that records a
        batch's events, since that call starts their leases: waiting for a slot after it
        could let a lease run out before its publish started (another reaper would then
        publish the event, and this one's copy would come after the instance's next)."""
        while len(self._sending) >= SENDING_BATCHES:
            await asyncio.wait(self._sending, return_when=asyncio.FIRST_COMPLETED)

    def _send(self, events: Sequence[OutEvent]) -> None:
        """Publish the events an ingest batch recorded while ingest goes on with the next
        batch (the caller has waited for :meth:`_send_slot`). The script that recorded them
        put them in the outbox with a lease, in the same step as the state change, so the
        batch's heartbeats may be acked before the broker confirms them: an aggregator that
        dies meanwhile loses nothing (a reaper publishes them again when the lease runs out,
        with the same ids), and an instance's later event is handed out only once this one is
        finalised, so their order holds."""
        task = asyncio.create_task(self._send_one(events), name="hbbus-send")
        self._sending.add(task)
        task.add_done_callback(self._sent)

    async def _send_one(self, events: Sequence[OutEvent]) -> None:
        try:
            await self._publish(events)
        except REDIS_ERRORS as exc:  # not finalised: the lease runs out, a reaper sends again
            log.warning(
                "recording the outcome of %d published events failed (%s); a reaper publishes "
                "them again when their lease runs out",
                len(events),
                exc,
            )

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("publishing ingest's events failed", exc_info=exc)
            self._send_error = exc
            self._wake.set()  # the ingest loop raises it

    # -- reaper ------------------------------------------------------------------------------
    def _claim_again(self) -> None:
        """Wake the reaper, however it sleeps, for a claim now: an instance's event held back
        behind one just finalised is ready to be handed out, or we stop. Without it the event
        would wait for the reaper's next look (up to ``reaper_max_sleep_ms``, or a probe
        interval)."""
        self._claim_now.set()
        self._watermark_moved.set()

    async def _probe_loop(self, heartbeats: AbstractExchange) -> None:
        """Send a probe through the heartbeat queue every ``probe_interval_ms``, and at once
        when the reaper finds a deadline passed that no probe sent yet vouches for, stamped
        with Redis time (estimated from the reaper's last reading): when an aggregator has
        applied it, every heartbeat published before the stamp has been applied (the
        watermark). The kick saves a death the wait for the next probe on the grid (half the
        interval on average)."""
        key = Names.probe_routing_key(self.name)
        interval_s = self.config.probe_interval_ms / 1000
        min_gap_s = min(interval_s, PROBE_MIN_GAP_MS / 1000)
        while not self._stopping.is_set():
            self._probe_now.clear()
            # asked for a deadline our clock estimate has not reached: a probe stamped before
            # it would not vouch for it
            early_s = (self._probe_due_ms - self._redis_now_ms()) / 1000
            if 0 < early_s < interval_s:
                await sleep_or_stop(self._stopping, early_s)
            sent = time.monotonic()
            stamp = int(self._redis_now_ms())
            before, self._probe_stamp_ms = self._probe_stamp_ms, max(self._probe_stamp_ms, stamp)
            message = aio_pika.Message(encode_probe(self.name, stamp))
            try:
                await heartbeats.publish(message, key, mandatory=False, timeout=interval_s * 4)
            except AMQP_ERRORS:  # no broker: no probe, the watermark waits
                self._probe_stamp_ms = before  # nothing on its way: a kick may send again
            await wait_event(self._probe_now, interval_s - (time.monotonic() - sent))
            await sleep_or_stop(self._stopping, min_gap_s - (time.monotonic() - sent))

    def _redis_now_ms(self) -> float:
        """Redis time, estimated from the reaper's last reading (never ahead of it)."""
        return time.time() * 1000 + self._clock_offset_ms

    def _probe_for(self, due_ms: int) -> None:
        """A verdict on a deadline past (``due_ms``) waits for a probe: ingest stops
        lingering until one at or after it is applied, and one is sent now unless it is on
        its way already, or the heartbeat queue is behind (no probe of the last ten
        intervals applied yet: one more would only wait behind the backlog too, and the
        grid's probes go on)."""
        self._probe_due_ms = max(self._probe_due_ms, due_ms)
        self._flush.set()
        behind = self._redis_now_ms() - self._probe_applied_ms > 10 * self.config.probe_interval_ms
        if due_ms > self._probe_stamp_ms and not behind:
            self._probe_now.set()

    async def _reaper_loop(self, store: Store) -> None:
        stop = self._stopping
        max_sleep_s = self.config.reaper_max_sleep_ms / 1000
        while not stop.is_set():
            if not self.redis_ok:  # ingest lost Redis: judge nobody on state we cannot update
                await sleep_or_stop(stop, 0.1)
                continue
            # cleared before the claim: a probe applied (or an event made ready) while it and
            # the publishing run moves the watermark past what this claim saw (or is for the
            # next claim to hand out), and must not be missed
            self._watermark_moved.clear()
            self._claim_now.clear()
            try:
                result = await store.claim(self.config.reaper_limit, self.name)
                self._clock_offset_ms = result.now_ms - time.time() * 1000
                if result.events:
                    await self._publish(result.events)
            except REDIS_ERRORS as exc:
                log.warning("reaper: Redis call failed (%s)", exc)
                await sleep_or_stop(stop, 0.5)
                continue
            if len(result.events) >= self.config.reaper_limit:
                continue
            await self._reaper_sleep(result, max_sleep_s)

    async def _reaper_sleep(self, result: ClaimResult, max_sleep_s: float) -> None:
        """Sleep until the next deadline (at most ``max_sleep_s``): the next claim judges it,
        or finds it past and waiting for the watermark. Such a deadline has a probe sent for
        it, and the reaper waits until the watermark moves, which it does with each probe
        this aggregator applies (another aggregator's probes move it too: look again within
        the probe interval). A later deadline that passes meanwhile gets a probe of its own
        at once: deaths a few milliseconds apart do not wait for one probe's round trip
        after another."""
        next_due_ms, now_ms = result.next_due_ms, result.now_ms
        if next_due_ms is None or next_due_ms > now_ms:
            wait_s = max_sleep_s if next_due_ms is None else (next_due_ms - now_ms) / 1000
            await wait_event(self._claim_now, min(max_sleep_s, max(0.002, wait_s)))
            return
        self._probe_for(next_due_ms)
        wait_s = self.config.probe_interval_ms / 1000
        if result.upcoming_ms is not None:
            until_s = (result.upcoming_ms - now_ms) / 1000
            if until_s < wait_s:
                if await wait_event(self._watermark_moved, until_s):
                    return
                self._probe_for(result.upcoming_ms)
                wait_s -= until_s
        await wait_event(self._watermark_moved, wait_s)
