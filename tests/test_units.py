"""Pure logic, no servers: wire format, settings, names, matching, clamping, retry maths."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from hbbus.cli.main import parse_meta
from hbbus.client import new_incarnation
from hbbus.errors import ConfigError, InvalidMessage
from hbbus.failover import RetryPolicy
from hbbus.names import Names, split_instance_id
from hbbus.ops import listpack_advice, topic_match
from hbbus.settings import NAME_RE, Settings, redact
from hbbus.store import ClaimResult, OutEvent, decode_record, encode_record
from hbbus.wire import (
    MAX_MESSAGE_BYTES,
    Heartbeat,
    decode_event,
    decode_heartbeat,
    valid_name,
)
from hbbus.workers.aggregator import SENDING_BATCHES, Aggregator, AggregatorConfig, coalesce
from tests.helpers import wait_until

names = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=20)
)


def beat(**kw):
    base = dict(
        service="api",
        instance="api-1",
        incarnation="inc",
        seq=1,
        interval_ms=1000,
        misses=3,
        sent_ms=1,
        status="ok",
        meta={},
    )
    base.update(kw)
    return Heartbeat(**base)


@given(
    service=names,
    instance=names,
    incarnation=names,
    seq=st.integers(0, 2**53),
    interval_ms=st.integers(1, 10**7),
    misses=st.integers(1, 100),
    meta=st.dictionaries(st.text(max_size=10), json_scalars, max_size=5),
)
def test_heartbeat_roundtrip(service, instance, incarnation, seq, interval_ms, misses, meta):
    hb = Heartbeat(service, instance, incarnation, seq, interval_ms, misses, 1, "ok", meta)
    assert decode_heartbeat(hb.encode(), hb.routing_key) == hb


@given(st.binary(max_size=200))
def test_decoder_never_crashes_on_garbage(body):
    try:
        decode_heartbeat(body)
    except InvalidMessage as exc:
        assert exc.reason in ("oversized", "malformed", "version", "schema", "name", "routing-key")


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (b"not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (orjson.dumps({"v": 2}), "version"),
        (orjson.dumps({**orjson.loads(beat().encode()), "svc": "a.b"}), "name"),
        (orjson.dumps({**orjson.loads(beat().encode()), "inst": "x" * 65}), "name"),
        (orjson.dumps({**orjson.loads(beat().encode()), "seq": -1}), "schema"),
        (orjson.dumps({**orjson.loads(beat().encode()), "seq": "7"}), "schema"),
        (orjson.dumps({**orjson.loads(beat().encode()), "ivl_ms": 0}), "schema"),
        (orjson.dumps({**orjson.loads(beat().encode()), "status": "zombie"}), "schema"),
        (orjson.dumps({**orjson.loads(beat().encode()), "meta": [1]}), "schema"),
        (orjson.dumps({**orjson.loads(beat().encode()), "seq": True}), "schema"),
        (orjson.dumps({**orjson.loads(beat().encode()), "misses": 0}), "schema"),
        (orjson.dumps({**orjson.loads(beat().encode()), "misses": "3"}), "schema"),
        (orjson.dumps({**orjson.loads(beat().encode()), "svc": ["api"]}), "schema"),
        (orjson.dumps({**orjson.loads(beat().encode()), "inc": {"a": 1}}), "schema"),
        (orjson.dumps({**orjson.loads(beat().encode()), "inst": 7}), "schema"),
    ],
)
def test_invalid_heartbeats_have_reasons(doc, reason):
    with pytest.raises(InvalidMessage) as info:
        decode_heartbeat(doc)
    assert info.value.reason == reason


@given(st.text(max_size=70))
def test_a_name_is_valid_as_the_pattern_says_every_time(name):
    """valid_name remembers the names that passed: the first answer and the remembered one
    are both the pattern's."""
    expected = NAME_RE.fullmatch(name) is not None
    assert valid_name(name) is expected
    assert valid_name(name) is expected


