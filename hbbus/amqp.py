"""RabbitMQ connections and the topology every part declares (all names from hbbus.names)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeGuard

import aio_pika
import aiormq
import aiormq.connection
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq.abc import ChannelFrame, FieldTable
from pamqp.header import ContentHeader

from hbbus.errors import DeliveryFailed, Unavailable
from hbbus.names import Names
from hbbus.settings import Settings, redact

#: Errors that mean "the broker is not there (any more)". ChannelInvalidStateError is a
#: RuntimeError, raised when a channel closed under a publish before the connection noticed.
AMQP_ERRORS = (
    AMQPError,
    ChannelInvalidStateError,
    OSError,
    asyncio.TimeoutError,
)

AGGREGATOR_QUEUE_ARGS: FieldTable = {"x-max-length": 1_000_000, "x-overflow": "drop-head"}
PARKING_QUEUE_ARGS: FieldTable = {"x-max-length": 10_000, "x-overflow": "drop-head"}


async def connect(
    settings: Settings, name: str, *, robust: bool = True, timeout_s: float = 5.0
) -> AbstractRobustConnection:
    """Open a connection named ``name`` (shown in the management UI); Unavailable if it fails."""
    try:
        if robust:  # reconnects every second (aio-pika's default is 5 s, longer than many TTLs)
            return await aio_pika.connect_robust(
                settings.amqp_url,
                timeout=timeout_s,
                reconnect_interval=1,
                client_properties={"connection_name": name},
            )
        return await aio_pika.connect(  # type: ignore[return-value]
            settings.amqp_url, timeout=timeout_s, client_properties={"connection_name": name}
        )
    except AMQP_ERRORS as exc:
        raise Unavailable(
            f"RabbitMQ at {redact(settings.amqp_url)} unreachable: {exc or type(exc).__name__}"
        ) from None


async def publish_confirmed(
    exchange: AbstractExchange,
    body: bytes,
    routing_key: str,
    *,
    message_id: str | None = None,
    kind: str | None = None,
    headers: FieldTable | None = None,
    content_type: str | None = "application/json",
) -> None:
    """Publish a persistent message that must not be lost: ``mandatory``, on a channel with
    publisher confirms. DeliveryFailed unless the broker confirmed it (a return: no queue)."""
    result = await exchange.publish(
        aio_pika.Message(
            body,
            headers=headers,
            message_id=message_id,
            type=kind,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key,
        mandatory=True,
        timeout=10,
    )
    if not isinstance(result, aiormq.spec.Basic.Ack):
        raise DeliveryFailed(f"the broker did not take the message for {routing_key!r}")


#: what publish_batch needs of an aiormq channel (its publish internals, aiormq 7.2)
_BATCH_ATTRS = (
    "lock",
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "_split_body",
)


def can_publish_batch(channel: object) -> TypeGuard[aiormq.Channel]:
    """Whether :func:`publish_batch` can use this aiormq channel: publisher confirms on, and
    the internals it relies on there (else publish one message at a time)."""
    return getattr(channel, "publisher_confirms", False) is True and all(
        hasattr(channel, a) for a in _BATCH_ATTRS
    )


async def publish_batch(
    channel: aiormq.Channel,
    exchange: str,
    messages: Sequence[tuple[bytes, str, aiormq.spec.Basic.Properties]],
    timeout_s: float = 10.0,
) -> list[BaseException | None]:
    """Publish ``(body, routing_key, properties)`` messages, ``mandatory``, on a channel with
    publisher confirms, as one write; per message, None once the broker confirmed it, or the
    error (DeliveryFailed for a return or a nack, TimeoutError past ``timeout_s``). What
    ``Channel.basic_publish`` does for one message, for many at once: one lock, one write,
    no task per message (about a third of what publishing a burst of events cost the
    aggregator, see docs/benchmarks.md). Each message needs a ``message_id`` (a return is
    matched to its message by it). Only for a channel :func:`can_publish_batch` accepts."""
    if not messages:
        return []
    if not all(properties.message_id for _, _, properties in messages):
        raise ValueError("publish_batch: every message needs a message_id")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    frames: list[Any] = []
    confirmations: list[asyncio.Future[Any]] = []
    async with asyncio.timeout(timeout_s), channel.lock:
        first = channel.delivery_tag
        try:
            for body, routing_key, properties in messages:
                message_id = str(properties.message_id)
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                confirmation = channel.create_future()
                channel.confirmations[tag] = confirmation
                channel.message_id_delivery_tag[message_id] = tag
                confirmation.add_done_callback(_forget(channel, message_id, tag))
                confirmations.append(confirmation)
                frames.append(
                    aiormq.spec.Basic.Publish(
                        exchange=exchange, routing_key=routing_key, mandatory=True
                    )
                )
                frames.append(ContentHeader(properties=properties, body_size=len(body)))
                frames.extend(channel._split_body(body))
            drain = channel.create_future()
            frame = ChannelFrame.marshall(
                frames=frames, channel_number=channel.number, drain_future=drain
            )
            await channel.write_queue.put(frame)
        except BaseException:  # not sent: the broker saw none of them
            for tag in range(first + 1, channel.delivery_tag + 1):
                channel.confirmations.pop(tag, None)
            channel.delivery_tag = first
            for confirmation in confirmations:
                confirmation.cancel()
            raise
        await drain
    _, late = await asyncio.wait(confirmations, timeout=max(0.0, deadline - loop.time()))
    for confirmation in late:
        confirmation.cancel()  # (a confirm that comes after all is ignored, as aiormq does)
    return [
        TimeoutError(f"not confirmed within {timeout_s} s") if c in late else _confirmed(c)
        for c in confirmations
    ]


def _forget(
    channel: aiormq.Channel, message_id: str, tag: int
) -> Callable[[asyncio.Future[Any]], None]:
    def forget(_: asyncio.Future[Any]) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            channel.message_id_delivery_tag.pop(message_id)

    return forget


def _confirmed(confirmation: asyncio.Future[Any]) -> BaseException | None:
    """None for a confirmed message, else why not."""
    if confirmation.cancelled():
        return DeliveryFailed("the publish was cancelled (the channel closed)")
    error = confirmation.exception()
    if error is None and isinstance(confirmation.result(), aiormq.spec.Basic.Ack):
        return None
    if error is not None and not isinstance(
        error, (aiormq.exceptions.DeliveryError, aiormq.exceptions.PublishError)
    ):
        return error  # the channel or connection went
    return DeliveryFailed("the broker did not take the message (returned or refused)")


async def declare_heartbeats(channel: AbstractChannel, names: Names) -> AbstractExchange:
    return await channel.declare_exchange(
        names.heartbeats_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )


async def declare_ingest(channel: AbstractChannel, names: Names) -> AbstractQueue:
    """The heartbeat exchange, the aggregators' queue bound to it, and the parking queue."""
    exchange = await declare_heartbeats(channel, names)
    queue = await channel.declare_queue(
        names.aggregator_queue, durable=True, arguments=AGGREGATOR_QUEUE_ARGS
    )
    await queue.bind(exchange, "hb.#")
    await queue.bind(exchange, "probe.#")  # the aggregators' watermark probes
    await channel.declare_queue(names.invalid_queue, durable=True, arguments=PARKING_QUEUE_ARGS)
    return queue


