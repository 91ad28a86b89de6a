"""Failover time: from `kill -9` of a Redis primary to a replica promoted and routable.

Three real redis-servers (a primary, two replicas), a `hbbus sidecar redis` process for each,
one `hbbus aggregator` process and two `hbbus failover run --redis-promote` processes in one
group. Each round kills the current primary with SIGKILL and times, on this process's clock:

- kill -> `dead` event, kill -> `promoted` event, kill -> a Router sees the new primary;
- deadline -> routable: from the old primary's deadline (its last heartbeat + TTL, Redis time,
  same machine) to routable — what hbbus adds to the TTL itself.

Then the old primary is restarted (empty) and the next round starts once it is a routable
replica again. Prints the machine, versions and parameters with the result.

    .venv/bin/python bench/failover.py [--rounds 5] [--interval 0.5] [--misses 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import Row, common_args, emit, fresh_settings, header, run

from hbbus.routing import NoRoute, Router
from tests.helpers import EventSink, drop_namespace, wait_until
from tests.servers import FAST_SYNC, PrivateRedis, RedisGroup


def primary_of(router: Router) -> str:
    try:
        return router.primary().instance
    except NoRoute:
        return ""


async def one_round(group: RedisGroup, router: Router, sink: EventSink) -> dict[str, float]:
    old = primary_of(router)
    seen = len(sink.events)
    killed = time.time()
    group.servers[old].proc.kill()  # type: ignore[union-attr]
    await wait_until(lambda: primary_of(router) not in ("", old), 30, "a new primary", 0.005)
    routable = time.time()
    await wait_until(lambda: any(e["kind"] == "promoted" for e in sink.events[seen:]), 10)
    events = sink.events[seen:]
    arrivals = sink.arrivals[seen:]
    dead_i = next(i for i, e in enumerate(events) if e["kind"] == "dead")
    promoted_i = next(i for i, e in enumerate(events) if e["kind"] == "promoted")
    dead = events[dead_i]
    deadline = (dead["last_seen_ms"] + dead["ttl_ms"]) / 1000
    # the old primary comes back empty; wait until it is a routable replica again
    port = group.servers[old].port
    group.servers[old] = PrivateRedis(port, FAST_SYNC).start()
    await router.wait_for(lambda t: t.entries.get(old) is not None and t.entries[old].routable, 60)
    return {
        "kill->dead": arrivals[dead_i] - killed,
        "kill->promoted": arrivals[promoted_i] - killed,
        "kill->routable": routable - killed,
        "deadline->routable": routable - deadline,
    }


async def main(args: argparse.Namespace) -> None:
    settings = fresh_settings("fo")
    ttl_s = args.interval * args.misses
    rounds = 3 if args.quick else args.rounds
    await header(
        "failover time (bench/failover.py)",
        settings,
        {
            "rounds": rounds,
            "sidecar interval": f"{args.interval}s x {args.misses} misses (TTL {ttl_s:g}s)",
            "servers": "3 redis-servers, 1 aggregator (flap damping off), 2 failover workers",
        },
    )
    logs = Path(tempfile.mkdtemp(prefix="hbbus-bench-failover-"))
    group = RedisGroup(settings, logs, args.interval)
    sink = await EventSink(settings, "#").start()
    rows: list[dict[str, float]] = []
    try:
        group.start_servers()
        # the rounds kill the same servers again and again, which flap damping would (rightly)
        # hold back for 30 s: it is switched off here
        group.spawn("aggregator", "aggregator", "--flap-max", "1000")
        group.start_worker("worker-a")
        group.start_worker("worker-b")
        await group.workers_consuming("worker-a", "worker-b")
        for name in ("r1", "r2", "r3"):
            group.start_sidecar(name, misses=args.misses)
        async with Router("db", settings=settings) as router:
            ok = await router.wait_for(
                lambda t: t.primary == "r1" and len(t.routable("replica")) == 2, 30
            )
            if not ok:
                raise SystemExit(f"the group never became routable; logs in {logs}")
            for n in range(rounds):
                row = await one_round(group, router, sink)
                rows.append(row)
                print(
                    f"round {n + 1}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in row.items())
                )
        promotions = sum(1 for e in sink.events if e["kind"] == "promoted")
    finally:
        await sink.close()
        group.stop()
        await drop_namespace(settings, [f"{settings.namespace}.failover.db"])
    print(f"\n{'what':<22}{'p50 ms':>9}{'max ms':>9}")
    for key in rows[0]:
        values = [r[key] * 1000 for r in rows]
        print(f"{key:<22}{statistics.median(values):>9.0f}{max(values):>9.0f}")
    print(f"promoted events: {promotions} for {rounds} kills (two workers in the group)")
    routable = [r["kill->routable"] * 1000 for r in rows]
    beyond = [r["deadline->routable"] * 1000 for r in rows]
    emit(
        [
            Row(
                "failover",
                f"kill -9 of the primary -> promoted, routable (TTL {ttl_s:g}s): p50/max ms",
                f"{statistics.median(routable):.0f}/{max(routable):.0f}",
                note=f"{promotions} promotions for {rounds} kills",
            ),
            Row(
                "failover",
                "  of which after the primary's deadline: p50/max ms",
                f"{statistics.median(beyond):.0f}/{max(beyond):.0f}",
            ),
        ],
        args.json,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--misses", type=int, default=3)
    common_args(parser)
    run(main(parser.parse_args()))
