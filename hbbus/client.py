"""The heartbeat client: :class:`Heartbeater` (asyncio) and :class:`SyncHeartbeater` (a thread).

The client never blocks its host: publishing happens in a background task, each publish is
bounded by the interval, what waits to be written is bounded (a heartbeat that cannot go out
is dropped and counted, the next one carries the news), and a broker outage only pauses
heartbeats — the task reconnects with capped backoff and carries on with the same incarnation.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import aio_pika
import aiormq
import orjson
import pamqp.body
import pamqp.frame
import pamqp.header
from aiormq.abc import ChannelFrame

from hbbus.amqp import AMQP_ERRORS, connect, declare_heartbeats
from hbbus.errors import ConfigError, SkipBeat, Unavailable
from hbbus.names import Names
from hbbus.runtime import cancel_and_wait, sleep_or_stop, wait_event
from hbbus.settings import Settings, check_name
from hbbus.wire import MAX_MESSAGE_BYTES, STATUSES, Heartbeat

log = logging.getLogger("hbbus.client")

Meta = dict[str, Any]
MetaSource = Meta | Callable[[], Meta | Awaitable[Meta]] | None


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, digit = divmod(number, 36)
        out = digits[digit] + out
        if not number:
            return out


def new_incarnation() -> str:
    """A fresh incarnation id, new per process start: the start time (milliseconds, base 36:
    8 characters until 2059) and 32 random bits, e.g. ``mhx3k2a1-3f9a1c2d``."""
    return f"{_base36(int(time.time() * 1000))}-{secrets.token_hex(4)}"


def _check_meta(meta: Any) -> Meta:
    _encode_meta(meta)
    return meta  # type: ignore[no-any-return]


def _encode_meta(meta: Any) -> bytes:
    """``meta`` encoded, once checked: a dict, small enough to leave room in a message."""
    if not isinstance(meta, dict):
        raise ConfigError(f"meta must be a dict, got {type(meta).__name__}")
    encoded = orjson.dumps(meta)
    if len(encoded) > MAX_MESSAGE_BYTES - 512:
        raise ConfigError(
            f"meta is {len(encoded)} bytes encoded; keep it under {MAX_MESSAGE_BYTES - 512}"
        )
    return encoded


#: every this many beats, a publish waits until the connection has written it (see _publish)
DRAIN_EVERY = 8


def _wake_up(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Heartbeater:
    """Publish heartbeats for one instance of a service while the context is open.

    ``async with Heartbeater("api", "api-1", interval_s=1, misses=3, meta={...}):`` — on a
    clean exit it publishes ``left``. ``meta`` may be a dict or a callable (sync or async)
    that returns one; it is read for every heartbeat.
    """

    def __init__(
        self,
        service: str,
        instance: str,
        *,
        interval_s: float = 1.0,
        misses: int = 3,
        meta: MetaSource = None,
        settings: Settings | None = None,
        status: str = "ok",
        connect_timeout_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.service = check_name(service, "service")
        self.instance = check_name(instance, "instance")
        if not interval_s > 0:
            raise ConfigError(f"interval_s must be positive, got {interval_s}")
        if int(misses) < 1:
            raise ConfigError(f"misses must be at least 1, got {misses}")
        self.interval_s = float(interval_s)
        self.misses = int(misses)
        self.settings = settings or Settings.from_env()
        self.names = Names(self.settings.namespace)
        self.incarnation = new_incarnation()
        self.connect_timeout_s = connect_timeout_s
        self.max_backoff_s = max_backoff_s
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self.skipped = 0
        self.connects = 0
        self._meta: MetaSource = meta
        self._last_meta_json = _encode_meta(meta if isinstance(meta, dict) else {})  # checks it
        self._meta_failing = False
        self.set_status(status)
        self._stop = asyncio.Event()
        self._wake: asyncio.Future[None] | None = None  # the beat loop's sleep, while it sleeps
        self._leave = True
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._exchange = self.names.heartbeats_exchange
        self._routing_key = Names.heartbeat_routing_key(self.service, self.instance)
        # marshalled frames of the current channel (_payload): its number, the Basic.Publish
        # frame, and a content header per body size
        self._frames_of = -1
        self._method_frame = b""
        self._headers: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return (
            f"Heartbeater({self.service}/{self.instance}, inc={self.incarnation}, "
            f"seq={self.seq}, ns={self.settings.namespace!r})"
        )

    # -- control -----------------------------------------------------------------------------
    def set_status(self, status: str) -> None:
        if status not in STATUSES or status == "left":
            raise ConfigError(f"status must be one of ok, degraded, draining; got {status!r}")
        self.status = status

    def set_meta(self, meta: MetaSource) -> None:
        self._meta = _check_meta(meta) if isinstance(meta, dict) else meta

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float) -> bool:
        return await wait_event(self._connected, timeout_s)

    async def start(self) -> None:
        """Start heartbeating in the background. Waits up to ``connect_timeout_s`` for the first
        connection; if the broker is not there yet it keeps trying and never raises."""
        if self._task is not None and not self._task.done():
            if self._stop.is_set():  # a stop() that was cancelled: the task sends `left`
                raise RuntimeError("Heartbeater still stopping: await stop() before start()")
            raise RuntimeError("Heartbeater already started")
        self._stop.clear()
        self._connected.clear()
        self._leave = True
        self._task = asyncio.create_task(self._run(), name=f"hbbus-heartbeater-{self.instance}")
        if not await self.wait_connected(self.connect_timeout_s):
            log.warning("%r: RabbitMQ not reachable yet; retrying in the background", self)

    async def stop(self, leave: bool = True) -> None:
        """Stop heartbeating; with ``leave`` (default) publish ``left`` first."""
        if self._task is None:
            return
        self._leave = leave
        self._stop.set()
        if self._wake is not None:
            _wake_up(self._wake)
        # not `await self._task`: a cancel of the caller would cancel the task too (and its
        # `left`), and suppressing CancelledError here would swallow the caller's cancel
        try:
            await asyncio.wait({self._task})
        finally:
            self._forget_task()

    async def abort(self) -> None:
        """Stop at once without ``left`` — as if the process had died (demo and tests)."""
        if self._task is not None:
            self._leave = False
            self._stop.set()
            try:
                await cancel_and_wait(self._task)  # a cancel of the caller is raised
            finally:
                self._forget_task()

    def _forget_task(self) -> None:
        """After stop or abort: once the task has ended (a caller cancelled while waiting
        for it may leave it finishing its ``left``), the Heartbeater may start again."""
        if self._task is not None and self._task.done():
            self._task = None
            self._connected.clear()

    async def __aenter__(self) -> Heartbeater:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(leave=True)

    # -- the background task ---------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._run_sessions()
        finally:
            self._connected.clear()  # also when the task ends after its stop() was cancelled

    async def _run_sessions(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            connects = self.connects
            try:
                await self._session()
                return
            except (*AMQP_ERRORS, Unavailable) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:  # a bug must not silently end heartbeats for good
                log.exception("%r: unexpected error in the heartbeat task", self)
                reason = repr(exc)
            self._connected.clear()
            if self.connects > connects:  # it had connected: this is a new outage
                backoff = 0.1
            log.warning(
                "%r: connection lost or refused (%s); retrying in %.1fs", self, reason, backoff
            )
            await sleep_or_stop(self._stop, backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def _session(self) -> None:
        connection = await connect(
            self.settings,
            f"hbbus-heartbeater {self.service}/{self.instance}",
            robust=False,
            timeout_s=self.connect_timeout_s,
        )
        async with connection:
            channel = await connection.channel(publisher_confirms=False)
            await declare_heartbeats(channel, self.names)
            # Heartbeats go out through the aiormq channel under aio-pika's: building an
            # aio_pika.Message and its wrapper per beat cost more CPU than the publish itself.
            raw = cast(aiormq.Channel, await channel.get_underlay_channel())
            self.connects += 1
            self._connected.set()
            await self._beat_loop(raw, connection)
            if self._leave:
                await self._publish(raw, "left", timeout_s=2.0)

    async def _beat_loop(
        self, channel: aiormq.Channel, connection: aio_pika.abc.AbstractConnection
    ) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            if connection.is_closed:
                raise ConnectionError("connection closed")
            await self._publish(channel, self.status, timeout_s=self.interval_s)
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:  # we were late (a stalled loop): do not burst to catch up
                next_at = now
            await self._sleep(next_at - now)

    async def _sleep(self, seconds: float) -> None:
        """Sleep until the next beat; :meth:`stop` ends it early. A plain timer and future: an
        ``asyncio.timeout`` around ``Event.wait`` cost about 10 µs more per beat."""
        if self._stop.is_set():  # stop() came during the beat: no sleep left to end
            return
        loop = asyncio.get_running_loop()
        self._wake = wake = loop.create_future()
        timer = loop.call_later(seconds, _wake_up, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    async def _resolve_meta(self) -> None:
        """This beat's meta from a callable: its answer (awaited within half the interval),
        then :meth:`_take_meta`. Whatever fails keeps the last good meta, logged once per
        failure streak; :class:`SkipBeat` skips the beat."""
        try:
            value = self._meta()  # type: ignore[misc, operator]
            if inspect.isawaitable(value):
                async with asyncio.timeout(self.interval_s / 2):
                    value = await value
        except SkipBeat:
            raise
        except Exception as exc:
            self._meta_unusable(exc)
            return
        self._take_meta(value)

    def _take_meta(self, value: Any) -> None:
        """Make ``value`` (a dict, or None: keep the last) the meta of the next beats. It is
        encoded and checked every beat, so a change in place, nested or not, goes out with the
        next beat. The host's meta can never stop heartbeats: one that cannot be encoded keeps
        the last good meta."""
        if value is None:
            self._meta_failing = False
            return
        try:
            self._last_meta_json = _encode_meta(value)
            self._meta_failing = False
        except Exception as exc:
            self._meta_unusable(exc)

    def _meta_unusable(self, exc: Exception) -> None:
        if not self._meta_failing:
            log.warning("%r: meta is unusable (%s); sending the last good meta", self, exc)
        self._meta_failing = True

    def body(self, status: str) -> bytes:
        """The next heartbeat's message body (advances ``seq``), with the meta of the last
        :meth:`_take_meta`."""
        self.seq += 1
        return Heartbeat(
            self.service,
            self.instance,
            self.incarnation,
            self.seq,
            round(self.interval_s * 1000),
            self.misses,
            int(time.time() * 1000),
            status,
            {},  # the meta goes out as encoded by _take_meta
        ).encode(self._last_meta_json)

    def _payload(self, number: int, body: bytes, room: int) -> bytes:
        """The AMQP frames of this beat's publish on channel ``number``, marshalled by pamqp:
        Basic.Publish, the content header (both the same for every beat of a body size on a
        channel: marshalled once and kept), and the body in frames of at most ``room`` bytes
        (one, for any heartbeat of typical size). No ``message_id``: the body's seq is the
        heartbeat's identity."""
        if self._frames_of != number:
            self._frames_of, self._headers = number, {}
            method = aiormq.spec.Basic.Publish(
                exchange=self._exchange, routing_key=self._routing_key
            )
            self._method_frame = pamqp.frame.marshal(method, number)
        size = len(body)
        header = self._headers.get(size)
        if header is None:
            if len(self._headers) >= 64:  # a meta that keeps changing size
                self._headers.clear()
            content = pamqp.header.ContentHeader(
                body_size=size,
                properties=aiormq.spec.Basic.Properties(
                    content_type="application/json",
                    delivery_mode=1,  # not persistent: a heartbeat is news only now
                ),
            )
            header = self._headers[size] = pamqp.frame.marshal(content, number)
        frames = [self._method_frame, header]
        for start in range(0, len(body), room):
            chunk = pamqp.body.ContentBody(body[start : start + room])
            frames.append(pamqp.frame.marshal(chunk, number))
        return b"".join(frames)

    async def _publish(self, channel: aiormq.Channel, status: str, timeout_s: float) -> None:
        try:
            if callable(self._meta):
                await self._resolve_meta()
            else:
                self._take_meta(self._meta)
        except SkipBeat as exc:
            self.skipped += 1
            log.debug("%r: beat skipped: %s", self, exc)
            return
        body = self.body(status)
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        # A heartbeat's frames go straight into the connection's write queue (aiormq's
        # abstract connection interface: ``write_queue`` of ``ChannelFrame``), which the
        # connection's writer task sends. Channel.basic_publish around the same step — its
        # lock, two context managers, a timeout and a future per call — cost about 40 % of
        # the client's CPU per beat (docs/benchmarks.md). The channel has no publisher
        # confirms, so no delivery tag is counted. A full queue (a writer that cannot write)
        # drops the beat at once. Every DRAIN_EVERY-th beat, and ``left`` (the connection
        # closes right after it), waits until the writer has written it and the socket's
        # buffer is below its high-water mark: while a peer does not read (a broker blocking
        # publishers, a stalled network), that wait holds the writer, the queue (10 frames)
        # fills, and further beats are dropped (``left`` waits for room, within its timeout).
        # What waits in memory stays bounded by the buffer's high-water mark (64 KiB) plus a
        # few beats. The drain future belongs to the channel: its closing fails the wait at
        # once (the session then reconnects) instead of letting it run into the timeout.
        connection = channel.connection
        queue = connection.write_queue
        if queue.full() and status != "left":
            self.dropped += 1
            log.debug("%r: heartbeat %d dropped: the connection's writer is behind", self, self.seq)
            return
        drained: asyncio.Future[None] | None = None
        if status == "left" or self.seq % DRAIN_EVERY == 0:
            drained = channel.create_future()
        payload = self._payload(channel.number, body, _frame_room(connection))
        frame = ChannelFrame(payload=payload, should_close=False, drain_future=drained)
        if drained is None:
            queue.put_nowait(frame)  # not full: nothing ran since the check
        else:
            try:
                async with asyncio.timeout(timeout_s):
                    await queue.put(frame)
                    await drained
            except TimeoutError:
                self.dropped += 1
                log.debug("%r: heartbeat %d not written within %.2fs", self, self.seq, timeout_s)
                return
        self.sent += 1


