"""Shared helpers of the benchmark scripts: the machine and versions header, a private
namespace, aggregator processes, a fast raw publisher, Prometheus scraping and result rows.

Benchmarks are scripts, never timed assertions in tests. Every script prints the machine,
the versions and its parameters, and (with ``--json FILE``) appends its result rows to FILE
for ``bench/all.py``'s table.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiormq
import orjson
import pamqp.frame
import pamqp.header
from aiormq.abc import ChannelFrame

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hbbus.amqp import connect, declare_ingest  # noqa: E402
from hbbus.names import Names  # noqa: E402
from hbbus.settings import Settings  # noqa: E402
from hbbus.store import Store  # noqa: E402
from hbbus.wire import MAX_MESSAGE_BYTES, Heartbeat  # noqa: E402
from tests.helpers import drop_namespace  # noqa: E402

TYPICAL_META = {
    "endpoint": "10.0.12.34:8080",
    "role": "replica",
    "zone": "eu-1",
    "version": "1.4.2",
}


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, {model}, load {load}, Python {platform.python_version()}"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


async def server_versions(settings: Settings) -> str:
    store = Store.from_settings(settings)
    try:
        info = await store.redis.info("server")
    finally:
        await store.close()
    connection = await aiormq.connect(settings.amqp_url)
    try:
        props = connection.server_properties
        rabbit = props.get("version", "?")
        rabbit = rabbit.decode() if isinstance(rabbit, bytes) else rabbit
    finally:
        await connection.close()
    libs = ", ".join(
        f"{d} {_version(d)}" for d in ("aio-pika", "aiormq", "redis", "hiredis", "orjson", "uvloop")
    )
    return f"RabbitMQ {rabbit}; Redis {info['redis_version']}; {libs}"


async def header(title: str, settings: Settings, params: dict[str, Any]) -> None:
    print(f"== {title}")
    print(f"machine: {machine()}")
    print(f"versions: {await server_versions(settings)}")
    print("parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()), flush=True)


def fresh_settings(tag: str) -> Settings:
    return Settings.from_env().with_namespace(f"bench-{tag}-{secrets.token_hex(3)}")


@contextlib.asynccontextmanager
async def namespace(tag: str, extra_queues: Sequence[str] = ()) -> AsyncIterator[Settings]:
    """A private namespace, dropped (keys, queues, exchanges) afterwards."""
    settings = fresh_settings(tag)
    try:
        yield settings
    finally:
        # the do-nothing consumers' queues (bench/ingest.py) go with it
        null = [f"{settings.namespace}.null", f"{settings.namespace}.null2"]
        await drop_namespace(settings, [*extra_queues, *null])


# -- results -------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the final table."""

    bench: str
    metric: str
    value: str
    target: str = ""
    met: bool | None = None
    note: str = ""


def emit(rows: Sequence[Row], json_path: str | None) -> None:
    for row in rows:
        verdict = {True: "met", False: "NOT met", None: ""}[row.met]
        print(f"  {row.metric:<52} {row.value:>18}  {row.target:<14} {verdict}")
    if json_path:
        with open(json_path, "ab") as fh:
            for row in rows:
                fh.write(orjson.dumps(asdict(row)) + b"\n")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


