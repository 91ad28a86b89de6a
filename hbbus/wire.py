"""The wire format: versioned JSON (orjson) for heartbeats and events.

A heartbeat on the wire (keys kept short, it is the hot message)::

    {"v": 1, "svc": "api", "inst": "api-1", "inc": "mhx3k2a1-3f9a1c2d", "seq": 42,
     "ivl_ms": 1000, "sent_ms": 1732300000000,
     "meta": {"endpoint": "10.0.0.5:8080", "role": "primary"}}

``status`` is left out when it is ``ok`` and ``misses`` when it is 3 (the defaults).

Anything that is not exactly this shape is refused with an :class:`InvalidMessage` whose
``reason`` is one of :data:`INVALID_REASONS`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson

from hbbus.errors import InvalidMessage
from hbbus.names import Names
from hbbus.settings import NAME_RE

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 8 * 1024
STATUSES = frozenset({"ok", "degraded", "draining", "left"})
EVENT_KINDS = frozenset(
    {"joined", "suspect", "alive", "dead", "recovered", "restarted", "left", "flapping", "stable"}
    | {"observer.degraded", "observer.recovered", "mass-expiry"}
    | {"promoted", "routes", "action.succeeded", "action.failed"}
)
#: kinds that failover actions publish (about what they did), not transitions of an instance:
#: they carry ``ord`` 0 (not ordered) and no action reports on them (no feedback loops).
ACTION_KINDS = frozenset({"promoted", "routes", "action.succeeded", "action.failed"})
INVALID_REASONS = ("oversized", "malformed", "version", "schema", "name", "routing-key")

MAX_INT = 2**53  # exact in a double: Redis Lua compares numbers as doubles
DEFAULT_MISSES = 3
_INT_FIELDS = ("seq", "ivl_ms", "misses", "sent_ms")
_NAME_FIELDS = ("svc", "inst", "inc")


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One heartbeat as the sender declared it (the aggregator clamps the timing)."""

    service: str
    instance: str
    incarnation: str
    seq: int
    interval_ms: int
    misses: int
    sent_ms: int
    status: str = "ok"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def routing_key(self) -> str:
        return Names.heartbeat_routing_key(self.service, self.instance)

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.instance)

    def encode(self, meta_json: bytes | None = None) -> bytes:
        """The message body; ``meta_json``: ``self.meta`` already encoded by the caller."""
        doc = {
            "v": WIRE_VERSION,
            "svc": self.service,
            "inst": self.instance,
            "inc": self.incarnation,
            "seq": self.seq,
            "ivl_ms": self.interval_ms,
            "sent_ms": self.sent_ms,
        }
        if self.misses != DEFAULT_MISSES:  # 11 bytes saved on almost every beat
            doc["misses"] = self.misses
        if self.status != "ok":  # 14 bytes saved on almost every beat
            doc["status"] = self.status
        head = orjson.dumps(doc)
        meta = orjson.dumps(self.meta) if meta_json is None else meta_json
        return b"".join((head[:-1], b',"meta":', meta, b"}"))