def _frame_room(connection: aiormq.abc.AbstractConnection) -> int:
    """The most body bytes one content frame carries on ``connection`` (frame_max 0: no
    limit). A frame adds 8 bytes to its payload."""
    frame_max = connection.connection_tune.frame_max
    return frame_max - 8 if frame_max else MAX_MESSAGE_BYTES


class SyncHeartbeater:
    """:class:`Heartbeater` for programs without asyncio: it runs in its own daemon thread.

    ``with SyncHeartbeater("worker", "w-1", interval_s=2):`` or ``start()`` / ``stop()``.
    """

    def __init__(self, service: str, instance: str, **kwargs: Any) -> None:
        self._args = (service, instance)
        self._kwargs = kwargs
        check_name(service, "service")
        check_name(instance, "instance")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._hb: Heartbeater | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def heartbeater(self) -> Heartbeater:
        if self._hb is None:
            raise RuntimeError("SyncHeartbeater not started")
        return self._hb

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("SyncHeartbeater already started")
        self._thread = threading.Thread(target=self._main, name="hbbus-heartbeater", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._hb = Heartbeater(*self._args, **self._kwargs)
            loop.run_until_complete(self._hb.start())
        except BaseException as exc:  # reported to start()'s caller
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    def _call(self, coro_fn: Callable[[], Coroutine[Any, Any, None]], timeout_s: float) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout_s)

    def stop(self, leave: bool = True, timeout_s: float = 10.0) -> None:
        """Stop (publishing ``left`` unless ``leave=False``) and join the thread."""
        if self._thread is None or self._loop is None:
            return
        try:
            self._call(lambda: self.heartbeater.stop(leave=leave), timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
            self._thread = None

    def set_status(self, status: str) -> None:
        self.heartbeater.set_status(status)

    def set_meta(self, meta: MetaSource) -> None:
        self.heartbeater.set_meta(meta)

    def __enter__(self) -> SyncHeartbeater:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(leave=True)
