"""Redis memory per tracked instance.

Starts a private ``redis-server`` on a free port (``--save "" --appendonly no``), applies one
heartbeat each for N instances (typical meta) through the store's real ingest script, lets
their ``joined`` events be published (finalised, as an aggregator would), then a second round
of heartbeats (steady state), and reports ``INFO memory`` used_memory after minus before,
divided by N, with MEMORY USAGE of one instance's keys. The server is stopped afterwards.

    .venv/bin/python bench/memory.py [--quick] [--instances 100000] [--listpack-value 256]

``--listpack-value N`` starts the server with ``hash-max-listpack-value N``: a record whose
meta JSON is longer than Redis' default 64 bytes is then still stored in the compact listpack
encoding.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator

from common import TYPICAL_META, Row, common_args, emit, free_port, machine, run

from hbbus.settings import Settings
from hbbus.store import Store
from hbbus.wire import Heartbeat

BATCH = 1000


@contextlib.asynccontextmanager
async def private_redis(*extra: str) -> AsyncIterator[str]:
    port = free_port()
    args = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def beats(n: int, seq: int) -> list[tuple[Heartbeat, int, int]]:
    out = []
    for k in range(n):
        meta = {**TYPICAL_META, "endpoint": f"10.{k // 65536}.{k // 256 % 256}.{k % 256}:8080"}
        beat = Heartbeat("api", f"api-{k}", "19a4c2f1e0b-3f9a1c2d", seq, 10_000, 3, 0, "ok", meta)
        out.append((beat, 10_000, 30_000))
    return out


async def used(store: Store) -> int:
    return int((await store.redis.info("memory"))["used_memory"])


async def fill(store: Store, n: int, seq: int) -> None:
    batch = beats(n, seq)
    for i in range(0, n, BATCH):
        _, events = await store.ingest(batch[i : i + BATCH], "bench", 0)
        await store.finalize(e.id for e in events)


async def main(args: argparse.Namespace) -> None:
    n = 10_000 if args.quick else args.instances
    extra = ("--hash-max-listpack-value", str(args.listpack_value)) if args.listpack_value else ()
    async with private_redis(*extra) as url:
        settings = Settings(redis_url=url, namespace="bench-memory")
        store = Store.from_settings(settings)
        for _ in range(50):
            with contextlib.suppress(OSError, Exception):
                await store.redis.ping()
                break
            await asyncio.sleep(0.1)
        info = await store.redis.info("server")
        print("== Redis memory per tracked instance")
        print(f"machine: {machine()}")
        print(f"versions: private redis-server {info['redis_version']} on {url}")
        print(
            f"parameters: instances={n}, meta={TYPICAL_META}, batches of {BATCH}, "
            f"server options: {' '.join(extra) or 'defaults'}"
        )
        await store.ingest([], "bench", 0)  # the namespace's fixed keys
        before = await used(store)
        await fill(store, n, 1)
        await fill(store, n, 2)
        after = await used(store)
        per = (after - before) / n
        names = store.names
        sample = {
            "inst": names.record_key("api", "api-7"),
            "meta": names.meta_key("api", "api-7"),
            "alive": names.alive_key("api", "api-7"),
            "history": names.history_key("api", "api-7"),
        }
        usage = {k: await store.redis.memory_usage(v) for k, v in sample.items()}
        print(f"  used_memory before {before:,} after {after:,}: {per:,.0f} bytes per instance")
        print(f"  MEMORY USAGE of one instance's own keys: {usage}")
        print(f"  record encoding: {await store.redis.object('encoding', sample['inst'])}")
        await store.close()
    emit(
        [
            Row(
                "memory",
                f"Redis bytes per tracked instance ({n:,})"
                + (f", hash-max-listpack-value {args.listpack_value}" if extra else ""),
                f"{per:,.0f}",
                "≤ 300",
                per <= 300,
            )
        ],
        args.json,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--listpack-value", type=int, default=0, help="hash-max-listpack-value")
    run(main(parser.parse_args()))
