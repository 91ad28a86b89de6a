"""``hbbus sidecar redis``: heartbeats for a ``redis-server``, not for the host it runs on.

Every beat asks the server ``INFO replication`` (bounded by 40% of the interval). When it
answers, the heartbeat carries ``meta = {endpoint, role, offset[, master, link]}``; when it
does not, the beat is skipped — so a dead or hung server, not only a dead host, stops the
heartbeats and becomes ``dead`` after its TTL. Stopping the sidecar (SIGTERM) sends ``left``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from redis.exceptions import RedisError

from hbbus.client import Heartbeater
from hbbus.errors import SkipBeat
from hbbus.routing import normalise_role
from hbbus.settings import Settings
from hbbus.workers.redis_failover import node_client, offset_of

log = logging.getLogger("hbbus.sidecar")


def default_instance(addr: str) -> str:
    """``127.0.0.1:6379`` -> ``redis-127-0-0-1-6379`` (a valid instance name)."""
    return "redis-" + re.sub(r"[^A-Za-z0-9_-]", "-", addr)[:58]


class RedisProbe:
    """The meta callable: the server's replication state, or SkipBeat."""

    def __init__(self, addr: str, password: str | None, timeout_s: float) -> None:
        self.addr = addr
        self.timeout_s = timeout_s
        self.failing = False
        self.client = node_client(addr, password, timeout_s)

    async def __call__(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout_s):
                info = await self.client.info("replication")
        except (RedisError, OSError, TimeoutError) as exc:
            if not self.failing:
                log.warning("redis %s does not answer (%s): heartbeats stop", self.addr, exc)
            self.failing = True
            raise SkipBeat(f"redis {self.addr}: {exc or type(exc).__name__}") from None
        if self.failing:
            log.warning("redis %s answers again: heartbeats resume", self.addr)
        self.failing = False
        return meta_of(self.addr, info)

    async def close(self) -> None:
        await self.client.aclose()


def meta_of(addr: str, info: dict[str, Any]) -> dict[str, Any]:
    role = normalise_role(info.get("role"))
    meta: dict[str, Any] = {"endpoint": addr, "role": role, "offset": offset_of(info)}
    if role == "replica":
        meta["master"] = f"{info.get('master_host')}:{info.get('master_port')}"
        meta["link"] = str(info.get("master_link_status", ""))
    return meta


async def run_redis_sidecar(
    settings: Settings,
    addr: str,
    *,
    service: str,
    instance: str | None,
    interval_s: float,
    misses: int,
    password: str | None,
    stop: asyncio.Event,
) -> None:
    probe = RedisProbe(addr, password, timeout_s=interval_s * 0.4)
    name = instance or default_instance(addr)
    heartbeater = Heartbeater(
        service, name, interval_s=interval_s, misses=misses, meta=probe, settings=settings
    )
    log.info("sidecar for redis %s: heartbeating as %s/%s", addr, service, name)
    try:
        await heartbeater.start()
        await stop.wait()
        await heartbeater.stop(leave=True)
    finally:
        await probe.close()
    log.info(
        "sidecar for redis %s stopped ◆ %d beats ◆ %d skipped (server silent)",
        addr,
        heartbeater.sent,
        heartbeater.skipped,
    )
