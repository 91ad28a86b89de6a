"""The failover-consumer framework.

A consumer group has one durable queue (``<ns>.failover.<group>``) bound to the events
exchange with the group's patterns, so events published while no member runs wait for it.
For each event:

1. Parse it; an event that is not an hbbus event goes to the group's DLQ (never retried).
2. Find the handler for its kind (or ``"*"``); none: ack, nothing to do.
3. Deduplicate per group in Redis, by event id (done already?) and by instance order (an
   event older than one already handled for the instance is stale), and take a short
   in-flight lease so two members never run the same event at once.
4. Run the handler (with a timeout). Success: mark done, ack. Failure: republish to the retry
   queue of that attempt (a TTL queue that dead-letters back to the group's queue: capped
   exponential backoff that survives restarts), then ack; after ``max_retries`` retries, or on
   :class:`PermanentFailure`, publish to ``<ns>.failover.<group>.dlq`` with the error.

Handlers therefore run at least once, in order per instance, and are deduplicated by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from redis.asyncio import Redis
from redis.exceptions import RedisError

from hbbus import metrics
from hbbus.amqp import AMQP_ERRORS, connect, declare_failover
from hbbus.errors import ConfigError, DeliveryFailed, InvalidMessage, NotFound, PermanentFailure
from hbbus.names import Names
from hbbus.runtime import stop_reason
from hbbus.settings import Settings, check_name
from hbbus.store import connect_redis
from hbbus.wire import EVENT_KINDS, Event, decode_event

log = logging.getLogger("hbbus.failover")

Handler = Callable[[Event], Awaitable[object]]
ATTEMPT_HEADER = "x-hbbus-attempt"

# KEYS: done key, order hash, inflight key. ARGV: instance id, ord, lease_ms.
_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'done' end
local last = redis.call('HGET', KEYS[2], ARGV[1])
if last and tonumber(last) > tonumber(ARGV[2]) then return 'stale' end
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[3]) then return 'run' end
return 'busy'
"""
# KEYS: done key, order hash, inflight key. ARGV: instance id, ord, done ttl (s).
_FINISH = """
redis.call('SET', KEYS[1], '1', 'EX', ARGV[3])
local last = redis.call('HGET', KEYS[2], ARGV[1])
if not last or tonumber(last) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
redis.call('DEL', KEYS[3])
return 1
"""


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` retries after the first try, waiting ``base_s * 2**n`` (capped)."""

    max_retries: int = 5
    base_s: float = 1.0
    max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.base_s <= 0 or self.max_s < self.base_s:
            raise ConfigError("retry policy needs max_retries >= 0 and 0 < base_s <= max_s")

    def delay_ms(self, retry: int) -> int:
        """Delay before retry number ``retry`` (1-based)."""
        return round(min(self.base_s * 2 ** (retry - 1), self.max_s) * 1000)

    @property
    def delays_ms(self) -> list[int]:
        """Every delay a retry queue is needed for (the first one also serves "busy")."""
        return sorted({self.delay_ms(n) for n in range(1, max(self.max_retries, 1) + 1)})


class FailoverConsumer:
    """A member of consumer group ``group``. Register handlers with :meth:`on`, then ``run``.

    >>> consumer = FailoverConsumer(settings, "db", ["dead.db.*"])
    >>> @consumer.on("dead")
    ... async def promote(event): ...
    """

    def __init__(
        self,
        settings: Settings,
        group: str,
        bindings: Sequence[str],
        *,
        retry: RetryPolicy | None = None,
        handler_timeout_s: float = 60.0,
        dedupe_ttl_s: int = 7 * 24 * 3600,
        concurrency: int = 1,
    ) -> None:
        self.settings = settings
        self.group = check_name(group, "group")
        if not bindings:
            raise ConfigError("a failover consumer needs at least one binding pattern")
        self.bindings = list(bindings)
        self.retry = retry or RetryPolicy()
        self.handler_timeout_s = handler_timeout_s
        self.dedupe_ttl_s = dedupe_ttl_s
        self.concurrency = concurrency
        self.names = Names(settings.namespace)
        self.handlers: dict[str, Handler] = {}
        self.counts: Counter[str] = Counter()
        self.ready = asyncio.Event()
        self._channel: AbstractChannel | None = None
        self._redis: Redis | None = None
        self._in_flight: set[asyncio.Task[object]] = set()

    def on(self, *kinds: str) -> Callable[[Handler], Handler]:
        """Register the decorated coroutine for event ``kinds`` (``"*"``: every kind)."""
        for kind in kinds:
            if kind != "*" and kind not in EVENT_KINDS:
                raise ConfigError(f"unknown event kind {kind!r}; known: {sorted(EVENT_KINDS)}")

        def register(handler: Handler) -> Handler:
            for kind in kinds:
                self.handlers[kind] = handler
            return handler

        return register

    def _key(self, what: str) -> str:
        return self.names.failover_key(self.group, what)

    async def run(self, stop: asyncio.Event) -> Counter[str]:
        """Consume until ``stop`` is set; finishes the event in hand, then returns the counts."""
        redis = connect_redis(self.settings, f"hbbus-failover-{self.group}")
        self._redis = redis
        self._begin = redis.register_script(_BEGIN)
        self._finish = redis.register_script(_FINISH)
        try:
            await redis.ping()
            connection = await connect(self.settings, f"hbbus-failover {self.group}")
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                self._channel = channel
                await channel.set_qos(prefetch_count=self.concurrency)
                queue = await declare_failover(
                    channel, self.names, self.group, self.bindings, self.retry.delays_ms
                )
                tag = await queue.consume(self._on_message)
                log.info(
                    "failover group %s consuming %s (%s)",
                    self.group,
                    queue.name,
                    ", ".join(self.bindings),
                )
                self.ready.set()
                await stop.wait()
                with contextlib.suppress(*AMQP_ERRORS):
                    await queue.cancel(tag)
                await self._drain_in_flight()
        finally:
            await redis.aclose()
        log.info(
            "failover group %s stopped on %s ◆ %d handled ◆ %d retried ◆ %d dead-lettered "
            "◆ %d duplicates",
            self.group,
            stop_reason(stop),
            self.counts["handled"],
            self.counts["retried"],
            self.counts["dead-lettered"],
            self.counts["duplicate"],
        )
        return self.counts

    async def _drain_in_flight(self) -> None:
        """Let the handlers in hand finish (they are bounded by the handler timeout)."""
        if self._in_flight:
            log.info(
                "failover group %s: waiting for %d handler(s) in hand",
                self.group,
                len(self._in_flight),
            )
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    # -- one message ---------------------------------------------------------------------------
    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            await self._settle(message)
        finally:
            self._in_flight.discard(task)

    async def _settle(self, message: AbstractIncomingMessage) -> None:
        try:
            outcome = await self._handle(message)
        except (RedisError, DeliveryFailed, *AMQP_ERRORS) as exc:
            # Redis away, or a retry/DLQ copy not confirmed: keep the event, try again later
            log.warning("failover %s: %s; requeueing the event", self.group, exc)
            await asyncio.sleep(1.0)
            with contextlib.suppress(*AMQP_ERRORS):
                await message.nack(requeue=True)
            return
        self.counts[outcome] += 1
        metrics.HANDLED.labels(self.group, outcome).inc()
        with contextlib.suppress(*AMQP_ERRORS):  # lost ack: redelivered, then deduplicated
            await message.ack()

    async def _handle(self, message: AbstractIncomingMessage) -> str:
        try:
            event = decode_event(message.body)
        except InvalidMessage as exc:
            await self._dead_letter(message, f"not an hbbus event: {exc}", attempt=0)
            return "dead-lettered"
        handler = self.handlers.get(event.kind) or self.handlers.get("*")
        if handler is None:
            return "ignored"
        keys = [
            self._key(f"done:{event.id}"),
            self._key("order"),
            self._key(f"inflight:{event.id}"),
        ]
        lease_ms = int((self.handler_timeout_s + 10) * 1000)
        verdict = await self._begin(keys=keys, args=[event.instance_id, event.ord, lease_ms])
        if verdict in ("done", "stale"):
            log.debug(
                "failover %s: %s event %s skipped (%s)", self.group, event.kind, event.id, verdict
            )
            return "duplicate" if verdict == "done" else "stale"
        attempt = int(str((message.headers or {}).get(ATTEMPT_HEADER, 0)))
        if verdict == "busy":  # another member runs it right now: look again after a delay
            await self._republish(
                message,
                self.names.failover_retry_queue(self.group, self.retry.delay_ms(1)),
                attempt,
                None,
            )
            return "busy"
        return await self._run_handler(handler, event, message, keys, attempt)

    async def _run_handler(
        self,
        handler: Handler,
        event: Event,
        message: AbstractIncomingMessage,
        keys: list[str],
        attempt: int,
    ) -> str:
        assert self._redis is not None
        try:
            async with asyncio.timeout(self.handler_timeout_s):
                await handler(event)
        except asyncio.CancelledError:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.delete(keys[2])  # another member may take it at once
            raise
        except Exception as exc:
            await self._redis.delete(keys[2])
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, TimeoutError):
                error = f"handler timed out after {self.handler_timeout_s:g}s"
            return await self._failed(
                event, message, attempt, error, permanent=isinstance(exc, PermanentFailure)
            )
        await self._finish(keys=keys, args=[event.instance_id, event.ord, self.dedupe_ttl_s])
        log.info(
            "failover %s: %s %s handled (attempt %d)",
            self.group,
            event.kind,
            event.instance_id,
            attempt + 1,
        )
        return "handled"

    async def _failed(
        self,
        event: Event,
        message: AbstractIncomingMessage,
        attempt: int,
        error: str,
        permanent: bool,
    ) -> str:
        retry = attempt + 1
        if permanent or retry > self.retry.max_retries:
            log.error(
                "failover %s: %s %s failed for good after %d tries: %s",
                self.group,
                event.kind,
                event.instance_id,
                attempt + 1,
                error,
            )
            await self._dead_letter(message, error, attempt + 1)
            return "dead-lettered"
        delay_ms = self.retry.delay_ms(retry)
        log.warning(
            "failover %s: %s %s failed (try %d: %s); retrying in %.1fs",
            self.group,
            event.kind,
            event.instance_id,
            attempt + 1,
            error,
            delay_ms / 1000,
        )
        await self._republish(
            message, self.names.failover_retry_queue(self.group, delay_ms), retry, error
        )
        return "retried"

    async def _republish(
        self, message: AbstractIncomingMessage, queue: str, attempt: int, error: str | None
    ) -> None:
        headers = dict(message.headers or {})
        headers[ATTEMPT_HEADER] = attempt
        if error is not None:
            headers["x-hbbus-error"] = error[:1000]
        assert self._channel is not None
        result = await self._channel.default_exchange.publish(
            aio_pika.Message(
                message.body,
                headers=headers,
                message_id=message.message_id,
                type=message.type,
                content_type=message.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            queue,
            mandatory=True,
            timeout=10,
        )
        if not isinstance(result, aiormq.spec.Basic.Ack):  # returned: no such queue
            raise DeliveryFailed(f"could not route the event to {queue}")

    async def _dead_letter(
        self, message: AbstractIncomingMessage, error: str, attempt: int
    ) -> None:
        await self._republish(message, self.names.failover_dlq(self.group), attempt, error)


async def dlq_messages(
    settings: Settings, group: str, limit: int = 100, replay: bool = False
) -> list[dict[str, object]]:
    """Read (and with ``replay``, move back to the group's queue) dead-lettered events."""
    names = Names(settings.namespace)
    connection = await connect(settings, f"hbbus-dlq {group}", robust=False)
    out: list[dict[str, object]] = []
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            dlq = await channel.declare_queue(names.failover_dlq(group), passive=True)
        except AMQP_ERRORS:
            raise NotFound(
                f"no dead-letter queue for group {group!r} in namespace {settings.namespace!r}"
            ) from None
        for _ in range(limit):
            message = await dlq.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                break
            headers = dict(message.headers or {})
            out.append(
                {
                    "body": message.body.decode(errors="replace"),
                    "error": headers.get("x-hbbus-error"),
                    "attempts": headers.get(ATTEMPT_HEADER),
                }
            )
            if replay:
                headers[ATTEMPT_HEADER] = 0
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        message.body,
                        headers=headers,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        content_type=message.content_type,
                    ),
                    names.failover_queue(group),
                    timeout=10,
                )
                await message.ack()
        # without replay, the unacked messages go back to the DLQ when the channel closes
    return out