def test_defaults_are_left_out_of_the_message():
    doc = orjson.loads(beat().encode())
    assert "misses" not in doc and "status" not in doc
    assert decode_heartbeat(beat().encode()).misses == 3
    doc = orjson.loads(beat(misses=5, status="draining").encode())
    assert doc["misses"] == 5 and doc["status"] == "draining"


def test_incarnations_are_short_distinct_names():
    incarnations = {new_incarnation() for _ in range(1000)}
    assert len(incarnations) == 1000
    assert all(len(inc) == 17 and NAME_RE.fullmatch(inc) for inc in incarnations)


def test_oversized_and_routing_key_mismatch():
    big = beat(meta={"blob": "x" * MAX_MESSAGE_BYTES}).encode()
    with pytest.raises(InvalidMessage, match="oversized"):
        decode_heartbeat(big)
    with pytest.raises(InvalidMessage, match="routing-key"):
        decode_heartbeat(beat().encode(), "hb.api.other")


def test_seq_beyond_double_precision_is_refused():
    with pytest.raises(InvalidMessage, match="schema"):
        decode_heartbeat(beat(seq=2**53 + 1).encode())


def test_event_decoding():
    body = orjson.dumps(
        {
            "v": 1,
            "id": "x",
            "kind": "dead",
            "service": "a",
            "instance": "b",
            "incarnation": "i",
            "seq": 1,
            "ord": 2,
            "at_ms": 3,
            "last_seen_ms": 1,
            "ttl_ms": 2,
            "prev": "alive",
            "meta": {"r": 1},
        }
    )
    event = decode_event(body)
    assert event.routing_key == "dead.a.b" and event.meta == {"r": 1}
    assert event.to_dict()["kind"] == "dead"
    with pytest.raises(InvalidMessage):
        decode_event(b'{"v": 1, "id": 3}')


def test_settings_from_env_and_overrides():
    env = {"HBBUS_AMQP_URL": "amqp://u:secret@h:1/", "HBBUS_NAMESPACE": "prod"}
    s = Settings.from_env(env, redis_url="redis://:pw@r:2/1")
    assert (s.amqp_url, s.namespace, s.redis_url) == (
        "amqp://u:secret@h:1/",
        "prod",
        "redis://:pw@r:2/1",
    )
    assert "secret" not in repr(s) and "pw" not in repr(s) and "***" in repr(s)
    assert Settings.from_env({}).namespace == "hbbus"
    with pytest.raises(ConfigError, match="scheme"):
        Settings(amqp_url="http://x/")
    with pytest.raises(ConfigError, match="scheme"):
        Settings(redis_url="mysql://x/")
    with pytest.raises(ConfigError, match="namespace"):
        Settings(namespace="a.b")


def test_redact():
    assert redact("amqp://guest:guest@h:5672/v") == "amqp://guest:***@h:5672/v"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


def test_names_carry_the_namespace():
    n = Names("ns1")
    every = [
        n.heartbeats_exchange,
        n.aggregator_queue,
        n.invalid_queue,
        n.events_exchange,
        n.failover_queue("g"),
        n.failover_dlq("g"),
        n.failover_retry_queue("g", 500),
    ]
    assert all(x.startswith("ns1.") for x in every)
    keys = [
        n.record_key("a", "b"),
        n.bucket_key("a", "b"),
        n.alive_key("a", "b"),
        n.deadlines_key,
        n.outbox_key,
        n.log_key,
        n.instances_key,
        n.failover_key("g", "order"),
    ]
    assert all(k.startswith("{ns1}:") for k in keys)
    assert split_instance_id("api/api-1") == ("api", "api-1")
    for bad in ("api", "api/", "/x", "a b/c"):
        with pytest.raises(ConfigError):
            split_instance_id(bad)


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("#", "dead.db.db-1", True),
        ("dead.#", "dead.db.db-1", True),
        ("dead.db.*", "dead.db.db-1", True),
        ("dead.db.*", "joined.db.db-1", False),
        ("*.db.*", "left.db.x", True),
        ("*.db", "left.db.x", False),
        ("#.x", "left.db.x", True),
        ("dead.#.x", "dead.x", True),
    ],
)
def test_topic_match(pattern, key, expected):
    assert topic_match(pattern, key) is expected


