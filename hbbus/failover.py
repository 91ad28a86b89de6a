"""The failover-consumer framework.

A consumer group has one durable queue (``<ns>.failover.<group>``) bound to the events
exchange with the group's patterns, so events published while no member runs wait for it.
For each event:

1. Parse it; an event that is not an hbbus event goes to the group's DLQ (never retried).
2. Find the handler for its kind (or ``"*"``); none: ack, nothing to do.
3. Deduplicate per group in Redis, by event id (done already?) and by instance order (an
   event older than one already handled for the instance is stale), and take an in-flight
   lease, renewed while the handler runs, so two members never run the same event at once and
   a member that dies mid-handler loses the event to another within ``lease_ms``. A member
   that stalled past its lease and finds the event taken over (or finished) by another
   cancels its own handler and acks: the other member's run is the one that counts.
4. Run the handler (with a timeout). Success: publish ``action.succeeded``, mark done, ack.
   Failure: publish ``action.failed``, republish to the retry queue of that attempt (a TTL
   queue that dead-letters back to the group's queue: capped exponential backoff that
   survives restarts), then ack; after ``max_retries`` retries, or on
   :class:`PermanentFailure`, publish to ``<ns>.failover.<group>.dlq`` with the error.

Handlers therefore run at least once, in order per instance, and are deduplicated by id.
Reusable actions (HAProxy, routing, Redis promotion, webhook, exec) subclass :class:`Action`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from hbbus import metrics
from hbbus.amqp import (
    AMQP_ERRORS,
    connect,
    declare_events,
    declare_failover,
    publish_confirmed,
)
from hbbus.errors import ConfigError, DeliveryFailed, InvalidMessage, NotFound, PermanentFailure
from hbbus.names import Names
from hbbus.runtime import cancel_and_wait, stop_reason
from hbbus.settings import Settings, check_name
from hbbus.store import StoreConfig, connect_redis
from hbbus.wire import ACTION_KINDS, EVENT_KINDS, Event, decode_event, new_event

log = logging.getLogger("hbbus.failover")

Handler = Callable[[Event], Awaitable[object]]
ATTEMPT_HEADER = "x-hbbus-attempt"

# The per-group dedupe and in-flight lease of one run of a handler on one event, shared by
# the scripts below. KEYS: done key, order hash, inflight key. ARGV: instance id, ord (0: an
# event not ordered against the instance's transitions, as action events), then the script's
# own argument, then the run's token. Only the lease's holder renews or releases it.
_RUN_LUA = """
local DONE, ORDER, INFLIGHT = KEYS[1], KEYS[2], KEYS[3]
local INST, ORD, TOKEN = ARGV[1], tonumber(ARGV[2]), ARGV[4]
local function release()
  if redis.call('GET', INFLIGHT) == TOKEN then redis.call('DEL', INFLIGHT) end
end
-- 'done'; the lease renewed ('run': ours); 'stale' (a newer event of the instance was
-- handled); 'busy' (another run holds it); else the lease taken ('run')
local function take(lease_ms)
  if redis.call('EXISTS', DONE) == 1 then return 'done' end
  local holder = redis.call('GET', INFLIGHT)
  if holder == TOKEN then
    redis.call('PEXPIRE', INFLIGHT, lease_ms)
    return 'run'
  end
  if ORD > 0 then
    local last = redis.call('HGET', ORDER, INST)
    if last and tonumber(last) > ORD then return 'stale' end
  end
  if holder then return 'busy' end
  redis.call('SET', INFLIGHT, TOKEN, 'PX', lease_ms)
  return 'run'
end
"""
# ARGV[3]: lease_ms. Whether to run the handler.
_BEGIN = _RUN_LUA + "return take(ARGV[3])"
# ARGV[3]: lease_ms. While the handler runs: 1 to go on (the lease renewed, or taken back if
# it ran out while nobody took it and the event is not stale); 0: stop (another run holds it,
# or finished the event, or a newer one of the instance was handled).
_RENEW = _RUN_LUA + "if take(ARGV[3]) == 'run' then return 1 end return 0"
_RELEASE = _RUN_LUA + "release() return 1"
# ARGV[3]: done ttl (s). The event handled: done, the instance's order moved, lease released.
_FINISH = (
    _RUN_LUA
    + """
