"""Ingest: heartbeats/s that aggregator processes turn into Redis state.

Three measurements in one run, on one broker, in a private namespace:

1. **Backlog.** N heartbeats of M instances (typical meta) are published while nothing
   consumes; every one goes to the aggregator queue and to two more queues. A do-nothing
   aio-pika consumer and a do-nothing aiormq consumer (prefetch 2000, ack multiple) drain
   those; then one ``hbbus aggregator`` process drains the real queue; then the same again
   for a fresh service with two aggregator processes. Rates are counted from the first
   heartbeat applied (the aggregator's Prometheus counter) to the last.
2. **Steady state.** A publisher process sends at a fixed rate for a few seconds while one
   aggregator process consumes. The consumer kept up when, 0.1 s after the publisher
   stopped, its own count is short of what was sent by at most 0.1 s worth + 200 (what it
   holds unacked counts as behind). Rates go up a ladder; the result is the rate the
   publisher reached at the highest step the consumer kept up with. The ladder stops when
   the consumer falls behind, or when the publisher, sharing the cores with it, reaches less
   than 90 % of a step (higher steps would only measure the publisher). The same ladder is
   run with a do-nothing aiormq consumer process.
3. **CPU per heartbeat at steady state.** One aggregator process, the publisher at a fixed
   rate (3,000/s) over the same instances for 10 s after they joined: the process's CPU time
   (``/proc/<pid>/stat``) over the heartbeats it applied, with ``--linger-ms`` at its default
   and at 0 (apply what is in hand at once), alternating ``--cpu-rounds`` times.

    .venv/bin/python bench/ingest.py [--quick] [--heartbeats 50000] [--instances 5000]
        [--cpu-rounds 1] [--cpu-only] [--backlog-only]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

import aio_pika
import aiormq
from common import (
    TYPICAL_META,
    Proc,
    RawPublisher,
    Row,
    applied,
    beat_body,
    common_args,
    cpu_seconds,
    declare,
    emit,
    free_port,
    header,
    namespace,
    profiled,
    queue_depth,
    run,
    scrape,
    spawn,
    spawn_aggregator,
    wait_ready,
)

from hbbus.names import Names
from hbbus.settings import Settings
from hbbus.workers.aggregator import AggregatorConfig, delivery_tag

PREFETCH = 2000
DRAIN_TIMEOUT_S = 600  # a drain that takes longer has lost messages, or its consumer
ACK_EVERY = 500
#: the steady publisher's declared interval: longer than an instance's gap between beats at
#: the ladder's lowest rate (5,000 instances at 1,000/s: 5 s), so no instance goes suspect or
#: dead between its beats and the aggregator does the work of steady heartbeats only
STEADY_INTERVAL_MS = 20_000
#: a ladder step the publisher reaches less than this share of: the cores are full
FELL_SHORT = 0.9
CPU_RATE, CPU_SECONDS = 3000, 10.0
LADDER_RATES = (*range(1000, 12_001, 1000), *range(14_000, 20_001, 2000), 24_000, 28_000, 32_000)


async def publish_backlog(
    settings: Settings, service: str, n: int, instances: int, queues: Sequence[str]
) -> None:
    meta_of = [
        {**TYPICAL_META, "endpoint": f"10.0.{k // 256}.{k % 256}:8080"} for k in range(instances)
    ]
    async with RawPublisher(settings) as pub:
        for i in range(n):
            k = i % instances
            await pub.send(service, f"i{k}", beat_body(service, k, i // instances + 1, meta_of[k]))
    deadline = time.monotonic() + 60
    for queue in queues:
        while (depth := await queue_depth(settings, queue)) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{queue} holds {depth} of the {n} heartbeats published")
            await asyncio.sleep(0.05)


async def drain_aio_pika(settings: Settings, queue_name: str, n: int) -> float:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(queue_name)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            seen += 1
            if seen % ACK_EVERY == 0 or seen == n:
                await message.ack(multiple=True)
            if seen == n:
                done.set()

        start = time.perf_counter()
        await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), DRAIN_TIMEOUT_S)
        return time.perf_counter() - start


async def drain_aiormq(settings: Settings, queue_name: str, n: int) -> float:
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=PREFETCH)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal seen
            seen += 1
            if seen % ACK_EVERY == 0 or seen == n:
                await channel.basic_ack(delivery_tag(message), multiple=True)
            if seen == n:
                done.set()

        start = time.perf_counter()
        await channel.basic_consume(queue_name, on_message)
        await asyncio.wait_for(done.wait(), DRAIN_TIMEOUT_S)
        return time.perf_counter() - start
    finally:
        await connection.close()


async def delete_queues(settings: Settings, *queues: str) -> None:
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
    finally:
        await connection.close()


async def drain_aggregators(
    settings: Settings, n: int, procs: int, profile: str | None, *extra: str
) -> float:
    """Seconds from the first heartbeat applied to the last, by ``procs`` processes."""
    base = 0
    aggs = [spawn_aggregator(settings, *extra) for _ in range(procs)]
    try:
        await wait_ready(aggs)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S

        def alive() -> None:  # applied() says 0 when an aggregator is gone: do not spin on it
            if any(agg.popen.poll() is not None for agg in aggs):
                raise RuntimeError("an aggregator exited during the drain")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not drained within {DRAIN_TIMEOUT_S} s")

        with profiled(aggs[0].pid, profile):
            while (first := await applied(aggs)) == 0:
                alive()
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            # Scraping costs the aggregator (a py-spy profile: the metrics thread took a fifth
            # of its CPU when scraped every 50 ms), so poll seldom while far from the end and
            # often near it: sleep 80 % of the time the rest should take at the rate so far.
            while (done := await applied(aggs)) < n:
                alive()
                rate = max(done - first, 1) / max(time.perf_counter() - start, 1e-3)
                await asyncio.sleep(min(max(0.8 * (n - done) / rate, 0.01), 0.5))
            elapsed = time.perf_counter() - start
        base = first
    finally:
        for agg in aggs:
            agg.stop()
    return elapsed * n / max(1, n - base)  # the first poll missed `base` heartbeats


async def backlog(settings: Settings, n: int, instances: int, profile: str | None) -> list[Row]:
    names = Names(settings.namespace)
    pika_q, rmq_q = f"{settings.namespace}.null", f"{settings.namespace}.null2"
    await declare(settings, pika_q)
    await declare(settings, rmq_q)
    await publish_backlog(settings, "b1", n, instances, [names.aggregator_queue, pika_q, rmq_q])
    pika_s = await drain_aio_pika(settings, pika_q, n)
    rmq_s = await drain_aiormq(settings, rmq_q, n)
    await delete_queues(settings, pika_q, rmq_q)  # else they keep a copy of every later beat
    one_s = await drain_aggregators(settings, n, 1, profile)
    await publish_backlog(settings, "b2", n, instances, [names.aggregator_queue])
    two_s = await drain_aggregators(settings, n, 2, None)
    print(f"  {'from a backlog of ' + str(n):<34}{'seconds':>9}{'msgs/s':>10}")
    for what, secs in (
        ("do-nothing aio-pika consumer", pika_s),
        ("do-nothing aiormq consumer", rmq_s),
        ("one aggregator process", one_s),
        ("two aggregator processes", two_s),
    ):
        print(f"  {what:<34}{secs:>9.2f}{n / secs:>10.0f}")
    one, pika, rmq = n / one_s, n / pika_s, n / rmq_s
    return [
        Row(
            "ingest",
            "backlog: one aggregator, heartbeats/s",
            f"{one:,.0f}",
            "≥ 10,000",
            one >= 10_000,
        ),
        Row("ingest", "backlog: do-nothing aio-pika / aiormq, msgs/s", f"{pika:,.0f} / {rmq:,.0f}"),
        Row(
            "ingest",
            "backlog: ratio to do-nothing aio-pika",
            f"{one / pika:.2f}",
            "≥ 0.8",
            one / pika >= 0.8,
        ),
        Row("ingest", "backlog: ratio to do-nothing aiormq", f"{one / rmq:.2f}", "(stricter)"),
        Row("ingest", "backlog: two aggregator processes, heartbeats/s", f"{n / two_s:,.0f}"),
    ]


# -- steady state --------------------------------------------------------------------------
async def publisher_main(
    settings: Settings, rate: int, seconds: float, instances: int, first_seq: int
) -> None:
    """The publisher process: ``rate`` heartbeats/s round-robin over ``instances`` for
    ``seconds`` (``rate * seconds`` of them, each written when the schedule says, in chunks
    every 2 ms), their seq counting up from ``first_seq`` (each step of the ladder goes on from
    the last, so the aggregator does not see them as stale). Prints how many it sent and the
    seconds until the last was written."""
    bodies = [
        beat_body(
            "steady",
            k,
            1,
            {**TYPICAL_META, "endpoint": f"10.1.{k // 256}.{k % 256}:80"},
            interval_ms=STEADY_INTERVAL_MS,
        )
        for k in range(instances)
    ]
    seq_marker = b'"seq":1,'
    total = int(rate * seconds)
    sent, start = 0, time.perf_counter()
    async with RawPublisher(settings) as pub:
        while sent < total:
            due = min(total, int(rate * (time.perf_counter() - start)))
            while sent < due:
                k = sent % instances
                seq = first_seq + sent // instances
                body = bodies[k].replace(seq_marker, b'"seq":%d,' % seq, 1)
                await pub.send("steady", f"i{k}", body)
                sent += 1
            await pub.push()
            if sent < total:
                await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - start  # until the last heartbeat was written
    print(f"{sent} {elapsed:.3f}", flush=True)


async def null_consumer_main(settings: Settings, metrics_port: int) -> None:
    """A do-nothing aiormq consumer process of the aggregator queue (until SIGTERM). It
    counts what it consumed in ``hbbus_heartbeats_total`` on ``metrics_port``, as the
    aggregator counts what it applied, so the ladder judges both by the same counter."""
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()  # hbbus.metrics has the name too
    consumed = prometheus_client.Counter("hbbus_heartbeats", "consumed", registry=registry)
    prometheus_client.start_http_server(metrics_port, "127.0.0.1", registry=registry)
    connection = await aiormq.connect(settings.amqp_url)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=PREFETCH)
    seen = 0

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        nonlocal seen
        seen += 1
        consumed.inc()
        if seen % ACK_EVERY == 0:
            await channel.basic_ack(delivery_tag(message), multiple=True)

    await channel.basic_consume(Names(settings.namespace).aggregator_queue, on_message)
    await asyncio.Event().wait()


async def one_rate(
    settings: Settings,
    consumer: Proc,
    rate: int,
    seconds: float,
    instances: int,
    first_seq: int,
) -> tuple[bool, float, int]:
    """(kept up, rate the publisher reached, heartbeats sent). Kept up: 0.1 s after the
    publisher stopped the consumer had taken all it sent but 0.1 s worth + 200 (counted by
    the consumer, so the messages it holds unacked, up to the prefetch, count as behind)."""
    before = await applied([consumer])
    pub = spawn_publisher(settings, rate, seconds, instances, first_seq)
    sent, elapsed = await published(pub, seconds)
    await asyncio.sleep(0.1)
    behind = sent - (await applied([consumer]) - before)
    reached = sent / elapsed
    kept_up = behind <= 0.1 * rate + 200
    note = "kept up" if kept_up else "BEHIND"
    if reached < FELL_SHORT * rate:
        note += " (the publisher fell short: the cores are full)"
    print(
        f"    rate {rate:>6}/s: publisher reached {reached:>7.0f}/s, behind at end {behind:>6}: "
        f"{note}",
        flush=True,
    )
    return kept_up, reached, sent


def spawn_publisher(
    settings: Settings, rate: int, seconds: float, instances: int, first_seq: int
) -> Proc:
    args = ["--role", "publisher", "--rate", str(rate), "--seconds", str(seconds)]
    args += ["--instances", str(instances), "--first-seq", str(first_seq)]
    return spawn([__file__, *args], settings, pipe=True)


async def ladder(
    settings: Settings, consumer: Proc, rates: Sequence[int], seconds: float, instances: int
) -> float:
    """The highest rate the publisher reached with the consumer keeping up. The ladder stops
    when the consumer falls behind, or when the publisher, sharing the two cores with it,
    reaches less than 90 % of a step (higher steps would only measure the publisher)."""
    best, seq = 0.0, 1
    try:
        await asyncio.sleep(1.0)
        for rate in rates:
            kept_up, reached, sent = await one_rate(
                settings, consumer, rate, seconds, instances, seq
            )
            seq += sent // instances + 1
            if not kept_up:
                break
            best = max(best, reached)
            if reached < FELL_SHORT * rate:
                break
            await asyncio.sleep(0.5)
    finally:
        consumer.stop()
    await purge(settings)
    return best


async def purge(settings: Settings) -> None:
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await channel.queue_purge(Names(settings.namespace).aggregator_queue)
    finally:
        await connection.close()


async def steady(settings: Settings, quick: bool) -> list[Row]:
    seconds, instances = (3.0, 2000) if quick else (6.0, 5000)
    await declare(settings)
    print(f"  steady state ({seconds:g} s per rate, {instances} instances), one aggregator:")
    agg = spawn_aggregator(settings)
    await wait_ready([agg])
    agg_best = await ladder(settings, agg, LADDER_RATES, seconds, instances)
    print("  steady state, do-nothing aiormq consumer process:")
    port = free_port()
    null = spawn([__file__, "--role", "null", "--metrics-port", str(port)], settings, port)
    await wait_ready([null])
    null_best = await ladder(settings, null, LADDER_RATES, seconds, instances)
    ratio = agg_best / null_best if null_best else 0.0
    return [
        Row(
            "ingest",
            "steady: one aggregator sustains, heartbeats/s",
            f"{agg_best:,.0f}",
            "≥ 10,000",
            agg_best >= 10_000,
            "publisher's rate, consumer kept up",
        ),
        Row("ingest", "steady: do-nothing aiormq process sustains, msgs/s", f"{null_best:,.0f}"),
        Row("ingest", "steady: ratio to do-nothing", f"{ratio:.2f}", "≥ 0.8", ratio >= 0.8),
    ]


async def published(pub: Proc, seconds: float) -> tuple[int, float]:
    """What a publisher process of ``seconds`` sent, and in how long, once it has finished."""
    out, _ = await asyncio.to_thread(pub.popen.communicate, timeout=seconds + 60)
    sent, elapsed = out.split()
    return int(sent), float(elapsed)


async def applied_all(agg: Proc, count: int, joined: int = 0, timeout_s: float = 60) -> None:
    """Until the aggregator has applied ``count`` heartbeats in all and published ``joined``
    joined events (it publishes them in the background, after it counted their heartbeats)."""
    deadline = time.monotonic() + timeout_s
    joined_metric = 'hbbus_events_published_total{kind="joined"}'
    while await applied([agg]) < count or await scrape(agg.metrics_port, joined_metric) < joined:
        if time.monotonic() > deadline or agg.popen.poll() is not None:
            raise RuntimeError(
                f"the aggregator did not apply {count} heartbeats "
                f"and publish {joined} joined events"
            )
        await asyncio.sleep(0.05)


async def cpu_per_heartbeat(linger_ms: float, instances: int) -> float:
    """µs of one aggregator process's CPU per heartbeat applied at CPU_RATE heartbeats/s."""
    async with namespace("ingest-cpu") as settings:
        await declare(settings)
        agg = spawn_aggregator(settings, "--linger-ms", str(linger_ms))
        try:
            await wait_ready([agg])
            join = spawn_publisher(settings, CPU_RATE, 3, instances, 1)  # every instance joins
            joins, _ = await published(join, 3)
            await applied_all(agg, joins, joined=instances)
            applied0, cpu0 = await applied([agg]), cpu_seconds(agg.pid)
            pub = spawn_publisher(settings, CPU_RATE, CPU_SECONDS, instances, 1000)
            beats, _ = await published(pub, CPU_SECONDS)
            await applied_all(agg, applied0 + beats)
            cpu_us = (cpu_seconds(agg.pid) - cpu0) * 1e6 / max(1, beats)
        finally:
            agg.stop()
    print(
        f"    --linger-ms {linger_ms:g}: {beats} heartbeats, {cpu_us:.0f} µs CPU each", flush=True
    )
    return cpu_us