def test_coalesce_keeps_the_newest_per_instance():
    beats = [
        beat(seq=3),
        beat(seq=5),
        beat(seq=4),
        beat(instance="b", seq=9),
        beat(incarnation="new", seq=1),
    ]
    out = {b.key: b for b in coalesce(beats)}
    assert out[("api", "api-1")].incarnation == "new"
    assert out[("api", "b")].seq == 9
    assert [b.seq for b in coalesce(beats[:3])] == [5]


def test_clamp():
    cfg = AggregatorConfig(min_interval_ms=100, max_interval_ms=10_000, max_misses=5)
    assert cfg.clamp(beat(interval_ms=1, misses=1)) == (100, 100)
    assert cfg.clamp(beat(interval_ms=50_000, misses=50)) == (10_000, 50_000)
    assert cfg.clamp(beat(interval_ms=200, misses=3)) == (200, 600)


def test_retry_policy():
    policy = RetryPolicy(max_retries=4, base_s=0.5, max_s=2)
    assert [policy.delay_ms(n) for n in range(1, 5)] == [500, 1000, 2000, 2000]
    assert policy.delays_ms == [500, 1000, 2000]  # the retry queues to declare
    assert RetryPolicy(max_retries=0, base_s=0.1).delays_ms == [100]  # also used for "busy"
    with pytest.raises(ConfigError):
        RetryPolicy(max_retries=-1)


def test_parse_meta():
    assert parse_meta(("endpoint=10.0.0.1:80", "load=0.5", "primary=true", "v=")) == {
        "endpoint": "10.0.0.1:80",
        "load": 0.5,
        "primary": True,
        "v": "",
    }
    with pytest.raises(ConfigError):
        parse_meta(("novalue",))


def caught_up_aggregator(**config: Any) -> tuple[Aggregator, int]:
    """An aggregator (not running) whose clock estimate says Redis time is ``now``, with a
    probe stamped ``now`` sent and applied: the heartbeat queue is not behind."""
    config.setdefault("probe_interval_ms", 300)
    agg = Aggregator(Settings(namespace="units"), AggregatorConfig(**config))
    now = 1_000_000
    agg._clock_offset_ms = now - time.time() * 1000
    agg._probe_stamp_ms = agg._probe_applied_ms = now
    return agg, now


def test_no_probe_is_kicked_while_the_heartbeat_queue_is_behind():
    agg, now = caught_up_aggregator()
    agg._probe_for(now + 1)
    assert agg._probe_now.is_set() and agg._probe_due_ms == now + 1
    agg._probe_now.clear()
    agg._probe_applied_ms = now - 10 * 300 - 50  # no probe of the last ten intervals applied
    agg._probe_for(now + 2)
    assert not agg._probe_now.is_set()
    agg._probe_applied_ms = now
    agg._probe_for(now)  # covered by the probe on its way
    assert not agg._probe_now.is_set()


async def test_a_deadline_that_passes_while_the_reaper_waits_gets_a_probe_of_its_own():
    """A deadline past and vouched for by a probe on its way, and a later one a few ms
    after: the reaper, waiting for the watermark, has a probe sent for the later one when it
    passes, instead of one round trip after the other."""
    agg, now = caught_up_aggregator()
    result = ClaimResult(now, now - 5, [], upcoming_ms=now + 30)
    waiting = asyncio.ensure_future(agg._reaper_sleep(result, 0.05))
    await asyncio.sleep(0)
    assert not agg._probe_now.is_set()  # the past deadline has its probe
    await asyncio.wait_for(agg._probe_now.wait(), 5)
    assert agg._probe_due_ms == now + 30
    assert not waiting.done()  # and it still waits for the watermark
    agg._watermark_moved.set()
    await asyncio.wait_for(waiting, 5)