redis.call('SET', DONE, '1', 'EX', ARGV[3])
if ORD > 0 then
  local last = redis.call('HGET', ORDER, INST)
  if not last or tonumber(last) < ORD then redis.call('HSET', ORDER, INST, ORD) end
end
release()
return 1
"""
)


class _TakenOver(Exception):
    """The run's lease is gone to another run, or the event was finished by one (raised by
    the consumer only, from the lease keeper's verdict: never a handler's exception)."""


@dataclass(frozen=True)
class _Run:
    """One run of a handler on one event: the keys its dedupe and lease live under, and the
    run's own lease token (per run, not per member: two copies of one event in one member
    are two runs, and neither may renew or release the other's lease)."""

    done: str
    order: str
    inflight: str
    token: str
    instance: str
    ord: int


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


class Action:
    """A reusable failover action (HAProxy, routing, promotion, webhook, exec): it handles
    the event ``kinds`` it names, and may open connections when its consumer starts."""

    type: ClassVar[str] = "handler"
    kinds: ClassVar[frozenset[str]] = frozenset({"*"})
    #: how long one call may take on its own (its consumer's handler timeout allows more)
    timeout_s: float = 0.0

    async def start(self, consumer: FailoverConsumer) -> None:
        """Called once the consumer is connected, before the first event."""

    async def close(self) -> None:
        """Called when the consumer stops."""

    async def handle(self, event: Event) -> object:
        """Do the action for one event; return what was done (text), raise to retry."""
        raise NotImplementedError