async def cpu(rounds: int, instances: int) -> list[Row]:
    default = AggregatorConfig().linger_ms
    print(f"  aggregator CPU per heartbeat at {CPU_RATE}/s, {instances} instances:")
    spent: dict[float, list[float]] = {default: [], 0.0: []}
    for _ in range(rounds):
        for linger_ms in spent:
            spent[linger_ms].append(await cpu_per_heartbeat(linger_ms, instances))
    return [
        Row(
            "ingest",
            f"steady: aggregator CPU per heartbeat at {CPU_RATE:,}/s, µs (--linger-ms {lm:g})",
            f"{sum(v) / len(v):.0f}",
        )
        for lm, v in spent.items()
    ]


async def main(args: argparse.Namespace) -> None:
    n, instances = (20_000, 2_000) if args.quick else (args.heartbeats, args.instances)
    async with namespace("ingest") as settings:  # dropped afterwards, queues and all
        await header(
            "ingest",
            settings,
            {
                "heartbeats": n,
                "instances": instances,
                "prefetch": PREFETCH,
                "ack_every": ACK_EVERY,
                "meta": "endpoint, role, zone, version",
                "aggregator": "python -m hbbus.cli aggregator",
                "steady interval_ms": STEADY_INTERVAL_MS,
                "ladder rates/s": ",".join(map(str, LADDER_RATES)),
                "ladder stops below share of a step": FELL_SHORT,
                "cpu rate/s, seconds, rounds": f"{CPU_RATE}, {CPU_SECONDS:g}, {args.cpu_rounds}",
            },
        )
        if args.cpu_only:
            emit(await cpu(args.cpu_rounds, instances), args.json)
            return
        rows = await backlog(settings, n, instances, args.profile)
        if args.backlog_only:
            emit(rows, args.json)
            return
    # steady state in a namespace of its own: the backlog's instances would go suspect and
    # dead under the steady aggregator
    async with namespace("ingest-steady") as settings:
        rows += await steady(settings, args.quick)
    rows += await cpu(args.cpu_rounds, instances)
    emit(rows, args.json)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--heartbeats", type=int, default=50_000)
    parser.add_argument("--instances", type=int, default=5_000)
    parser.add_argument("--role", choices=["bench", "publisher", "null"], default="bench")
    parser.add_argument("--rate", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0)
    parser.add_argument("--first-seq", type=int, default=1)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--cpu-rounds", type=int, default=1, help="A/B pairs of measurement 3")
    parser.add_argument("--cpu-only", action="store_true", help="measurement 3 alone")
    parser.add_argument("--backlog-only", action="store_true", help="measurement 1 alone")
    cli = parser.parse_args()
    if cli.role == "publisher":
        run(
            publisher_main(Settings.from_env(), cli.rate, cli.seconds, cli.instances, cli.first_seq)
        )
    elif cli.role == "null":
        run(null_consumer_main(Settings.from_env(), cli.metrics_port))
    else:
        run(main(cli))
