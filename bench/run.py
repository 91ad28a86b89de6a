"""``make bench``: how fast one aggregator turns a backlog of heartbeats into Redis state.

It measures, in one run on one broker, a do-nothing consumer of the same messages next to
the aggregator, so the ratio holds on a noisy machine. Prints the machine, the versions and
the parameters with the result. Uses a namespace of its own and removes it afterwards.

    .venv/bin/python bench/run.py [--heartbeats 50000] [--instances 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import sys
import time
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hbbus.amqp import connect, declare_ingest
from hbbus.names import Names
from hbbus.settings import Settings
from hbbus.store import Store
from hbbus.wire import Heartbeat
from hbbus.workers.aggregator import Aggregator
from tests.helpers import drop_namespace


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count


async def publish_backlog(settings: Settings, n: int, instances: int, null_queue: str) -> None:
    names = Names(settings.namespace)
    connection = await connect(settings, "bench-publisher", robust=False)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        await declare_ingest(channel, names)
        exchange = await channel.get_exchange(names.heartbeats_exchange)
        null = await channel.declare_queue(null_queue, auto_delete=False)
        await null.bind(exchange, "hb.#")
        now_ms = int(time.time() * 1000)
        for i in range(n):
            k = i % instances
            beat = Heartbeat(
                "bench",
                f"i{k}",
                "inc",
                i // instances + 1,
                1000,
                3,
                now_ms,
                "ok",
                {"endpoint": f"10.0.{k // 256}.{k % 256}:8080", "role": "replica"},
            )
            await exchange.publish(
                aio_pika.Message(beat.encode()), beat.routing_key, mandatory=False
            )
        while await queue_depth(channel, names.aggregator_queue) < n:
            await asyncio.sleep(0.05)


async def drain_null(settings: Settings, queue_name: str, n: int) -> float:
    connection = await connect(settings, "bench-null", robust=False)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.get_queue(queue_name)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            seen += 1
            if seen % 500 == 0 or seen == n:
                await message.ack(multiple=True)
            if seen == n:
                done.set()

        start = time.perf_counter()
        tag = await queue.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - start
        await queue.cancel(tag)
        await channel.queue_delete(queue_name)
    return elapsed


async def drain_aggregator(settings: Settings, n: int) -> float:
    names = Names(settings.namespace)
    aggregator = Aggregator(settings, name="bench-aggregator")
    stop = asyncio.Event()
    task = asyncio.create_task(aggregator.run(stop))
    connection = await connect(settings, "bench-watch", robust=False)
    async with connection:
        channel = await connection.channel()
        await aggregator.ready.wait()
        start = time.perf_counter()
        while aggregator.counts["heartbeats"] < n:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
        assert await queue_depth(channel, names.aggregator_queue) == 0
    stop.set()
    await task
    return elapsed


async def main(n: int, instances: int) -> None:
    settings = Settings.from_env().with_namespace(f"bench-{secrets.token_hex(3)}")
    store = Store.from_settings(settings)
    info = await store.redis.info("server")
    await store.close()
    null_queue = f"{settings.namespace}.null"
    print(f"machine: {machine()}; Redis {info['redis_version']}; aio-pika {aio_pika.__version__}")
    print(
        f"parameters: {n} heartbeats from a backlog, {instances} instances, default "
        f"aggregator config (prefetch 2000)"
    )
    try:
        await publish_backlog(settings, n, instances, null_queue)
        null_s = await drain_null(settings, null_queue, n)
        agg_s = await drain_aggregator(settings, n)
    finally:
        await drop_namespace(settings, [null_queue])
    print(f"{'what':<34}{'seconds':>9}{'msgs/s':>10}")
    print(f"{'do-nothing aio-pika consumer':<34}{null_s:>9.2f}{n / null_s:>10.0f}")
    print(f"{'one aggregator (ingest to Redis)':<34}{agg_s:>9.2f}{n / agg_s:>10.0f}")
    print(f"ratio aggregator / do-nothing: {null_s / agg_s:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heartbeats", type=int, default=50_000)
    parser.add_argument("--instances", type=int, default=5_000)
    args = parser.parse_args()
    asyncio.run(main(args.heartbeats, args.instances))
