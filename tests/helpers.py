"""Test helpers: waiting on conditions, collecting events, cleaning a namespace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import orjson

from hbbus.amqp import connect, declare_events
from hbbus.client import Heartbeater
from hbbus.names import Names
from hbbus.settings import Settings
from hbbus.store import Store, decode_record, encode_record


async def wait_until(
    cond: Callable[[], Any], timeout_s: float, what: str = "condition", poll_s: float = 0.02
) -> Any:
    """Poll ``cond`` (sync or async) until it returns something truthy, or fail after timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(poll_s)


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident memory (this one's by default), from /proc."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class EventSink:
    """Every event published in a namespace, as it arrives (an exclusive queue bound to '#')."""

    def __init__(self, settings: Settings, pattern: str = "#", queue: str | None = None) -> None:
        self.settings = settings
        self.pattern = pattern
        self.queue = queue  # a durable queue of this name survives a broker restart
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def start(self) -> EventSink:
        self._connection = await connect(self.settings, "test-event-sink", robust=False)
        channel = await self._connection.channel()
        exchange = await declare_events(channel, Names(self.settings.namespace))
        if self.queue is None:
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        else:
            queue = await channel.declare_queue(self.queue, durable=True)
        await queue.bind(exchange, self.pattern)
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def reconnect(self) -> EventSink:
        """After a broker restart (durable queue only): consume again."""
        with contextlib.suppress(Exception):
            await self.close()
        return await self.start()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.events.append(orjson.loads(message.body))
        self.arrivals.append(time.time())

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    def of(self, kind: str | None = None, instance: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if (kind is None or e["kind"] == kind)
            and (
                instance is None
                or f"{e['service']}/{e['instance']}" == instance
                or e["instance"] == instance
            )
        ]

    async def wait_for(
        self, kind: str, instance: str | None = None, count: int = 1, timeout_s: float = 10.0
    ) -> list[dict[str, Any]]:
        return await wait_until(
            lambda: len(self.of(kind, instance)) >= count and self.of(kind, instance),
            timeout_s,
            f"{count} {kind} event(s) for {instance or 'any instance'}",
        )


async def set_record_fields(store: Store, service: str, instance: str, **fields: str) -> None:
    """Change fields of a packed record in place, as a script of the store would."""
    key, iid = store.names.bucket_key(service, instance), f"{service}/{instance}"
    packed: str = await store.redis.hget(key, iid)  # type: ignore[assignment]
    row = decode_record(iid, packed)
    row.update(fields)
    await store.redis.hset(key, iid, encode_record(row))


async def drop_namespace(settings: Settings, extra_queues: list[str] | None = None) -> None:
    """Delete a test namespace's Redis keys and its RabbitMQ queues and exchanges."""
    store = Store.from_settings(settings)
    try:
        await store.drop_namespace()
    finally:
        await store.close()
    names = Names(settings.namespace)
    queues = [
        names.aggregator_queue,
        names.invalid_queue,
        names.unrouted_queue,
        *(extra_queues or []),
        *rabbit_objects("queues", settings.namespace),
    ]
    exchanges = [
        names.heartbeats_exchange,
        names.events_exchange,
        names.unrouted_exchange,
        *rabbit_objects("exchanges", settings.namespace),
    ]
    connection = await connect(settings, "test-cleanup", robust=False)
    async with connection:
        for name in dict.fromkeys(queues):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        for name in dict.fromkeys(exchanges):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)


def rabbit_objects(kind: str, namespace: str) -> list[str]:
    """Names of the broker's queues or exchanges in ``namespace`` (via rabbitmqctl, if here)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return []
    try:
        out = subprocess.run(
            [ctl, "-q", f"list_{kind}", "name"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().startswith(f"{namespace}.")]


async def start_fleet(
    settings: Settings, service: str, n: int, interval_s: float, misses: int, **kwargs: Any
) -> list[Heartbeater]:
    """``n`` started Heartbeaters ``<service>-0`` … with ``meta.endpoint`` 127.0.0.1:900N."""
    beaters = [
        Heartbeater(
            service,
            f"{service}-{i}",
            interval_s=interval_s,
            misses=misses,
            settings=settings,
            meta={"endpoint": f"127.0.0.1:{9000 + i}"},
            **kwargs,
        )
        for i in range(n)
    ]
    await asyncio.gather(*(b.start() for b in beaters))
    return beaters


async def run_cli(settings: Settings, *args: str) -> Any:
    """``hbbus --namespace NS ARGS`` through click's runner, in a thread (the command runs
    its own event loop); returns click's Result."""
    from click.testing import CliRunner

    from hbbus.cli.main import cli

    return await asyncio.to_thread(CliRunner().invoke, cli, [*cli_settings(settings), *args])


def cli_settings(settings: Settings) -> list[str]:
    """The global options that point ``hbbus`` at ``settings``."""
    return [
        "--amqp-url",
        settings.amqp_url,
        "--redis-url",
        settings.redis_url,
        "--namespace",
        settings.namespace,
    ]


@contextlib.asynccontextmanager
async def running(*consumers: Any) -> AsyncIterator[None]:
    """Run failover consumers until the block ends (each ready first; a start error raises)."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in consumers]
    for consumer, task in zip(consumers, tasks, strict=True):
        ready = asyncio.ensure_future(consumer.ready.wait())
        await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()
        if not consumer.ready.is_set():
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
            raise TimeoutError(f"{consumer!r} was not ready within 15 s")
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)


class Background:
    """A test's own loop (traffic, a writer) in a task: subclasses write ``_loop``, which runs
    until ``self._stop`` is set; ``start()``, then ``await stop()``."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
