"""Detection latency: from an instance's deadline to its ``dead`` event at a consumer.

For each fleet size N (1k, 10k, 100k tracked instances), in a private namespace with one
``hbbus aggregator`` process: a publisher process keeps N - S instances alive with raw
encoded heartbeats (interval 30 s x 3 misses, spread evenly; not N Heartbeater objects), and
this process sends S sample instances of the same service (interval 0.5 s x 3 misses), stops
them in waves, and consumes ``dead.#`` from the events exchange. Latency = arrival (wall
clock) - deadline, the deadline being the event's ``last_seen_ms + ttl_ms`` (Redis time: the
same machine's clock, so wall time is compared with it directly).

    .venv/bin/python bench/detection.py [--quick] [--sizes 1000,10000,100000] [--samples 150]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import aiormq
import orjson
from common import (
    TYPICAL_META,
    Proc,
    RawPublisher,
    Row,
    beat_body,
    common_args,
    declare,
    emit,
    header,
    namespace,
    percentile,
    profiled,
    queue_depth,
    run,
    spawn,
    spawn_aggregator,
    wait_ready,
)

from hbbus.amqp import connect, declare_events
from hbbus.names import Names
from hbbus.settings import Settings
from hbbus.store import Store

SERVICE = "fleet"
BULK_INTERVAL_MS = 30_000
SAMPLE_INTERVAL_MS = 500
WAVES = 10


def bulk_body(k: int, seq: int) -> bytes:
    meta = {**TYPICAL_META, "endpoint": f"10.{k // 65536}.{k // 256 % 256}.{k % 256}:8080"}
    return beat_body(SERVICE, k, seq, meta, BULK_INTERVAL_MS)


async def bulk_main(settings: Settings, first: int, count: int) -> None:
    """The publisher process: instances first..first+count-1, each every BULK_INTERVAL_MS,
    the first round as fast as it goes."""
    seq = 1
    async with RawPublisher(settings) as pub:
        while True:
            start = time.perf_counter()
            for j in range(count):
                k = first + j
                await pub.send(SERVICE, f"i{k}", bulk_body(k, seq))
                if seq > 1 and j % 100 == 0:  # spread the round over the interval
                    await pub.push()
                    due = start + j / count * BULK_INTERVAL_MS / 1000
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await pub.flush()
            if seq == 1:
                print("first-round-sent", flush=True)
            seq += 1
            rest = start + BULK_INTERVAL_MS / 1000 - time.perf_counter()
            await asyncio.sleep(max(0.0, rest))


class DeadSink:
    """``dead.#`` events with their wall-clock arrival: the sample instances' (the first
    ``sample_count``) lateness, and a count of any other instance's death (a bulk instance
    dying means its publisher fell behind, or a false death: reported, never a sample)."""

    def __init__(self, sample_count: int) -> None:
        self.sample_count = sample_count
        self.lateness_ms: dict[str, float] = {}  # sample instance -> ms after its deadline
        self.claimed_ms: dict[str, float] = {}  # of which until the reaper claimed its death
        self.other_dead = 0
        self.connection: aiormq.abc.AbstractConnection | None = None

    async def start(self, settings: Settings) -> None:
        names = Names(settings.namespace)
        setup = await connect(settings, "bench-detection-setup", robust=False)
        async with setup:
            await declare_events(await setup.channel(), names)
        self.connection = await aiormq.connect(settings.amqp_url)
        channel = await self.connection.channel()
        ok = await channel.queue_declare(exclusive=True, auto_delete=True)
        assert ok.queue is not None
        await channel.queue_bind(ok.queue, names.events_exchange, routing_key="dead.#")
        await channel.basic_consume(ok.queue, self._on_message, no_ack=True)

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        arrived = time.time() * 1000
        event = orjson.loads(message.body)
        instance = event["instance"]
        k = instance.removeprefix("i")
        if not k.isdigit() or int(k) >= self.sample_count:
            self.other_dead += 1
            return
        # a duplicate (the same death published twice) must not stand in for a missing one
        if instance not in self.lateness_ms:
            deadline = event["last_seen_ms"] + event["ttl_ms"]
            self.lateness_ms[instance] = arrived - deadline
            self.claimed_ms[instance] = event["at_ms"] - deadline

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


async def samples(settings: Settings, first: int, count: int, waves: int) -> None:
    """Sample instances heartbeat every SAMPLE_INTERVAL_MS; a wave of them stops each second."""
    alive = list(range(first, first + count))
    per_wave = max(1, count // waves)
    seq, rounds = 1, 0
    async with RawPublisher(settings) as pub:
        while alive:
            for k in alive:
                await pub.send(
                    SERVICE, f"i{k}", beat_body(SERVICE, k, seq, TYPICAL_META, SAMPLE_INTERVAL_MS)
                )
            await pub.flush()
            seq, rounds = seq + 1, rounds + 1
            if rounds > 6 and rounds % 2 == 0:  # after 3 s of life, a wave stops every second
                del alive[:per_wave]
            await asyncio.sleep(SAMPLE_INTERVAL_MS / 1000)


async def settle(settings: Settings, store: Store, expect: int, timeout_s: float) -> None:
    """Until every instance is tracked, the queue is drained and the outbox is empty."""
    queue = Names(settings.namespace).aggregator_queue
    deadline = time.monotonic() + timeout_s
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{expect:,} instances did not settle within {timeout_s:.0f} s")
        tracked = await store.instance_count()
        if (
            tracked >= expect
            and await queue_depth(settings, queue) == 0
            and await store.pending_events() == 0
        ):
            return
        await asyncio.sleep(0.5)


async def one_size(n: int, sample_count: int, profile: str | None) -> Row:
    async with namespace(f"det{n}") as settings:
        await declare(settings)
        agg = spawn_aggregator(settings)
        bulk: Proc | None = None
        sink, store = DeadSink(sample_count), Store.from_settings(settings)
        try:
            await wait_ready([agg])
            await sink.start(settings)
            bulk = spawn(
                [
                    __file__,
                    "--role",
                    "bulk",
                    "--first",
                    str(sample_count),
                    "--count",
                    str(n - sample_count),
                ],
                settings,
                pipe=True,
            )
            t0 = time.perf_counter()
            await settle(settings, store, n - sample_count, timeout_s=60 + n / 100)
            print(
                f"  {n:,} instances tracked and settled in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            backlog = await queue_depth(settings, Names(settings.namespace).aggregator_queue)
            print(f"  heartbeats waiting in the queue as the samples start: {backlog}", flush=True)
            # the aggregator at steady state, one file per size
            out = None
            if profile:
                root, ext = os.path.splitext(profile)
                out = f"{root}-{n}{ext}"
            with profiled(agg.pid, out):
                await samples(settings, 0, sample_count, waves=WAVES)
            # the last wave's deaths are due one TTL after it stopped; wait for them, bounded
            deadline = time.monotonic() + SAMPLE_INTERVAL_MS * 3 / 1000 + 10.0
            while len(sink.lateness_ms) < sample_count and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            if bulk is not None:
                bulk.stop()
            agg.stop()
            await sink.close()
            await store.close()
    lat = list(sink.lateness_ms.values())
    per_wave = max(1, sample_count // WAVES)
    waves: dict[int, list[tuple[float, float]]] = {}
    for instance, ms in sink.lateness_ms.items():
        wave = waves.setdefault(int(instance.removeprefix("i")) // per_wave, [])
        wave.append((ms, sink.claimed_ms[instance]))
    # one slow wave, or all of them slow: different causes; and claimed late (the watermark,
    # the reaper) or delivered late (publishing, the broker, this process)
    print(
        "  worst lateness per wave, ms (of which until claimed): "
        + " ".join("{:.0f} ({:.0f})".format(*max(waves[w])) for w in sorted(waves)),
        flush=True,
    )
    p50, p99, worst = percentile(lat, 50), percentile(lat, 99), max(lat, default=float("nan"))
    print(
        f"  N={n:,}: {len(lat)} dead events of {sample_count}; after the deadline ms: "
        f"p50 {p50:.0f} p99 {p99:.0f} max {worst:.0f}; other instances dead: {sink.other_dead}",
        flush=True,
    )
    ok = p99 <= 50 and len(lat) == sample_count and sink.other_dead == 0
    return Row(
        "detection",
        f"dead after deadline, N={n:,}: p50/p99/max ms",
        f"{p50:.0f}/{p99:.0f}/{worst:.0f}",
        "p99 ≤ 50",
        ok,
        f"{len(lat)}/{sample_count} events, {sink.other_dead} other deaths",
    )


async def main(args: argparse.Namespace) -> None:
    sizes = [1000, 10000] if args.quick else [int(x) for x in args.sizes.split(",")]
    async with namespace("det-header") as settings:
        await header(
            "detection latency",
            settings,
            {
                "sizes": sizes,
                "samples": args.samples,
                "bulk interval_ms": BULK_INTERVAL_MS,
                "sample interval_ms": SAMPLE_INTERVAL_MS,
                "misses": 3,
                "aggregators": 1,
                "clock": "Redis time vs wall clock of the same machine",
            },
        )
    rows = [await one_size(n, args.samples, args.profile) for n in sizes]
    emit(rows, args.json)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--samples", type=int, default=150)
    parser.add_argument("--role", choices=["bench", "bulk"], default="bench")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    cli = parser.parse_args()
    if cli.role == "bulk":
        run(bulk_main(Settings.from_env(), cli.first, cli.count))
    else:
        run(main(cli))