# -- processes -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    metrics_port: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout_s: float = 15) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(
    args: Sequence[str], settings: Settings, metrics_port: int = 0, *, pipe: bool = False
) -> Proc:
    """``python ARGS`` in the namespace of ``settings`` (stdout piped, as text, with ``pipe``)."""
    env = {**os.environ, "HBBUS_NAMESPACE": settings.namespace}
    env["HBBUS_AMQP_URL"], env["HBBUS_REDIS_URL"] = settings.amqp_url, settings.redis_url
    popen = subprocess.Popen(
        [sys.executable, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if pipe else None,
        text=pipe,
    )
    return Proc(popen, metrics_port)


def spawn_aggregator(settings: Settings, *extra: str) -> Proc:
    """``python -m hbbus.cli aggregator`` as a real process, with a metrics port to watch."""
    port = free_port()
    args = ["-m", "hbbus.cli", "aggregator", "--metrics-port", str(port), *extra]
    return spawn(args, settings, port)


@contextlib.contextmanager
def profiled(pid: int, out: str | None, duration_s: int = 0) -> Iterator[None]:
    """With ``out``: ``py-spy record`` the process while the block runs (an SVG flame graph, or
    collapsed stacks when ``out`` ends in ``.txt``)."""
    if not out:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args = [spy, "record", "--pid", str(pid), "-o", out, "--rate", "200", "--nonblocking"]
    if out.endswith(".txt"):  # collapsed stacks, for reading or flamegraph.pl
        args += ["--format", "raw"]
    if duration_s:
        args += ["--duration", str(duration_s)]
    prof = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        prof.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            prof.wait(30)


async def scrape(port: int, name: str) -> float:
    """The value of a Prometheus counter served by a worker (0 if not up yet); ``name`` with
    its labels as exposed, e.g. ``hbbus_events_published_total{kind="joined"}``."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0.0
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    body = await reader.read()
    writer.close()
    prefix = name.encode() + b" "
    for line in body.splitlines():
        if line.startswith(prefix):
            return float(line.split()[1])
    return 0.0


async def applied(procs: Sequence[Proc]) -> int:
    """Heartbeats the aggregator processes have applied to Redis, in all."""
    counts = await asyncio.gather(
        *(scrape(p.metrics_port, "hbbus_heartbeats_total") for p in procs)
    )
    return int(sum(counts))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_ready(procs: Sequence[Proc], timeout_s: float = 30) -> None:
    """Until every aggregator's metrics port answers (it is then consuming soon after)."""
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", proc.metrics_port)
                writer.close()
                break
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aggregator {proc.pid} did not start")
            await asyncio.sleep(0.05)


# -- RabbitMQ ------------------------------------------------------------------------------
async def queue_depth(settings: Settings, name: str) -> int:
    """Ready messages in a queue (not those delivered and unacked)."""
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(name, passive=True)
        return int(ok.message_count or 0)
    finally:
        await connection.close()


async def declare(settings: Settings, null_queue: str | None = None) -> None:
    """The ingest topology, and optionally a second queue bound to the same heartbeats."""
    names = Names(settings.namespace)
    connection = await connect(settings, "bench-declare", robust=False)
    async with connection:
        channel = await connection.channel()
        await declare_ingest(channel, names)
        if null_queue:
            queue = await channel.declare_queue(null_queue, durable=False)
            await queue.bind(names.heartbeats_exchange, "hb.#")


def beat_body(
    service: str, k: int, seq: int, meta: dict[str, Any], interval_ms: int = 1000
) -> bytes:
    beat = Heartbeat(
        service, f"i{k}", "inc", seq, interval_ms, 3, int(time.time() * 1000), "ok", meta
    )
    return beat.encode()


class RawPublisher:
    """Encoded heartbeats as AMQP frames written in chunks (no confirms): a fleet without the
    clients, costing the cores it shares with the observer as little as it can.

    In a real deployment the services heartbeat from other machines; here the publisher
    shares two cores with the broker, Redis and the aggregator, so what it costs is taken from
    what it measures. ``send`` marshals a message's three frames (Basic.Publish, kept per
    routing key; the content header, kept per body size; the body) and appends them to a
    buffer; every 64 KiB the buffer goes into the connection's write queue as one
    ``ChannelFrame`` (aiormq's own writer sends it), and waits until it is written, which bounds
    what waits in memory to about two chunks. Paced senders call :meth:`push` before they
    sleep, so nothing waits in the buffer across a pause. (The Basic.Publish frames kept per
    routing key take about 6 MB at 100k instances.) With ``Channel.basic_publish`` per
    message the publisher of the 100k detection bench took 30 % of a core, now 5 %
    (docs/benchmarks.md, seventh round).
    """

    CHUNK = 64 * 1024

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.exchange = Names(settings.namespace).heartbeats_exchange
        self._connection: aiormq.abc.AbstractConnection | None = None
        self.channel: aiormq.abc.AbstractChannel | None = None
        self._methods: dict[str, bytes] = {}  # routing key -> marshalled Basic.Publish
        self._headers: dict[int, bytes] = {}  # body size -> marshalled content header
        self._buffer: list[bytes] = []
        self._buffered = 0

    async def __aenter__(self) -> RawPublisher:
        self._connection = await aiormq.connect(self.settings.amqp_url)
        self.channel = await self._connection.channel(publisher_confirms=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self.flush()
            await self._connection.close()

    def _frames(self, routing_key: str, body: bytes) -> None:
        assert self.channel is not None
        number = self.channel.number
        method = self._methods.get(routing_key)
        if method is None:
            publish = aiormq.spec.Basic.Publish(exchange=self.exchange, routing_key=routing_key)
            method = self._methods[routing_key] = pamqp.frame.marshal(publish, number)
        size = len(body)
        assert 0 < size <= MAX_MESSAGE_BYTES  # one body frame (frame_max is 128 KiB here)
        header = self._headers.get(size)
        if header is None:
            content = pamqp.header.ContentHeader(
                body_size=size, properties=aiormq.spec.Basic.Properties(delivery_mode=1)
            )
            header = self._headers[size] = pamqp.frame.marshal(content, number)
        self._buffer += (method, header, _BODY_FRAME.pack(3, number, size), body, b"\xce")
        self._buffered += len(method) + len(header) + size + 8

    async def send(self, service: str, instance: str, body: bytes) -> None:
        self._frames(f"hb.{service}.{instance}", body)
        if self._buffered >= self.CHUNK:
            await self.push()

    async def push(self) -> None:
        """Hand what is buffered to the connection's writer, and wait until it is written."""
        if not self._buffer:
            return
        assert self.channel is not None and self._connection is not None
        payload = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        written = self.channel.create_future()
        frame = ChannelFrame(payload=payload, should_close=False, drain_future=written)
        await self._connection.write_queue.put(frame)
        await written

    async def flush(self) -> None:
        """Until the broker has read every frame sent so far (a round trip behind them)."""
        assert self.channel is not None
        await self.push()
        await self.channel.basic_qos(prefetch_count=0)


_BODY_FRAME = struct.Struct(">BHI")  # frame type 3 (body), channel, size; then body, 0xCE


def run(main: Any) -> Any:
    """uvloop where installed, like the workers."""
    from hbbus.runtime import run as hb_run

    return hb_run(main)


def common_args(parser: Any) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a quick look")
    parser.add_argument("--json", metavar="FILE", help="append the result rows to FILE")
    parser.add_argument("--profile", metavar="SVG", help="py-spy record the aggregator")


def now_ms() -> int:
    return int(time.time() * 1000)
