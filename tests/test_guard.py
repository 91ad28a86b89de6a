"""The mass-expiry guard end to end: a burst of deaths is held as one `mass-expiry` event and
released by the operator, each death once."""

from __future__ import annotations

import asyncio
import os
import sys

import orjson

from hbbus.store import Store
from tests.helpers import start_fleet, wait_until


async def hbbus(settings, *args: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "HBBUS_AMQP_URL": settings.amqp_url,
        "HBBUS_REDIS_URL": settings.redis_url,
        "HBBUS_NAMESPACE": settings.namespace,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hbbus.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_ten_stop_at_once_one_mass_expiry_then_release(settings, aggregators, sink):
    await aggregators(2)
    burst = await start_fleet(settings, "api", 10, 0.2, 3)
    calm = await start_fleet(settings, "db", 2, 0.2, 3)
    await sink.wait_for("joined", count=12, timeout_s=10)
    await asyncio.gather(*(b.abort() for b in burst))
    mass = await sink.wait_for("mass-expiry", timeout_s=10)
    await asyncio.sleep(1.5)  # well past every TTL: still nothing may be published
    assert sink.of("dead") == []
    assert len(sink.of("mass-expiry")) == 1
    assert mass[0]["scope"] == "service:api"
    assert sorted(mass[0]["instances"]) == sorted(f"api/{b.instance}" for b in burst)

    code, out = await hbbus(settings, "guard", "status", "--json")
    assert code == 0, out
    [tripped] = orjson.loads(out)
    assert tripped["scope"] == "service:api" and len(tripped["held"]) == 10

    code, out = await hbbus(settings, "guard", "release", "api")
    assert code == 0 and out.startswith("released 10 dead events"), out
    dead = await sink.wait_for("dead", count=10, timeout_s=10)
    await asyncio.sleep(0.5)
    assert sorted(e["instance"] for e in sink.of("dead")) == sorted(b.instance for b in burst)
    assert len({e["id"] for e in dead}) == 10 and all(e["prev"] == "held" for e in dead)
    code, out = await hbbus(settings, "guard", "release", "api")
    assert code == 3 and "nothing is held" in out
    for b in calm:
        await b.stop()


async def test_held_deaths_are_dropped_when_the_instances_come_back(settings, aggregators, sink):
    await aggregators(1)
    burst = await start_fleet(settings, "web", 4, 0.2, 3)
    await sink.wait_for("joined", count=4, timeout_s=10)
    await asyncio.gather(*(b.abort() for b in burst))
    await sink.wait_for("mass-expiry", timeout_s=10)
    back = await start_fleet(settings, "web", 4, 0.2, 3)  # new processes, same names
    store = Store.from_settings(settings)
    try:
        await wait_until(lambda: _nothing_held(store), 10, "the held deaths dropped")
    finally:
        await store.close()
    await asyncio.sleep(0.5)
    assert sink.of("dead") == [] and sink.of("recovered") == [], "quiet both ways"
    for b in back:
        await b.stop()


async def _nothing_held(store: Store) -> bool:
    return all(not g["held"] for g in await store.guard())
