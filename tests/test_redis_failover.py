"""Redis replica promotion end to end, with real processes on free ports and no fakes:
three redis-servers (a primary and two replicas), a sidecar process for each, an aggregator,
two failover worker processes in one group, and a writer that writes through a Router.

`kill -9` of the primary: one promotion (the live replica with the highest offset), the other
replica follows it, the writer resumes, every write the new primary acknowledged survives, and
the old primary, restarted empty, comes back as a replica — never as a second primary."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from hbbus.routing import NoRoute, Router
from hbbus.settings import Settings
from hbbus.store import StoreConfig
from tests.conftest import FAST
from tests.helpers import Background, EventSink, run_cli, wait_until
from tests.servers import FAST_SYNC, PrivateRedis, RedisGroup

INTERVAL_S = 0.2
TTL_S = INTERVAL_S * 3


@pytest.fixture
def group(settings: Settings, need_tool, tmp_path: Path) -> Iterator[RedisGroup]:
    need_tool("redis-server")
    g = RedisGroup(settings, tmp_path, INTERVAL_S)
    try:
        g.start_servers()
        yield g
    finally:
        g.stop()


async def replication(addr: str) -> dict[str, object]:
    host, port = addr.rsplit(":", 1)
    client = Redis(host=host, port=int(port), decode_responses=True, socket_timeout=2)
    try:
        return dict(await client.info("replication"))
    finally:
        await client.aclose()


async def follows(addr: str, primary_port: int) -> bool:
    with contextlib.suppress(RedisError, OSError):
        info = await replication(addr)
        return (
            info.get("role") == "slave"
            and int(str(info.get("master_port"))) == primary_port
            and info.get("master_link_status") == "up"
        )
    return False


class Writer(Background):
    """Writes k0, k1, … to whichever server the Router says is the primary; remembers which
    server acknowledged each key."""

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.router = router
        # (key, instance that acknowledged it, when the write was sent: monotonic seconds; a
        # reply read after a kill may answer a write sent before it)
        self.acked: list[tuple[str, str, float]] = []
        self.errors = 0
        self._clients: dict[str, Redis] = {}

    def client(self, endpoint: str) -> Redis:
        if endpoint not in self._clients:
            host, port = endpoint.rsplit(":", 1)
            self._clients[endpoint] = Redis(
                host=host, port=int(port), socket_timeout=0.5, socket_connect_timeout=0.5
            )
        return self._clients[endpoint]

    async def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                primary = self.router.primary()
            except NoRoute:
                await asyncio.sleep(0.02)
                continue
            sent_at = time.monotonic()
            try:
                await self.client(primary.endpoint).set(f"k{n}", n)
            except (RedisError, OSError):
                self.errors += 1
                await asyncio.sleep(0.05)
                continue
            self.acked.append((f"k{n}", primary.instance, sent_at))
            n += 1
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        await super().stop()
        for client in self._clients.values():
            await client.aclose()

    def by(self, instance: str) -> list[str]:
        return [key for key, who, _ in self.acked if who == instance]


@contextlib.asynccontextmanager
async def writing(settings: Settings) -> AsyncIterator[Writer]:
    async with Router("db", settings=settings) as router:
        writer = Writer(router)
        writer.start()
        try:
            yield writer
        finally:
            await writer.stop()


async def group_ready(g: RedisGroup, router_settings: Settings) -> None:
    async with Router("db", settings=router_settings) as router:
        ok = await router.wait_for(
            lambda t: t.primary == "r1" and len(t.routable("replica")) == 2, 20
        )
        assert ok, f"the group never became routable: {router.table}"


async def test_kill_primary_promotes_one_replica_and_the_old_one_returns_as_replica(
    settings, aggregators, group
):
    await aggregators(1)
    sink = await EventSink(settings, "promoted.db.*").start()
    try:
        group.start_worker("worker-a")
        group.start_worker("worker-b")
        await group.workers_consuming("worker-a", "worker-b")
        for name in ("r1", "r2", "r3"):
            group.start_sidecar(name)
        await group_ready(group, settings)
        async with writing(settings) as writer:
            await wait_until(lambda: len(writer.by("r1")) > 50, 10, "writes to r1")
            killed_at = time.monotonic()
            group.servers["r1"].proc.kill()  # type: ignore[union-attr]  # kill -9
            promoted = await sink.wait_for("promoted", timeout_s=TTL_S + 2.0)
            took = time.monotonic() - killed_at
            new = promoted[0]["instance"]
            assert new in ("r2", "r3") and promoted[0]["data"]["epoch"] == 1
            assert promoted[0]["data"]["old_primary"] == "r1"
            other = ({"r2", "r3"} - {new}).pop()
            new_port = group.servers[new].port
            await wait_until(
                lambda: follows(group.servers[other].addr, new_port), 10, f"{other} follows {new}"
            )
            await wait_until(lambda: len(writer.by(new)) > 50, 10, f"writes resume on {new}")

            # the old primary comes back empty, as a primary: demoted before it is routable
            group.servers["r1"] = PrivateRedis(group.servers["r1"].port, FAST_SYNC).start()
            await wait_until(
                lambda: follows(group.servers["r1"].addr, new_port), 15, "r1 follows the new one"
            )
            await wait_until(lambda: len(writer.by(new)) > 100, 10, "more writes")
        assert writer.by("r1") and writer.by(new)
        assert {who for _, who, _ in writer.acked} <= {"r1", new}, "a write went to a replica"
        # never a second primary: r1 acknowledged no write sent after it was killed, not even
        # after its return
        late = [
            (key, at - killed_at) for key, who, at in writer.acked if who == "r1" and at > killed_at
        ]
        assert late == [], late

        # every write the new primary acknowledged is there, on it and on the returned r1
        keys = writer.by(new)
        for name in (new, "r1"):
            await wait_until(
                lambda name=name: _has_all(group.servers[name].addr, keys), 10, f"keys on {name}"
            )
        result = await run_cli(settings, "routes", "db", "--json")
        table = __import__("orjson").loads(result.output)[0]
        entries = {e["instance"]: e for e in table["endpoints"]}
        assert table["primary"] == new and table["epoch"] == 1
        assert entries["r1"]["routable"] and entries["r1"]["role"] == "replica"
        await asyncio.sleep(2 * TTL_S)  # anything left to run twice would have by now
        assert len(sink.of("promoted")) == 1, sink.of("promoted")
        logs = group.log_of("worker-a") + group.log_of("worker-b")
        assert logs.count("starting a promotion") == 1, logs
        print(
            f"kill -9 -> promoted event {took:.2f}s (TTL {TTL_S}s); writer errors {writer.errors}"
        )
    finally:
        await sink.close()


async def _has_all(addr: str, keys: list[str]) -> bool:
    host, port = addr.rsplit(":", 1)
    client = Redis(host=host, port=int(port), socket_timeout=2)
    try:
        found = 0
        for start in range(0, len(keys), 500):
            found += await client.exists(*keys[start : start + 500])
        return found == len(keys)
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def test_a_worker_killed_half_way_is_finished_by_the_other(settings, aggregators, group):
    """Worker A dies (SIGKILL, a failpoint) right after REPLICAOF NO ONE; worker B, started
    then, resumes the same promotion: same epoch, same candidate, one `promoted`."""
    await aggregators(1)
    sink = await EventSink(settings, "promoted.db.*").start()
    try:
        worker_a = group.start_worker("worker-a", HBBUS_FAILPOINTS="promote:after-replicaof")
        await group.workers_consuming("worker-a")
        for name in ("r1", "r2", "r3"):
            group.start_sidecar(name)
        await group_ready(group, settings)
        group.servers["r1"].proc.kill()  # type: ignore[union-attr]
        await wait_until(lambda: worker_a.poll() is not None, 15, "worker A to die half way")
        assert worker_a.returncode == -9
        assert "failpoint promote:after-replicaof armed" in group.log_of("worker-a")
        infos = {n: await replication(group.servers[n].addr) for n in ("r2", "r3")}
        chosen = [n for n, info in infos.items() if info["role"] == "master"]
        assert len(chosen) == 1, infos  # A did REPLICAOF NO ONE on one replica, then died

        group.start_worker("worker-b")
        promoted = await sink.wait_for("promoted", timeout_s=30)
        assert promoted[0]["instance"] == chosen[0] and promoted[0]["data"]["epoch"] == 1
        assert "resuming the promotion" in group.log_of("worker-b")
        other = ({"r2", "r3"} - {chosen[0]}).pop()
        new_port = group.servers[chosen[0]].port
        await wait_until(lambda: follows(group.servers[other].addr, new_port), 10, "follower")
        await asyncio.sleep(1)  # a window for a second promotion to show (there must be none)
        assert len(sink.of("promoted")) == 1
    finally:
        await sink.close()


async def test_a_promotion_given_up_is_finished_when_a_replica_returns(
    settings, aggregators, group
):
    """Both replicas' hosts go silent (their sidecars are killed: two `dead`), then the
    primary dies: with no live replica the promotion gives up, and with no retries its `dead`
    goes to the dead-letter queue, so nothing but a returning member can finish it. When r2's
    sidecar comes back, its `recovered` finishes the promotion: r2 becomes the primary, in
    Redis and in routing, with one `promoted`. (The mass-expiry guard is set off: three of
    three members dying within its window is what it exists to hold back.)"""
    await aggregators(1, dataclasses.replace(FAST, store=StoreConfig(lease_ms=1500, mass_min=10)))
    sink = await EventSink(settings, "promoted.db.*").start()
    deaths = await EventSink(settings, "dead.db.*").start()
    try:
        group.start_worker("worker-a", "--max-retries", "0")
        await group.workers_consuming("worker-a")
        for name in ("r1", "r2", "r3"):
            group.start_sidecar(name)
        await group_ready(group, settings)
        for name in ("r2", "r3"):
            group.procs[f"sidecar-{name}"].kill()
        await deaths.wait_for("dead", count=2, timeout_s=TTL_S + 5)
        group.servers["r1"].proc.kill()  # type: ignore[union-attr]  # kill -9
        await deaths.wait_for("dead", "r1", timeout_s=TTL_S + 5)
        await wait_until(
            lambda: (
                "dead db/r1 failed for good after 1 tries: ActionFailed: db: no live replica"
                in group.log_of("worker-a")
            ),
            10,
            "the promotion to give up and its event to be dead-lettered",
        )
        for name in ("r2", "r3"):
            assert (await replication(group.servers[name].addr))["role"] == "slave"
        assert sink.of("promoted") == []

        group.start_sidecar("r2")
        promoted = await sink.wait_for("promoted", timeout_s=15)
        assert promoted[0]["instance"] == "r2" and promoted[0]["data"]["old_primary"] == "r1"
        assert (await replication(group.servers["r2"].addr))["role"] == "master"
        async with Router("db", settings=settings) as router:
            ok = await router.wait_for(lambda t: t.primary == "r2" and t.routable("primary"), 10)
            assert ok, router.table
        await asyncio.sleep(2 * TTL_S)  # a second promotion would have shown by now
        assert len(sink.of("promoted")) == 1, sink.of("promoted")
    finally:
        await deaths.close()
        await sink.close()
