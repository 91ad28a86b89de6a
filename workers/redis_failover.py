"""Redis replica promotion: the action that replaces a dead primary, and keeps the group whole.

A group of ``redis-server``s (one primary, replicas) forms one hbbus service; each server is
watched by a sidecar (``hbbus sidecar redis``) that heartbeats for it with its role and
replication offset in ``meta``. This action keeps that service's routing table and:

- on the primary's ``dead``: takes the promotion lock (its token is the new fencing epoch),
  picks the live replica with the highest replication offset (asked directly, not from the
  last heartbeat), ``REPLICAOF NO ONE`` on it, points the other live replicas at it, makes it
  the table's primary, marks the old primary fenced, and publishes ``promoted``;
- on any member's ``joined``/``recovered``/``restarted``: if it is not the primary, makes sure
  it replicates from the primary (``REPLICAOF``) and waits for its link before it is routable
  again — so an old primary that returns comes back as a replica, never as a second primary.

Two workers in one group never promote twice: the lock is taken in one Lua call, every step
names the epoch, and the commit only succeeds for the lock's holder. A worker that dies half
way stops renewing the lock; the event returns to the queue, and the other worker resumes the
same promotion (same epoch, same candidate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hbbus import failpoints
from hbbus.amqp import AMQP_ERRORS
from hbbus.errors import ActionFailed, ConfigError, HbbusError
from hbbus.failover import Action, FailoverConsumer
from hbbus.routing import Change, Endpoint, RoutingTable, Table
from hbbus.runtime import cancel_and_wait
from hbbus.settings import parse_addr
from hbbus.wire import Event, new_event
from hbbus.workers.routes import DOWN_KINDS, UP_KINDS, RoutesAction

log = logging.getLogger("hbbus.redis_failover")


def node_client(addr: str, password: str | None, timeout_s: float) -> Redis:
    """A client for one managed ``redis-server`` (not hbbus' own Redis): short timeouts."""
    host, port = parse_addr(addr)
    return Redis(
        host=host,
        port=port,
        password=password,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=True,
    )


class RedisNode:
    """One managed ``redis-server``, spoken to directly (short timeouts, one connection)."""

    def __init__(self, addr: str, password: str | None, timeout_s: float) -> None:
        self.addr = addr
        self.client = node_client(addr, password, timeout_s)

    async def __aenter__(self) -> RedisNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def replication(self) -> dict[str, Any]:
        try:
            return dict(await self.client.info("replication"))
        except (RedisError, OSError) as exc:
            raise ActionFailed(f"redis {self.addr}: {exc or type(exc).__name__}") from None

    async def replicaof(self, primary: str | None) -> None:
        args = ("NO", "ONE") if primary is None else parse_addr(primary)
        try:
            await self.client.execute_command("REPLICAOF", *args)
        except (RedisError, OSError) as exc:
            raise ActionFailed(f"redis {self.addr}: REPLICAOF failed: {exc}") from None


def offset_of(info: dict[str, Any]) -> int:
    """How much of the stream a server has: a replica's applied offset, a primary's own."""
    if info.get("role") == "slave":
        return int(info.get("slave_repl_offset") or 0)
    return int(info.get("master_repl_offset") or 0)


def follows(info: dict[str, Any], primary: str) -> bool:
    """Whether a server is a replica of ``primary`` (HOST:PORT)."""
    if info.get("role") != "slave":
        return False
    host, port = parse_addr(primary)
    return str(info.get("master_host")) == host and int(info.get("master_port") or 0) == port


class RedisPromoteAction(Action):
    type: ClassVar[str] = "redis-promote"
    kinds: ClassVar[frozenset[str]] = UP_KINDS | DOWN_KINDS

    def __init__(
        self,
        service: str,
        *,
        password: str | None = None,
        lease_ms: int = 5000,
        timeout_s: float = 2.0,
    ) -> None:
        self.service = service
        self.password = password
        self.lease_ms = lease_ms
        self.timeout_s = timeout_s
        self._consumer: FailoverConsumer | None = None
        self.routes = RoutesAction((service,))  # keeps this service's routing table

    async def start(self, consumer: FailoverConsumer) -> None:
        """Catch up with what happened while no worker ran: the table from the store, and a
        promotion if the primary of record is dead (its `dead` event may have gone by)."""
        self._consumer = consumer
        try:
            await self.routes.start(consumer)
            table = await self.table.read(self.service)
            primary = table.entries.get(table.primary)
            if primary is not None and primary.reason == "dead":
                log.warning("redis %s: %s", self.service, await self.promote(table.primary))
        except (HbbusError, RedisError, *AMQP_ERRORS) as exc:  # the next event tries again
            log.error("redis %s: catch-up at start failed: %s", self.service, exc)

    @property
    def table(self) -> RoutingTable:
        return self.routes.table

    @property
    def consumer(self) -> FailoverConsumer:
        assert self._consumer is not None, "the action has not started"
        return self._consumer

    def node(self, addr: str) -> RedisNode:
        return RedisNode(addr, self.password, self.timeout_s)

    async def handle(self, event: Event) -> object:
        if event.service != self.service:
            return f"not {self.service}"
        if event.kind in DOWN_KINDS:
            await self.routes.handle(event)
            if event.kind == "left":  # a sidecar stopped on purpose: no promotion
                return f"{event.instance} out of routing (left)"
            return await self.promote(event.instance)
        return await self.rejoin(event)

    async def _announce(self, instance: str, change: Change | None, what: str) -> None:
        await self.routes.announce(self.service, instance, change, what)

    # -- promotion ----------------------------------------------------------------------------
    async def promote(self, dead: str) -> str:
        owner = self.consumer.token
        verdict, epoch, old, candidate = await self.table.begin_promotion(
            self.service, dead, owner, self.lease_ms
        )
        if verdict == "busy":
            raise ActionFailed(f"another worker is promoting {self.service} (epoch {epoch})")
        if verdict == "alive":
            return f"{dead} is alive again: no promotion"
        if verdict == "not-primary":
            if candidate == dead:  # promoted already (by us or another worker): say it again
                await self._publish_promoted(await self.table.read(self.service), dead, {})
                return f"{dead} was already replaced by {old} (epoch {epoch})"
            return f"{dead} is not the primary (the primary is {old or 'unknown'})"
        log.warning(
            "redis %s: primary %s dead; %s promotion, epoch %d",
            self.service,
            dead,
            "resuming the" if verdict == "resume" else "starting a",
            epoch,
        )
        return await self._promote(epoch, old, candidate)

    async def _promote(self, epoch: int, old: str, candidate: str) -> str:
        """Run the promotion while a background task renews the lock; every step first checks
        that the lock is still ours, so a holder that lost it stops at once."""
        keeper = asyncio.create_task(self._keep_lock(epoch))
        cancelled = False
        try:
            return await self._promote_steps(epoch, old, candidate)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            await cancel_and_wait(keeper)
            if not keeper.cancelled() and keeper.exception() is not None:
                log.error(
                    "redis %s: the promotion lock's keeper failed",
                    self.service,
                    exc_info=keeper.exception(),
                )
            if cancelled:
                # shutdown, or another member took the event over: let the lock run out now
                # (the keeper stopped first, so no renewal lands after), and the member that
                # resumes the promotion need not wait for its lease; never abort here: after
                # REPLICAOF NO ONE that would unfence the old primary
                with contextlib.suppress(RedisError, OSError):
                    await self.table.promotion_step(self.service, epoch, self.consumer.token, 0)

    async def _keep_lock(self, epoch: int) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            with contextlib.suppress(RedisError, OSError):
                await self.table.promotion_step(
                    self.service, epoch, self.consumer.token, self.lease_ms
                )

    async def _promote_steps(self, epoch: int, old: str, candidate: str) -> str:
        table = await self.table.read(self.service)
        chosen = table.entries.get(candidate) if candidate else None
        info = await self._usable(chosen)
        if chosen is None or info is None:
            chosen, info = await self._choose(table, old, epoch)
            await self._step(epoch, "candidate", chosen.instance)
        offset = offset_of(info)
        await self._step(epoch, "state", "replicaof-no-one")
        async with self.node(chosen.endpoint) as node:
            await node.replicaof(None)
        await self._step(epoch, "state", "replicaof-done")
        failpoints.hit("promote:after-replicaof")
        followers = await self._repoint(epoch, old, chosen)
        change = await self.table.commit_promotion(
            self.service, epoch, self.consumer.token, chosen.instance, old
        )
        if change is None:
            raise ActionFailed(f"lost the promotion lock of {self.service} (epoch {epoch})")
        await self._announce(chosen.instance, change, f"{chosen.instance} promoted")
        table = await self.table.read(self.service)
        await self._publish_promoted(table, old, {"offset": offset, "followers": followers})
        text = (
            f"promoted {chosen.instance} ({chosen.endpoint}, offset {offset}) at epoch {epoch}; "
            f"{len(followers)} replica(s) follow it"
        )
        log.warning("redis %s: %s", self.service, text)
        return text

    async def _step(self, epoch: int, name: str, value: str) -> None:
        held = await self.table.promotion_step(
            self.service, epoch, self.consumer.token, self.lease_ms, name, value
        )
        if not held:
            raise ActionFailed(f"lost the promotion lock of {self.service} (epoch {epoch})")

    async def _usable(self, entry: Endpoint | None) -> dict[str, Any] | None:
        if entry is None or not entry.endpoint:
            return None
        try:
            async with self.node(entry.endpoint) as node:
                return await node.replication()
        except (ActionFailed, ConfigError):  # unreachable, or a meta.endpoint that is no address
            return None

    async def _choose(self, table: Table, old: str, epoch: int) -> tuple[Endpoint, dict[str, Any]]:
        """The live replica with the highest offset (ties: the lowest name)."""
        replicas = [
            e
            for name, e in sorted(table.entries.items())
            if name != old and e.routable and e.role == "replica" and e.endpoint
        ]
        infos = await asyncio.gather(*(self._usable(e) for e in replicas))
        live = [(e, i) for e, i in zip(replicas, infos, strict=True) if i is not None]
        if not live:
            await self.table.abort_promotion(self.service, old, epoch, self.consumer.token)
            raise ActionFailed(f"{self.service}: no live replica to promote")
        return min(live, key=lambda pair: (-offset_of(pair[1]), pair[0].instance))

    async def _repoint(self, epoch: int, old: str, primary: Endpoint) -> list[str]:
        """Point every other live replica at the new primary; one that is down now is pointed
        when it comes back (its ``recovered``)."""
        followers = []
        table = await self.table.read(self.service)  # members may have come and gone
        for name, entry in sorted(table.entries.items()):
            if name in (old, primary.instance) or not entry.routable or not entry.endpoint:
                continue
            try:
                async with self.node(entry.endpoint) as node:
                    if not follows(await node.replication(), primary.endpoint):
                        await self._step(epoch, "", "")
                        await node.replicaof(primary.endpoint)
                followers.append(name)
            except ActionFailed as exc:
                log.warning("redis %s: %s not repointed now (%s)", self.service, name, exc)
        return followers

    async def _publish_promoted(self, table: Table, old: str, data: dict[str, Any]) -> None:
        primary = table.entries.get(table.primary)
        event = new_event(
            "promoted",
            self.service,
            table.primary,
            key=f"{self.service}|{table.epoch}",
            at_ms=int(time.time() * 1000),
            data={
                "epoch": table.epoch,
                "old_primary": old,
                "endpoint": primary.endpoint if primary else "",
                **data,
            },
        )
        await self.consumer.publish(event)

    # -- members coming back -------------------------------------------------------------------
    async def rejoin(self, event: Event) -> str:
        change, what = await self.routes.apply(event)
        if change is None:
            return what  # no meta.endpoint: not routed
        await self._announce(event.instance, change, what)
        promotion = await self.table.promotion(self.service)
        if promotion:  # another worker's (busy: retried), or one given up: finish it
            log.warning("redis %s: %s", self.service, await self.promote(promotion["old"]))
        table = await self.table.read(self.service)
        primary = table.entries.get(table.primary)
        if primary is not None and primary.reason == "dead" and table.primary != event.instance:
            # the primary's own promotion gave up (no replica was live then): try it now
            log.warning("redis %s: %s", self.service, await self.promote(table.primary))
            table = await self.table.read(self.service)
            primary = table.entries.get(table.primary)
        me = table.entries[event.instance]
        if table.primary == event.instance or primary is None:
            return f"{event.instance} routable ({me.role or 'no role'})"
        if not primary.routable:
            if me.fenced:
                raise ActionFailed(f"{event.instance} is fenced and there is no primary to follow")
            return f"{event.instance} routable as {me.role or 'no role'} (primary down)"
        return await self._follow(event, me, primary)

    async def _follow(self, event: Event, me: Endpoint, primary: Endpoint) -> str:
        """Make ``me`` a replica of ``primary``. One that must be repointed (or was fenced)
        stays out of routing until its link is up and its sync done; that is looked at again
        by a retry, so a slow sync never holds up the group's other events."""
        name = event.instance
        async with self.node(me.endpoint) as node:
            info = await node.replication()
            if follows(info, primary.endpoint):
                did = "already follows the primary"
            else:
                if not me.fenced:
                    change = await self.table.fence(self.service, name, "resyncing")
                    await self._announce(name, change, f"{name} resyncing")
                await node.replicaof(primary.endpoint)
                did = f"made a replica of {primary.instance}"
                log.warning("redis %s: %s %s", self.service, name, did)
                me = Endpoint(**{**me.to_dict(), "fenced": True})
                info = await self._wait_synced(node, 1.0)
            if not me.fenced:
                return f"{name} {did}; routable as a replica of {primary.instance}"
            if not _synced(info):
                raise ActionFailed(f"{name} is syncing from {primary.instance}; looking again")
        change = await self.table.unfence(self.service, name, event.ord)
        await self._announce(name, change, f"{name} is a replica again")
        return f"{name} {did}; routable again as a replica of {primary.instance}"

    @staticmethod
    async def _wait_synced(node: RedisNode, wait_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        info = await node.replication()
        while not _synced(info) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            info = await node.replication()
        return info


def _synced(info: dict[str, Any]) -> bool:
    return (
        info.get("role") == "slave"
        and info.get("master_link_status") == "up"
        and str(info.get("master_sync_in_progress", "0")) == "0"
    )
