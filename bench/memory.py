"""Redis memory per tracked instance.

Starts a private ``redis-server`` on a free port (``--save "" --appendonly no``), applies one
heartbeat each for N instances (typical meta) through the store's real ingest script, lets
their ``joined`` events be published (finalised, as an aggregator would), then a second round
of heartbeats (steady state), and reports ``INFO memory`` used_memory after minus before,
divided by N, with MEMORY USAGE summed by kind of key. The server is stopped afterwards.

    .venv/bin/python bench/memory.py [--quick] [--instances 100000] [--listpack-value N]

It measures twice: with ``hash-max-listpack-value 1024`` (what ``compose/`` sets and ``hbbus
doctor`` advises: the buckets of packed records, values longer than Redis' default 64 bytes,
stay in the compact listpack encoding) and with Redis' defaults (hashtable buckets).
``--listpack-value N`` measures once, with N (0: the default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator

from common import TYPICAL_META, Row, common_args, emit, free_port, machine, run

from hbbus.ops import LISTPACK_VALUE
from hbbus.settings import Settings
from hbbus.store import Store, decode_record, encode_record
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


async def breakdown(store: Store, n: int) -> dict[str, int]:
    """MEMORY USAGE (every element counted) summed by kind of key, per instance."""
    prefix = store.names.key_prefix
    totals: dict[str, int] = {}
    pattern = prefix.replace("{", "\\{").replace("}", "\\}") + "*"
    async for key in store.redis.scan_iter(match=pattern, count=1000):
        rest = key[len(prefix) :]
        kind = "records (buckets)" if rest.startswith("r:") else rest.split(":")[0]
        used = await store.redis.memory_usage(key, samples=0) or 0
        totals[kind] = totals.get(kind, 0) + used
    return {k: round(v / n) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v >= n}


async def fill(store: Store, n: int, seq: int) -> None:
    batch = beats(n, seq)
    for i in range(0, n, BATCH):
        _, events = await store.ingest(batch[i : i + BATCH], "bench", 0)
        await store.finalize(e.id for e in events)


async def measure(n: int, listpack_value: int) -> Row:
    """One private server, ``hash-max-listpack-value`` as given (0: Redis' default)."""
    extra = ("--hash-max-listpack-value", str(listpack_value)) if listpack_value else ()
    async with private_redis(*extra) as url:
        settings = Settings(redis_url=url, namespace="bench-memory")
        store = Store.from_settings(settings)
        for _ in range(50):
            with contextlib.suppress(OSError, Exception):
                await store.redis.ping()
                break
            await asyncio.sleep(0.1)
        info = await store.redis.info("server")
        print(f"\nversions: private redis-server {info['redis_version']} on {url}")
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
        sample = names.bucket_key("api", "api-7")
        usage = await breakdown(store, n)
        packed: str = await store.redis.hget(sample, "api/api-7")  # type: ignore[assignment]
        print(f"  used_memory before {before:,} after {after:,}: {per:,.0f} bytes per instance")
        print(f"  MEMORY USAGE per instance, by kind of key: {usage}")
        print(
            f"  one bucket: {await store.redis.hlen(sample)} records, encoding "
            f"{await store.redis.object('encoding', sample)}; one packed record "
            f"{len(packed)} bytes, {aged(packed)} once its instance has been up a day"
        )
        await store.close()
    setting = f"hash-max-listpack-value {listpack_value}" if listpack_value else "Redis defaults"
    return Row(
        "memory",
        f"Redis bytes per tracked instance ({n:,}), {setting}",
        f"{per:,.0f}",
        "≤ 300",
        per <= 300,
    )


def aged(packed: str) -> int:
    """The size of this packed record had its instance joined a day earlier: the distances
    kept from the last heartbeat (see rec_pack) grow with an instance's age."""
    row = decode_record("api/api-7", packed)
    day = 86_400_000
    for name in ("first", "since", "ord"):
        row[name] = str(int(row[name]) - day)
    return len(encode_record(row))


async def main(args: argparse.Namespace) -> None:
    n = 10_000 if args.quick else args.instances
    print("== Redis memory per tracked instance")
    print(f"machine: {machine()}")
    settings = [args.listpack_value] if args.listpack_value is not None else [LISTPACK_VALUE, 0]
    emit([await measure(n, value) for value in settings], args.json)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument(
        "--listpack-value",
        type=int,
        default=None,
        help="only this hash-max-listpack-value (0: Redis' default); by default both "
        f"{LISTPACK_VALUE} (what compose/ and `hbbus doctor` advise) and the default",
    )
    run(main(parser.parse_args()))
