"""Client cost: CPU time per heartbeat in the publishing process, and bytes per message.

Runs H real ``hbbus.Heartbeater`` objects at a short interval in this one process for a few
seconds against the real broker (a private namespace; nothing consumes, the queue is capped),
and divides the process's CPU time (``time.process_time``) by the heartbeats sent. An idle
baseline (the same process, the connections open, no heartbeats) is subtracted. The message
size is that of a real heartbeat with typical meta (endpoint, role, zone, version).

    .venv/bin/python bench/client.py [--quick] [--heartbeaters 200] [--interval 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from common import TYPICAL_META, Row, common_args, declare, emit, header, namespace, run

from hbbus.client import Heartbeater
from hbbus.settings import Settings


def message_bytes() -> tuple[int, int]:
    """The body of a real Heartbeater's heartbeat with typical meta (a fresh incarnation, a
    six-digit seq, the current time), and the bytes its publish puts on the wire: the
    Basic.Publish method, content header and body frames, as the client marshals them."""
    hb = Heartbeater("api", "api-12", interval_s=1.0, meta=dict(TYPICAL_META))
    hb.seq = 123455
    body = hb.body("ok")
    return len(body), len(hb._payload(1, body, 131_072 - 8))


async def cpu_per_beat(settings: Settings, count: int, interval_s: float, seconds: float) -> float:
    beaters = [
        Heartbeater(
            "api", f"api-{i}", interval_s=interval_s, meta=dict(TYPICAL_META), settings=settings
        )
        for i in range(count)
    ]
    await asyncio.gather(*(hb.start() for hb in beaters))
    try:
        await asyncio.sleep(1.0)  # connections settle
        sent0, dropped0 = sum(hb.sent for hb in beaters), sum(hb.dropped for hb in beaters)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        sent, cpu = sum(hb.sent for hb in beaters) - sent0, time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        dropped = sum(hb.dropped for hb in beaters) - dropped0
        # the idle cost of the same process: the same connections, no heartbeats
        for hb in beaters:
            hb.interval_s = 3600.0
        await asyncio.sleep(interval_s * 2)
        idle0 = time.process_time()
        await asyncio.sleep(seconds / 2)
        idle = (time.process_time() - idle0) * 2
    finally:
        await asyncio.gather(*(hb.stop(leave=False) for hb in beaters))
    print(
        f"  {count} Heartbeaters at {interval_s:g} s: {sent} heartbeats in {wall:.1f} s "
        f"({sent / wall:,.0f}/s, {dropped} dropped), process CPU {cpu:.2f} s, "
        f"idle baseline {idle:.2f} s"
    )
    if dropped:  # a dropped beat costs CPU but is not counted: the figure would be wrong
        raise RuntimeError(f"{dropped} heartbeats dropped: the broker did not keep up")
    return (cpu - idle) / max(sent, 1) * 1e6


async def main(args: argparse.Namespace) -> None:
    count, seconds = (100, 3.0) if args.quick else (args.heartbeaters, 6.0)
    async with namespace("client") as settings:
        await header(
            "client cost",
            settings,
            {
                "heartbeaters": count,
                "interval_s": args.interval,
                "seconds": seconds,
                "meta": TYPICAL_META,
            },
        )
        await declare(settings)
        us = await cpu_per_beat(settings, count, args.interval, seconds)
    size, wire = message_bytes()
    emit(
        [
            Row(
                "client",
                "CPU per heartbeat (real Heartbeater), µs",
                f"{us:.0f}",
                "≤ 100",
                us <= 100,
            ),
            Row(
                "client",
                "bytes per heartbeat message, typical meta",
                f"{size}",
                "≤ 200",
                size <= 200,
            ),
            Row(
                "client",
                "bytes on the wire per heartbeat (3 AMQP frames)",
                f"{wire}",
                "",
                None,
            ),
        ],
        args.json,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--heartbeaters", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.05)
    run(main(parser.parse_args()))