async def declare_events(channel: AbstractChannel, names: Names) -> AbstractExchange:
    """The events exchange. Events no queue wants go to its alternate exchange's queue, so a
    mandatory publish never bounces and nothing is silently dropped."""
    unrouted = await channel.declare_exchange(
        names.unrouted_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await channel.declare_queue(
        names.unrouted_queue, durable=True, arguments=PARKING_QUEUE_ARGS
    )
    await queue.bind(unrouted, "")
    return await channel.declare_exchange(
        names.events_exchange,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": names.unrouted_exchange},
    )


async def declare_failover(
    channel: AbstractChannel,
    names: Names,
    group: str,
    bindings: Iterable[str],
    retry_delays_ms: Iterable[int],
) -> AbstractQueue:
    """A consumer group's durable queue with its bindings, retry (delay) queues and DLQ."""
    events = await declare_events(channel, names)
    main = names.failover_queue(group)
    queue = await channel.declare_queue(main, durable=True)
    for pattern in bindings:
        await queue.bind(events, pattern)
    for delay_ms in set(retry_delays_ms):
        await channel.declare_queue(
            names.failover_retry_queue(group, delay_ms),
            durable=True,
            arguments={
                "x-message-ttl": delay_ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": main,
            },
        )
    await channel.declare_queue(names.failover_dlq(group), durable=True)
    return queue


def use_buffered_frame_reader() -> bool:
    """Make the aiormq connections this process opens from now on read frames with
    :class:`hbbus.frames.BufferedFrameReceiver`. For the worker processes (``hbbus
    aggregator`` calls it), which read many deliveries: it changes aiormq for the whole
    process, so the library never calls it, and a service importing hbbus keeps aiormq as it
    is. True if installed; False where this aiormq has no ``FrameReceiver`` to replace."""
    try:
        from hbbus.frames import BufferedFrameReceiver
    except (ImportError, AttributeError):
        return False
    current = getattr(aiormq.connection, "FrameReceiver", None)
    if current is not BufferedFrameReceiver:
        if current is not BufferedFrameReceiver.__bases__[0]:
            return False  # someone else replaced it: leave theirs
        aiormq.connection.FrameReceiver = BufferedFrameReceiver  # type: ignore[misc]
    return True