class FailoverConsumer:
    """A member of consumer group ``group``. Register handlers with :meth:`on`, then ``run``.

    >>> consumer = FailoverConsumer(settings, "db", ["dead.db.*"])
    >>> @consumer.on("dead")
    ... async def promote(event): ...

    A handler may return a short text (or a dict) saying what it did: it goes into the log
    line and the ``action.succeeded`` event. ``action`` names the kind of action in both.
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
        lease_ms: int = 5000,
        action: str = "handler",
        report: bool = True,
    ) -> None:
        self.settings = settings
        self.group = check_name(group, "group")
        if not bindings:
            raise ConfigError("a failover consumer needs at least one binding pattern")
        if lease_ms < 300:
            raise ConfigError("lease_ms must be at least 300")
        self.bindings = list(bindings)
        self.retry = retry or RetryPolicy()
        self.handler_timeout_s = handler_timeout_s
        self.dedupe_ttl_s = dedupe_ttl_s
        self.concurrency = concurrency
        self.lease_ms = lease_ms
        self.action = action
        self.report = report
        self.names = Names(settings.namespace)
        self.handlers: dict[str, Handler] = {}
        self.actions: list[Action] = []
        self.counts: Counter[str] = Counter()
        self.ready = asyncio.Event()
        self.token = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._channel: AbstractChannel | None = None
        self._events: AbstractExchange | None = None
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

    def add_action(self, action: Action) -> None:
        """Run ``action`` for the kinds it handles (its type names it in logs and events). An
        action with a timeout of its own gets 5 s more than it as the handler timeout, so its
        own timeout, with its clearer error, comes first."""
        if action.timeout_s:
            self.handler_timeout_s = max(self.handler_timeout_s, action.timeout_s + 5)
        if self.action == "handler":
            self.action = action.type
        for kind in sorted(action.kinds):
            self.on(kind)(action.handle)
        self.actions.append(action)

    @property
    def redis(self) -> Redis:
        """The consumer's Redis connection (while it runs), for handlers that keep state."""
        if self._redis is None:
            raise RuntimeError("the failover consumer is not running")
        return self._redis

    def _key(self, what: str) -> str:
        return self.names.failover_key(self.group, what)

    async def run(self, stop: asyncio.Event) -> Counter[str]:
        """Consume until ``stop`` is set; finishes the event in hand, then returns the counts."""
        redis = connect_redis(self.settings, f"hbbus-failover-{self.group}")
        self._redis = redis
        self._begin = redis.register_script(_BEGIN)
        self._finish = redis.register_script(_FINISH)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        try:
            await redis.ping()
            connection = await connect(self.settings, f"hbbus-failover {self.group}")
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                self._channel = channel
                await channel.set_qos(prefetch_count=self.concurrency)
                self._events = await declare_events(channel, self.names)
                queue = await declare_failover(
                    channel, self.names, self.group, self.bindings, self.retry.delays_ms
                )
                for action in self.actions:
                    await action.start(self)
                tag = await queue.consume(self._on_message)
                log.info(
                    "failover group %s (%s) consuming %s (%s)",
                    self.group,
                    self.action,
                    queue.name,
                    ", ".join(self.bindings),
                )
                self.ready.set()
                await stop.wait()
                with contextlib.suppress(*AMQP_ERRORS):
                    await queue.cancel(tag)
                await self._drain_in_flight()
        finally:
            for action in self.actions:
                with contextlib.suppress(Exception):
                    await action.close()
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

    async def publish(self, event: Event) -> None:
        """Publish an event an action made (``promoted``, ``action.*``) with a confirm, and
        put it in the namespace's log so ``hbbus events`` shows it; DeliveryFailed if the
        broker did not take it."""
        assert self._events is not None and self._redis is not None
        await publish_confirmed(
            self._events, event.raw, event.routing_key, message_id=event.id, kind=event.kind
        )
        await self._redis.xadd(
            self.names.log_key, {"e": event.raw}, maxlen=StoreConfig.log_maxlen, approximate=True
        )

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
        run = _Run(
            done=self._key(f"done:{event.id}"),
            order=self._key("order"),
            inflight=self._key(f"inflight:{event.id}"),
            token=f"{self.token}:{secrets.token_hex(4)}",
            instance=event.instance_id,
            ord=event.ord,
        )
        verdict = await self._script(self._begin, run, self.lease_ms)
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
        return await self._run_handler(handler, event, message, run, attempt)

    async def _script(self, script: AsyncScript, run: _Run, arg: int) -> Any:
        """Run one of the run scripts (_BEGIN, _RENEW, _RELEASE, _FINISH) for ``run``."""
        return await script(
            keys=[run.done, run.order, run.inflight], args=[run.instance, run.ord, arg, run.token]
        )

    async def _keep_lease(self, run: _Run) -> None:
        """Renew the in-flight lease while the handler runs: a member that dies mid-handler
        loses it within ``lease_ms``, and another member takes the event over. Returns when
        the run must stop (another run holds the lease or finished the event: this member
        stalled past its lease); while Redis is away it keeps trying."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            with contextlib.suppress(RedisError, OSError):
                if not await self._script(self._renew, run, self.lease_ms):
                    return

    async def _call(self, handler: Handler, event: Event, run: _Run) -> object:
        """The handler's result; _TakenOver (the handler cancelled) if another run took the
        event over meanwhile; TimeoutError after the handler timeout."""
        work = asyncio.ensure_future(handler(event))
        keeper = asyncio.create_task(self._keep_lease(run))
        try:
            async with asyncio.timeout(self.handler_timeout_s):
                await asyncio.wait({work, keeper}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            keeper.result()  # a keeper that failed raises its own error: not a takeover
            raise _TakenOver(f"another run took over {event.id} while its handler ran")
        finally:
            await cancel_and_wait(keeper, work)

    async def _run_handler(
        self,
        handler: Handler,
        event: Event,
        message: AbstractIncomingMessage,
        run: _Run,
        attempt: int,
    ) -> str:
        assert self._redis is not None
        try:
            detail = await self._call(handler, event, run)
        except asyncio.CancelledError:
            with contextlib.suppress(RedisError, OSError):
                await self._script(self._release, run, 0)  # another member may take it
            raise
        except _TakenOver as exc:
            log.warning(
                "failover %s: %s; this member's handler was cancelled (a loop stalled past "
                "lease_ms=%d?)",
                self.group,
                exc,
                self.lease_ms,
            )
            return "taken-over"
        except Exception as exc:
            await self._script(self._release, run, 0)
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, TimeoutError):
                error = f"handler timed out after {self.handler_timeout_s:g}s"
            return await self._failed(
                event, message, attempt, error, permanent=isinstance(exc, PermanentFailure)
            )
        text = _detail_text(detail)
        # done first: an action that succeeded must not run again because its report failed
        await self._script(self._finish, run, self.dedupe_ttl_s)
        await self._report(event, "action.succeeded", attempt, {"detail": text})
        log.info(
            "failover %s (%s): %s %s handled (attempt %d)%s",
            self.group,
            self.action,
            event.kind,
            event.instance_id,
            attempt + 1,
            f": {text}" if text else "",
        )
        return "handled"

    async def _report(self, event: Event, kind: str, attempt: int, data: dict[str, Any]) -> None:
        """Publish ``action.succeeded``/``action.failed`` about ``event`` (never about another
        action's event: no feedback loops). Best effort: the action's log line stays the
        record when the broker or Redis cannot take the report."""
        try:
            await self._publish_report(event, kind, attempt, data)
        except (RedisError, DeliveryFailed, *AMQP_ERRORS) as exc:
            log.warning(
                "failover %s: %s about %s not published: %s", self.group, kind, event.id, exc
            )

    async def _publish_report(
        self, event: Event, kind: str, attempt: int, data: dict[str, Any]
    ) -> None:
        if not self.report or event.kind in ACTION_KINDS:
            return
        report = new_event(
            kind,
            event.service,
            event.instance,
            key=f"{self.group}|{event.id}|{attempt}",
            at_ms=int(time.time() * 1000),
            incarnation=event.incarnation,
            data={
                "group": self.group,
                "action": self.action,
                "for_id": event.id,
                "for_kind": event.kind,
                "attempt": attempt + 1,
                **data,
            },
        )
        await self.publish(report)

    async def _failed(
        self,
        event: Event,
        message: AbstractIncomingMessage,
        attempt: int,
        error: str,
        permanent: bool,
    ) -> str:
        retry = attempt + 1
        final = permanent or retry > self.retry.max_retries
        await self._report(event, "action.failed", attempt, {"error": error, "final": final})
        what = f"failover {self.group} ({self.action}): {event.kind} {event.instance_id}"
        if final:
            log.error("%s failed for good after %d tries: %s", what, attempt + 1, error)
            await self._dead_letter(message, error, attempt + 1)
            return "dead-lettered"
        delay_ms = self.retry.delay_ms(retry)
        log.warning(
            "%s failed (try %d: %s); retrying in %.1fs", what, attempt + 1, error, delay_ms / 1000
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
        await publish_confirmed(
            self._channel.default_exchange,
            message.body,
            queue,
            message_id=message.message_id,
            kind=message.type,
            headers=headers,
            content_type=message.content_type,
        )

    async def _dead_letter(
        self, message: AbstractIncomingMessage, error: str, attempt: int
    ) -> None:
        await self._republish(message, self.names.failover_dlq(self.group), attempt, error)


def _detail_text(detail: object) -> str:
    if detail is None:
        return ""
    if isinstance(detail, dict):
        return ", ".join(f"{k}={v}" for k, v in detail.items())
    return str(detail)[:500]


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
                # mandatory, confirmed: a group queue that is gone refuses it (DeliveryFailed)
                # and the message stays in the DLQ
                await publish_confirmed(
                    channel.default_exchange,
                    message.body,
                    names.failover_queue(group),
                    message_id=message.message_id,
                    kind=message.type,
                    headers=headers,
                    content_type=message.content_type,
                )
                await message.ack()
        # without replay, the unacked messages go back to the DLQ when the channel closes
    return out