async def test_no_probe_is_sent_for_a_deadline_the_claim_has_not_seen_past():
    """A deadline still to come may move (a heartbeat): the reaper sleeps until it and lets
    the next claim say whether it passed; no probe goes for it before."""
    agg, now = caught_up_aggregator()
    await agg._reaper_sleep(ClaimResult(now, now + 20, []), 0.05)
    assert not agg._probe_now.is_set() and agg._probe_due_ms == 0


async def test_a_watermark_signal_set_before_the_wait_ends_it_at_once():
    """The reaper loop clears the signal before its claim, so a probe applied during the claim
    and its publishing leaves it set: the wait for the watermark must then end at once, not
    after a probe interval (one minute here)."""
    agg, now = caught_up_aggregator(probe_interval_ms=60_000)
    agg._watermark_moved.set()
    await asyncio.wait_for(agg._reaper_sleep(ClaimResult(now, now - 5, []), 0.05), 5)


def test_ingest_lingers_only_when_no_verdict_waits():
    agg, now = caught_up_aggregator()
    assert not agg._may_linger()  # nothing in hand
    agg._buffer = [object()]  # type: ignore[list-item]
    assert agg._may_linger()  # a few heartbeats in hand, nothing waits
    agg._buffer *= agg.config.linger_below
    assert not agg._may_linger()  # a big batch already
    agg._buffer = [object()]  # type: ignore[list-item]
    agg._probe_for(now + 1)  # a verdict waits for a probe not applied yet
    assert not agg._may_linger()
    agg._probe_applied_ms = now + 1
    assert agg._may_linger()
    off = Aggregator(Settings(namespace="units"), AggregatorConfig(linger_ms=0))
    off._buffer = [object()]  # type: ignore[list-item]
    assert not off._may_linger()


async def test_a_verdict_that_starts_waiting_ends_a_linger():
    agg, now = caught_up_aggregator(linger_ms=60_000)
    agg._buffer = [object()]  # type: ignore[list-item]
    lingering = asyncio.ensure_future(agg._linger())
    await asyncio.sleep(0)
    assert not lingering.done()
    agg._probe_for(now + 1)  # the reaper found a deadline past, after the last probe applied
    await asyncio.wait_for(lingering, 5)