def _load_object(body: bytes, limit: int) -> dict[str, Any]:
    if len(body) > limit:
        raise InvalidMessage("oversized", f"{len(body)} bytes, the limit is {limit}")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("malformed", f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidMessage("malformed", f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("v") != WIRE_VERSION:
        raise InvalidMessage("version", f"unsupported version {doc.get('v')!r}")
    return doc


#: names that passed NAME_RE (an aggregator sees the same few thousand again and again: the
#: regex cost more than the rest of the checks); emptied when it reaches _KNOWN_NAMES_MAX
_known_names: set[str] = set()
_KNOWN_NAMES_MAX = 1 << 18


def valid_name(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a string that is a valid name (NAME_RE)."""
    if not isinstance(value, str):
        return False
    if value in _known_names:
        return True
    if not NAME_RE.fullmatch(value):
        return False
    if len(_known_names) >= _KNOWN_NAMES_MAX:
        _known_names.clear()
    _known_names.add(value)
    return True


def _check_heartbeat_fields(doc: dict[str, Any]) -> None:
    for name in _NAME_FIELDS:
        value = doc.get(name)
        if not isinstance(value, str):
            raise InvalidMessage("schema", f"field {name!r} must be a string")
        if not valid_name(value):
            raise InvalidMessage("name", f"field {name!r} = {value[:80]!r} is not a valid name")
    doc.setdefault("misses", DEFAULT_MISSES)
    for name in _INT_FIELDS:
        value = doc.get(name)
        if type(value) is not int or not 0 <= value <= MAX_INT:
            raise InvalidMessage("schema", f"field {name!r} must be an integer in 0..2**53")
    if doc["ivl_ms"] == 0 or doc["misses"] == 0:
        raise InvalidMessage("schema", "ivl_ms and misses must be positive")
    if doc.get("status", "ok") not in STATUSES:
        raise InvalidMessage("schema", f"status must be one of {sorted(STATUSES)}")
    if type(doc.get("meta", _NO_META)) is not dict:
        raise InvalidMessage("schema", "meta must be a JSON object")


_NO_META: dict[str, Any] = {}


def decode_heartbeat(body: bytes, routing_key: str | None = None) -> Heartbeat:
    """Parse and validate one heartbeat; raise InvalidMessage with a reason otherwise."""
    doc = _load_object(body, MAX_MESSAGE_BYTES)
    _check_heartbeat_fields(doc)
    service, instance = doc["svc"], doc["inst"]
    if routing_key is not None and routing_key != f"hb.{service}.{instance}":
        expected = Names.heartbeat_routing_key(service, instance)
        raise InvalidMessage(
            "routing-key", f"routing key {routing_key!r} does not match {expected!r}"
        )
    return Heartbeat(
        service,
        instance,
        doc["inc"],
        doc["seq"],
        doc["ivl_ms"],
        doc["misses"],
        doc["sent_ms"],
        doc.get("status", "ok"),
        doc.get("meta") or {},
    )


@dataclass(frozen=True, slots=True)
class Event:
    """A transition of one instance, as published on ``<ns>.events``.

    ``id`` is stable: a redelivered or republished event has the same id. ``ord`` grows with
    every transition of the same instance, so a consumer can tell an older event from a newer one.
    """

    id: str
    kind: str
    service: str
    instance: str
    incarnation: str
    seq: int
    ord: int
    at_ms: int
    last_seen_ms: int
    ttl_ms: int
    prev: str
    meta: dict[str, Any]
    raw: bytes = b""
    #: a `joined` that only rebuilds state after Redis lost its data
    resync: bool = False
    #: mass-expiry events: the tripped scope (``service:api``, ``zone:eu-1``)
    scope: str = ""
    #: what an action reports (``promoted``, ``routes``, ``action.*`` events)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def routing_key(self) -> str:
        if self.kind.startswith("observer."):
            return self.kind
        if self.kind == "mass-expiry":
            return "mass-expiry." + self.scope.replace(":", ".", 1)
        return Names.event_routing_key(self.kind, self.service or "_", self.instance or "_")

    @property
    def instance_id(self) -> str:
        return f"{self.service}/{self.instance}"

    def to_dict(self) -> dict[str, Any]:
        """The event as it was published (every field, also those this class does not name);
        for an event built here rather than decoded, its fields."""
        if self.raw:
            return orjson.loads(self.raw)  # type: ignore[no-any-return]
        return {k: getattr(self, k) for k in self.__slots__ if k != "raw"}  # type: ignore[attr-defined]


_EVENT_STR = ("id", "kind", "service", "instance", "incarnation", "prev")
_EVENT_INT = ("seq", "ord", "at_ms", "last_seen_ms", "ttl_ms")


def decode_event(body: bytes | str) -> Event:
    """Parse one event; raise InvalidMessage when it is not an hbbus event."""
    raw = body.encode() if isinstance(body, str) else body
    doc = _load_object(raw, 64 * 1024)
    for name in _EVENT_STR:
        if not isinstance(doc.get(name), str):
            raise InvalidMessage("schema", f"event field {name!r} must be a string")
    for name in _EVENT_INT:
        if type(doc.get(name)) is not int:
            raise InvalidMessage("schema", f"event field {name!r} must be an integer")
    meta = doc.get("meta")
    data = doc.get("data")
    return Event(
        id=doc["id"],
        kind=doc["kind"],
        service=doc["service"],
        instance=doc["instance"],
        incarnation=doc["incarnation"],
        seq=doc["seq"],
        ord=doc["ord"],
        at_ms=doc["at_ms"],
        last_seen_ms=doc["last_seen_ms"],
        ttl_ms=doc["ttl_ms"],
        prev=doc["prev"],
        meta=meta if isinstance(meta, dict) else {},
        raw=raw,
        resync=doc.get("resync") is True,
        scope=str(doc.get("scope") or ""),
        data=data if isinstance(data, dict) else {},
    )


def new_event(
    kind: str,
    service: str,
    instance: str,
    *,
    key: str,
    at_ms: int,
    data: dict[str, Any],
    meta: dict[str, Any] | None = None,
    incarnation: str = "",
) -> Event:
    """An event published by a failover action (``promoted``, ``routes``, ``action.*``).

    Its ``id`` is derived from ``key`` (what it describes), so a republished copy has the same
    id; its ``ord`` is 0: such events are not ordered against an instance's transitions.
    """
    if kind not in ACTION_KINDS:
        raise ValueError(f"{kind!r} is not an action event kind")
    digest = hashlib.sha1(f"{kind}|{key}".encode(), usedforsecurity=False).hexdigest()[:24]
    doc = {
        "v": WIRE_VERSION,
        "id": digest,
        "kind": kind,
        "service": service,
        "instance": instance,
        "incarnation": incarnation,
        "seq": 0,
        "ord": 0,
        "at_ms": at_ms,
        "last_seen_ms": 0,
        "ttl_ms": 0,
        "prev": "",
        "meta": meta or {},
        "data": data,
    }
    return decode_event(orjson.dumps(doc))


def encode_probe(aggregator: str, stamp_ms: int) -> bytes:
    """A watermark probe: sent by an aggregator through the heartbeat queue, stamped with
    (its estimate of) Redis time."""
    return orjson.dumps({"v": WIRE_VERSION, "probe": aggregator, "t": stamp_ms})


def decode_probe(body: bytes) -> int:
    """The stamp of a probe; InvalidMessage when it is not one."""
    doc = _load_object(body, 1024)
    stamp = doc.get("t")
    if type(stamp) is not int or not 0 < stamp <= MAX_INT or not isinstance(doc.get("probe"), str):
        raise InvalidMessage("schema", "a probe needs a string 'probe' and an integer 't'")
    return stamp
