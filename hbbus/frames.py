"""A buffered AMQP frame reader for aiormq connections (the workers' hot path).

Imported only by :func:`hbbus.amqp.use_buffered_frame_reader` and the aggregator (both
guarded), so importing hbbus never depends on aiormq's reader class: an aiormq without
``aiormq.connection.FrameReceiver`` makes that function return False, and connections read as
aiormq reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
from collections.abc import Callable
from typing import Any

import aiormq.abc
import aiormq.connection
import aiormq.exceptions
import pamqp.commands
import pamqp.exceptions
import pamqp.frame
import pamqp.heartbeat

log = logging.getLogger("hbbus.frames")

#: Bytes asked of the socket at a time by the buffered frame reader.
READ_CHUNK = 256 * 1024


#: how aiormq's reader words a failed read, most specific first
_OS_ERRORS = (
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "connection reset"),
    (ConnectionError, "connection error"),
)


#: a frame's type, channel and payload size; a Basic.Deliver's class and method ids
_FRAME = struct.Struct(">BHI")
_IDS = struct.Struct(">HH")
_TAG_BITS = struct.Struct(">QB")
_CONTENT = struct.Struct(">HHQ")
_HEADER_MIN = _CONTENT.size + 2  # class, weight, body size, property flags
_DELIVER_IDS = (60, 60)
_FRAME_END = 0xCE
#: what the reader returns after handing deliveries out directly (see get_frame)
_HEARTBEAT = (8, 0, pamqp.heartbeat.Heartbeat())
#: _next_frame: a delivery to hand out waits behind frames in its channel's queue
_LET_CHANNEL_READ = (0, 0, pamqp.heartbeat.Heartbeat())


@dataclasses.dataclass(slots=True, eq=False, repr=False)
class Delivery:
    """A delivery handed out directly by :class:`BufferedFrameReceiver`: the attributes of
    aiormq's ``DeliveredMessage`` that a consumer of heartbeats reads (the content header's
    properties are not parsed)."""

    channel: aiormq.abc.AbstractChannel
    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    body: bytes

    def __repr__(self) -> str:
        return (
            f"Delivery(channel={self.channel.number}, tag={self.delivery_tag}, "
            f"routing_key={self.routing_key!r}, {len(self.body)} bytes)"
        )


def receiver_of(frame: object) -> BufferedFrameReceiver | None:
    """The buffered reader that read ``frame`` (a ``Basic.Deliver`` it handed to aiormq);
    None for a frame another reader read."""
    receiver = getattr(frame, "_hbbus_receiver", None)
    return receiver if isinstance(receiver, BufferedFrameReceiver) else None


class BufferedFrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's frame reader, reading the socket in chunks.

    aiormq's own reader awaits three ``readexactly`` calls and takes a lock for every frame,
    three frames per delivery: a fifth of an aggregator's CPU when it drains a backlog. This
    one keeps a buffer, reads up to :data:`READ_CHUNK` bytes when it holds no whole frame,
    and hands out the whole frames in hand without awaiting. The frames it returns are
    unmarshalled by pamqp; what reaches the connection, and every error, is what aiormq's
    reader gives.

    A channel registered with :meth:`deliver_directly` gets its deliveries parsed here and
    handed to its ``take`` from the buffer, without pamqp, the connection's dispatch, the
    channel's frame queue and its reader task (each delivery is three frames, and each frame
    went through all four). Only when that keeps their order: the channel has no frame
    waiting in its queue (so every earlier delivery was taken), the delivery is whole in the
    buffer (method, header, one body frame) and for a consumer the channel knows. Anything
    else goes the way aiormq reads it, and so does every error."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = bytearray()
        self._pos = 0
        #: channel number -> (the aiormq channel, its take) for deliveries handed out here
        self._direct: dict[int, tuple[Any, Callable[[Delivery], None]]] = {}
        self._handed_out = False  # deliveries handed out since the last frame returned
        # the loop ran once since a delivery found frames in its channel's queue
        self._channel_had_its_turn = False

    def deliver_directly(
        self, channel: aiormq.abc.AbstractChannel, take: Callable[[Delivery], None]
    ) -> None:
        """Hand ``channel``'s deliveries to ``take`` from the buffer from now on, where that
        keeps their order (see the class). ``take`` must not block; what it raises is logged.
        Ends when the channel closes, or when another channel takes its number."""
        self._direct[channel.number] = (channel, take)

    async def get_frame(self) -> aiormq.connection.ReceivedFrame:
        while True:
            frame = self._next_frame()
            if frame is _LET_CHANNEL_READ:
                await asyncio.sleep(0)
                self._channel_had_its_turn = True
                continue
            self._channel_had_its_turn = False
            if frame is not None:
                self._handed_out = False
                return frame
            if self._handed_out:
                # The connection counts a silent socket as dead (its heartbeat check reads
                # the time of the last frame it got): deliveries handed out here count as
                # frames, so it gets a heartbeat frame (a no-op for it) before we wait.
                self._handed_out = False
                return _HEARTBEAT
            if self._pos == len(self._buffer) and self.reader.at_eof():
                raise StopAsyncIteration  # as aiormq's reader: the end, between frames
            try:
                data = await self.reader.read(READ_CHUNK)
            except OSError as exc:  # as aiormq's reader words it
                kind = next((w for t, w in _OS_ERRORS if isinstance(exc, t)), "communication error")
                raise aiormq.exceptions.AMQPConnectionError(f"Server {kind}: {exc!r}") from exc
            if not data:
                raise aiormq.exceptions.AMQPConnectionError(
                    "Server connection unexpectedly closed. "
                    f"Read {len(self._buffer) - self._pos} bytes of a frame"
                )
            if self._pos:  # drop what was handed out, once per read
                del self._buffer[: self._pos]
                self._pos = 0
            self._buffer += data

    def _next_frame(self) -> aiormq.connection.ReceivedFrame | None:
        """The next whole frame in the buffer, unmarshalled; None if there is none yet;
        :data:`_LET_CHANNEL_READ` if a delivery to hand out waits behind queued frames.
        Deliveries handed out on the way are passed over."""
        buffer, pos = self._buffer, self._pos
        if len(buffer) - pos < 8:  # a frame is at least 8 bytes, and so is a protocol header
            return None
        if not self.started:
            if buffer[pos : pos + 4] == b"AMQP":  # the broker refused our protocol version
                raise aiormq.exceptions.ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
        while True:
            kind, number, size = _FRAME.unpack_from(buffer, pos)
            end = pos + 8 + size
            if end > len(buffer):
                return None
            handed = kind == 1 and number in self._direct and self._hand_out(pos, number, end)
            if handed is None:
                return _LET_CHANNEL_READ
            if not handed:
                return self._unmarshal(pos, end)
            pos = self._pos  # handed out: on to the frame after it
            if len(buffer) - pos < 8:
                return None

    def _unmarshal(self, pos: int, end: int) -> aiormq.connection.ReceivedFrame:
        """The frame from ``pos`` to ``end`` in the buffer, by pamqp; move past it."""
        self._pos = end
        with memoryview(self._buffer) as view:
            raw = bytes(view[pos:end])  # one copy
        try:
            frame = pamqp.frame.unmarshal(raw)
        except pamqp.exceptions.PAMQPException as exc:
            raise aiormq.exceptions.InvalidFrameError(str(exc)) from exc
        if isinstance(frame[2], pamqp.commands.Basic.Deliver):
            frame[2]._hbbus_receiver = self  # type: ignore[attr-defined]  # for receiver_of
        return frame

    def _hand_out(self, pos: int, number: int, end: int) -> bool | None:
        """If the method frame at ``pos`` (channel ``number``, up to ``end``) starts a
        delivery that may be handed out here (see the class), hand it to the channel's take,
        move past its frames and return True; else change nothing and return False. None:
        it could be, but earlier frames wait in the channel's queue: the caller lets the
        channel's reader run once (it takes them all without waiting: every frame it needs
        for them is in the queue already) and asks again."""
        channel, take = self._direct[number]
        if channel.is_closed or channel.connection.channels.get(number) is not channel:
            del self._direct[number]  # closed, or the number is another channel's now
            return False
        buffer = self._buffer
        if end - pos < 12 or buffer[end - 1] != _FRAME_END:
            return False  # not a method frame pamqp would read: let it say why
        if _IDS.unpack_from(buffer, pos + 7) != _DELIVER_IDS:
            return False
        if channel.frames.qsize():  # an earlier frame is still on its way: keep the order
            return False if self._channel_had_its_turn else None
        try:  # Basic.Deliver: consumer tag, delivery tag, redelivered, exchange, routing key
            at = pos + 11
            tag_end = at + 1 + buffer[at]
            consumer_tag = buffer[at + 1 : tag_end].decode()
            delivery_tag, bits = _TAG_BITS.unpack_from(buffer, tag_end)
            at = tag_end + 9
            exchange_end = at + 1 + buffer[at]
            exchange = buffer[at + 1 : exchange_end].decode()
            key_end = exchange_end + 1 + buffer[exchange_end]
            routing_key = buffer[exchange_end + 1 : key_end].decode()
        except (IndexError, UnicodeDecodeError, struct.error):
            return False
        if key_end != end - 1 or consumer_tag not in channel.consumers:
            return False
        body_at = self._whole_content(end, number)
        if body_at is None:
            return False
        head, body_end = body_at
        self._pos = body_end
        with memoryview(buffer) as view:
            body = bytes(view[head : body_end - 1])  # one copy
        self._handed_out = True
        delivery = Delivery(
            channel, consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key, body
        )
        try:
            take(delivery)
        except Exception:  # as aiormq does: a failing callback must not stop the reader
            log.exception("taking a delivery failed")
        return True

    def _whole_content(self, at: int, number: int) -> tuple[int, int] | None:
        """Where the body starts and where the content of the delivery whose header frame
        starts at ``at`` ends, if it is whole in the buffer as one header frame and at most
        one body frame of channel ``number``; None otherwise."""
        end = self._frame_end(at, 2, number, _HEADER_MIN)
        if end is None:
            return None
        class_id, _, body_size = _CONTENT.unpack_from(self._buffer, at + 7)
        if class_id != 60:
            return None
        if not body_size:
            return end, end
        body_end = self._frame_end(end, 3, number, body_size)
        if body_end is None or body_end - end - 8 != body_size:
            return None
        return end + 7, body_end

    def _frame_end(self, at: int, kind: int, number: int, min_size: int) -> int | None:
        """Where the frame at ``at`` ends, if it is whole in the buffer, of ``kind`` on
        channel ``number``, with a payload of at least ``min_size`` bytes and its end byte;
        None otherwise (short frames are left to pamqp, which says why)."""
        buffer = self._buffer
        if len(buffer) - at < 8:
            return None
        got_kind, channel, size = _FRAME.unpack_from(buffer, at)
        end = at + 8 + size
        if (
            got_kind != kind
            or channel != number
            or size < min_size
            or end > len(buffer)
            or buffer[end - 1] != _FRAME_END
        ):
            return None
        return end
