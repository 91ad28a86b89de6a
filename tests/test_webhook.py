"""The webhook action against a real HTTP receiver in the test: each event arrives once per
group, signed; a receiver that answers 500 twice gets the event on the third try; what was
done is published as action.succeeded / action.failed events."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest

from hbbus.client import Heartbeater
from hbbus.errors import ActionFailed, ConfigError, PermanentFailure
from hbbus.failover import FailoverConsumer, RetryPolicy
from hbbus.settings import Settings
from hbbus.signing import sign, verify
from hbbus.workers.webhook import WebhookAction, read_secret
from tests.helpers import EventSink, running, wait_until
from tests.test_routing import event

SECRET = b"s3cret-for-tests"


class Receiver:
    """POSTs land in ``requests`` as (path, event id, signature ok, body); ``fail[(path, id)]``
    says how many times to answer 500 first."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bool, dict[str, object]]] = []
        self.fail: dict[tuple[str, str], int] = {}
        self.status_for: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify(
                    SECRET,
                    body,
                    self.headers.get("X-Hbbus-Timestamp"),
                    self.headers.get("X-Hbbus-Signature"),
                )
                event_id = self.headers.get("X-Hbbus-Event-Id", "")
                receiver.requests.append((self.path, event_id, ok, orjson.loads(body)))
                status = receiver.status_for.get(self.path, 200)
                if receiver.fail.get((self.path, event_id), 0) > 0:
                    receiver.fail[(self.path, event_id)] -= 1
                    status = 500
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self, path: str, kind: str | None = None) -> Counter[str]:
        return Counter(
            eid for p, eid, _, body in self.requests if p == path and kind in (None, body["kind"])
        )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def hook(settings: Settings, group: str, url: str) -> FailoverConsumer:
    consumer = FailoverConsumer(
        settings,
        group,
        ["joined.hooked.*", "dead.hooked.*"],
        retry=RetryPolicy(max_retries=4, base_s=0.2, max_s=1),
    )
    consumer.add_action(WebhookAction(url, secret=SECRET, timeout_s=2))
    return consumer


async def test_each_event_once_per_group_signed_and_the_third_try_lands(
    settings, aggregators, receiver
):
    await aggregators(1)
    actions = await EventSink(settings, "action.#").start()
    g1 = hook(settings, "hooks-1", receiver.url + "/g1")
    g2 = hook(settings, "hooks-2", receiver.url + "/g2")
    hb = Heartbeater("hooked", "h-1", interval_s=0.2, misses=3, settings=settings)
    try:
        # events wait in the groups' durable queues: the receiver is armed before they run
        await declared(g1, g2)
        await hb.start()
        await wait_until(lambda: hb.sent >= 3, 5, "heartbeats")
        await hb.abort()
        joined, dead = await _published(settings, ["joined", "dead"])
        receiver.fail[("/g1", dead["id"])] = 2  # group 1's receiver answers 500 twice
        async with running(g1, g2):
            await wait_until(lambda: receiver.ids("/g1")[dead["id"]] == 3, 15, "third try")
            await wait_until(lambda: receiver.ids("/g2")[dead["id"]] == 1, 15, "group 2")
            await actions.wait_for("action.succeeded", count=4, timeout_s=10)
            await asyncio.sleep(0.5)  # nothing more must come
        assert receiver.ids("/g1") == {joined["id"]: 1, dead["id"]: 3}
        assert receiver.ids("/g2") == {joined["id"]: 1, dead["id"]: 1}
        assert all(ok for _, _, ok, _ in receiver.requests), "a signature did not verify"
        assert all(body["id"] == eid for _, eid, _, body in receiver.requests)
        failed = [e for e in actions.of("action.failed") if e["data"]["for_id"] == dead["id"]]
        assert [e["data"]["attempt"] for e in failed] == [1, 2]
        assert all("HTTP 500" in e["data"]["error"] and not e["data"]["final"] for e in failed)
        landed = [
            e
            for e in actions.of("action.succeeded")
            if e["data"]["for_id"] == dead["id"] and e["data"]["group"] == "hooks-1"
        ]
        assert len(landed) == 1 and landed[0]["data"]["attempt"] == 3
    finally:
        await hb.abort()
        await actions.close()


async def declared(*consumers: FailoverConsumer) -> None:
    """Declare the groups' queues (start and stop each once) so events wait for them."""
    async with running(*consumers):
        pass


async def _published(settings: Settings, kinds: list[str]) -> list[dict[str, object]]:
    """The first event of each kind in the namespace's history, once all are there."""
    from hbbus import ops

    async def got() -> list[dict[str, object]] | None:
        events = await ops.recent_events(settings, "*.hooked.*", 20)
        first = {e["kind"]: e for e in reversed(events)}
        return [first[k] for k in kinds] if all(k in first for k in kinds) else None

    return await wait_until(got, 10, f"events {kinds}")  # type: ignore[no-any-return]


async def test_client_errors_are_permanent_and_unreachable_is_retried(receiver):
    receiver.status_for["/gone"] = 404
    action = WebhookAction(receiver.url + "/gone", secret=SECRET)
    await action.start(None)  # type: ignore[arg-type]
    try:
        with pytest.raises(PermanentFailure, match="HTTP 404"):
            await action.handle(event("dead", "x", 1))
    finally:
        await action.close()
    unreachable = WebhookAction("http://127.0.0.1:9/", timeout_s=1)
    await unreachable.start(None)  # type: ignore[arg-type]
    try:
        with pytest.raises(ActionFailed, match=r"POST http://127\.0\.0\.1:9/") as info:
            await unreachable.handle(event("dead", "x", 1))
        assert not isinstance(info.value, PermanentFailure)
    finally:
        await unreachable.close()


def test_signature_rules():
    body = b'{"id":"x"}'
    sig = sign(SECRET, 1_700_000_000, body)
    assert verify(SECRET, body, "1700000000", sig, now_s=1_700_000_010)
    assert not verify(SECRET, body + b" ", "1700000000", sig, now_s=1_700_000_010)
    assert not verify(b"other", body, "1700000000", sig, now_s=1_700_000_010)
    assert not verify(SECRET, body, "1700000000", sig, now_s=1_700_001_000)  # replayed
    assert not verify(SECRET, body, None, sig)


def test_secret_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("HOOK_SECRET", "abc")
    assert read_secret("HOOK_SECRET", None) == b"abc"
    with pytest.raises(ConfigError, match="NOPE is not set"):
        read_secret("NOPE", None)
    path = tmp_path / "secret"
    path.write_text("xyz\n")
    assert read_secret(None, str(path)) == b"xyz"
    with pytest.raises(ConfigError, match="not both"):
        read_secret("HOOK_SECRET", str(path))