class GatedPublisher:
    """Stands in for the aggregator's EventPublisher (the broker side is tested end to end in
    test_bus): each publish waits for ``gate``, then raises ``error`` or counts the events."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.gate = asyncio.Event()
        self.error = error
        self.running = 0

    async def publish(self, events: list[OutEvent]) -> int:
        self.running += 1
        await self.gate.wait()
        self.running -= 1
        if self.error is not None:
            raise self.error
        return len(events)


def one_event(n: int) -> list[OutEvent]:
    return [OutEvent(f"e{n}", f"joined.svc.i{n}", "{}")]


async def test_ingest_sends_its_events_while_it_goes_on_and_at_most_a_few_batches_at_once():
    agg, _ = caught_up_aggregator()
    agg.publisher = publisher = GatedPublisher()  # type: ignore[assignment]
    for n in range(SENDING_BATCHES):  # a slot at once; the send runs in the background
        await asyncio.wait_for(agg._send_slot(), 5)
        agg._send(one_event(n))
    await wait_until(lambda: publisher.running == SENDING_BATCHES, 5, "the sends to start")
    slot = asyncio.ensure_future(agg._send_slot())
    await asyncio.sleep(0)  # the slot's turn: nothing frees one while the gate is closed
    assert not slot.done()  # the bound holds ingest back
    publisher.gate.set()
    await asyncio.wait_for(slot, 5)
    agg._send(one_event(99))
    await wait_until(lambda: not agg._sending, 5, "the sends to end")
    assert agg.counts["events"] == SENDING_BATCHES + 1 and agg._send_error is None


async def test_a_bug_in_a_background_send_stops_ingest_and_redis_trouble_does_not():
    agg, _ = caught_up_aggregator()
    agg.publisher = publisher = GatedPublisher(RedisConnectionError("finalize failed"))  # type: ignore[assignment]
    publisher.gate.set()
    agg._send(one_event(1))
    await wait_until(lambda: not agg._sending, 5, "the send to end")
    assert agg._send_error is None  # the events stay in the outbox; a reaper sends them
    publisher.error = RuntimeError("a bug")
    agg._send(one_event(2))
    await wait_until(lambda: not agg._sending, 5, "the send to end")
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(agg._ingest_loop(None), 5)  # type: ignore[arg-type]


class OneJoinStore:
    """Stands in for the Store in ``_process``: every ingest call records one event."""

    async def ingest(self, chunk: list[Any], name: str, probe: int) -> tuple[int, list[OutEvent]]:
        return 0, one_event(len(chunk))


class AckingChannel:
    def __init__(self) -> None:
        self.acked: list[int] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acked.append(delivery_tag)


async def test_a_batch_is_acked_before_its_events_are_confirmed():
    """The ack does not wait for the broker's confirm of the events the batch recorded (the
    outbox holds them); the events are still published, and counted, afterwards."""
    agg, _ = caught_up_aggregator()
    agg.publisher = publisher = GatedPublisher()  # type: ignore[assignment]
    channel = AckingChannel()
    body = Heartbeat("svc", "i1", "inc", 1, 1000, 3, 1, "ok", {}).encode()
    message = SimpleNamespace(routing_key="hb.svc.i1", body=body, channel=channel, delivery_tag=7)
    await asyncio.wait_for(agg._process(OneJoinStore(), [message]), 5)  # type: ignore[arg-type]
    assert channel.acked == [7] and len(agg._sending) == 1 and agg.counts["events"] == 0
    publisher.gate.set()
    await wait_until(lambda: agg.counts["events"] == 1, 5, "the event to be published")


_names = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
_ms = st.integers(0, 2**45)


@given(
    last=_ms,
    first=_ms,
    since=_ms,
    ord_=_ms,
    inc=_names,
    hist_inc=_names,
    at=_ms,
    ttl=st.integers(1, 10**6),
    dttl=st.integers(1, 10**6),
    status=st.sampled_from(["ok", "draining", "left"]),
    meta=st.dictionaries(_names, st.text(max_size=8), max_size=3),
    same_inc=st.booleans(),
    hist_ttl=st.one_of(st.none(), st.integers(1, 10**6)),
)
def test_a_packed_record_comes_back_whole(
    last, first, since, ord_, inc, hist_inc, at, ttl, dttl, status, meta, same_inc, hist_ttl
):
    """encode_record and decode_record (rec_pack and rec_unpack in common.lua) are inverses:
    whatever they leave out or keep as a distance comes back as it was."""
    row = {
        "state": "alive",
        "inc": inc,
        "seq": "3",
        "ord": str(ord_),
        "last": str(last),
        "ttl": str(ttl),
        "dttl": str(dttl),
        "status": status,
        "first": str(first),
        "since": str(since),
        "hist": f"joined none {inc if same_inc else hist_inc} 1 {at} 2 0 {hist_ttl or ttl} -",
        "meta": orjson.dumps(meta).decode(),
        "svc": "svc",
        "inst": "a",
    }
    assert decode_record("svc/a", encode_record(row)) == row


def test_doctor_advises_the_listpack_setting_that_keeps_records_compact():
    ok, text = listpack_advice(64)
    assert not ok and "CONFIG SET hash-max-listpack-value 1024" in text
    assert listpack_advice(1024)[0] and listpack_advice(4096)[0]
