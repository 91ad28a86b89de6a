"""Fixtures: real servers (strict under CI=true), one namespace per test, running workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiormq.connection
import pytest

from hbbus.amqp import use_buffered_frame_reader
from hbbus.settings import Settings
from hbbus.store import StoreConfig
from hbbus.workers.aggregator import Aggregator, AggregatorConfig
from tests.helpers import EventSink, drop_namespace
from tests.servers import PrivateRabbit, PrivateRedis

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1
        ):
            return True
    except OSError:
        return False


def require(ok: bool, what: str) -> None:
    """Skip on a laptop without the server; fail under CI, where it must be there."""
    if ok:
        return
    if CI:
        pytest.fail(f"{what} is required under CI=true", pytrace=False)
    pytest.skip(f"{what} not available")


def _docker_engine() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# pytest-docker, used only when the servers do not answer and a Docker engine exists
@pytest.fixture(scope="session")
def docker_compose_file(pytestconfig: pytest.Config) -> str:
    return str(Path(pytestconfig.rootpath) / "compose" / "compose.yaml")


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    return ["up -d rabbitmq redis"]


@pytest.fixture(scope="session")
def base_settings(request: pytest.FixtureRequest) -> Settings:
    """Servers from HBBUS_AMQP_URL/HBBUS_REDIS_URL (default: localhost); where they do not
    answer and a Docker engine exists, compose/ starts them through pytest-docker."""
    settings = Settings.from_env()
    up = _answers(settings.amqp_url, 5672) and _answers(settings.redis_url, 6379)
    if not up and _docker_engine():
        services = request.getfixturevalue("docker_services")
        services.wait_until_responsive(
            check=lambda: _answers(settings.amqp_url, 5672) and _answers(settings.redis_url, 6379),
            timeout=120,
            pause=1,
        )
    require(_answers(settings.amqp_url, 5672), f"RabbitMQ at {settings!r}")
    require(_answers(settings.redis_url, 6379), f"Redis at {settings!r}")
    return settings


@pytest.fixture
async def settings(
    base_settings: Settings, request: pytest.FixtureRequest
) -> AsyncIterator[Settings]:
    """The shared servers, in a namespace of this test's own, removed afterwards."""
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name)[:30].strip("-")
    s = base_settings.with_namespace(f"t-{stem}-{secrets.token_hex(3)}")
    yield s
    await drop_namespace(s)


@pytest.fixture
def need_tool() -> Callable[[str], str]:
    def need(tool: str) -> str:
        path = shutil.which(tool)
        require(path is not None, f"the {tool!r} command")
        return path  # type: ignore[return-value]

    return need


FAST = AggregatorConfig(store=StoreConfig(lease_ms=1500), reaper_max_sleep_ms=20)


class RunningAggregator:
    """An in-process aggregator under test: ``stop()`` drains it, ``kill()`` cancels it."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[object] = asyncio.create_task(aggregator.run(self.stop_event))

    async def started(self) -> RunningAggregator:
        ready = asyncio.ensure_future(self.aggregator.ready.wait())
        await asyncio.wait({self.task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self.task.done():
            self.task.result()
        assert self.aggregator.ready.is_set(), "aggregator did not start"
        return self

    async def stop(self) -> object:
        self.stop_event.set()
        return await asyncio.wait_for(self.task, 15)

    async def kill(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


@pytest.fixture
async def aggregators(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., object]]:
    """Start in-process aggregators: ``await start(n=1, config=FAST)``; stopped at teardown.
    They read as ``hbbus aggregator`` does: through the buffered frame reader, which hands
    their deliveries out directly (for the test, every connection opened meanwhile does)."""
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", aiormq.connection.FrameReceiver)
    assert use_buffered_frame_reader(), "the workers' frame reader does not install"
    running: list[RunningAggregator] = []

    async def start(
        n: int = 1, config: AggregatorConfig = FAST, s: Settings | None = None
    ) -> list[RunningAggregator]:
        started = []
        for _ in range(n):
            agg = Aggregator(s or settings, config, name=f"test-aggregator-{len(running)}")
            handle = RunningAggregator(agg)
            running.append(handle)
            started.append(await handle.started())
        return started

    yield start
    for handle in running:
        handle.stop_event.set()
    for handle in running:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(handle.task, 15)


@pytest.fixture
async def sink(settings: Settings) -> AsyncIterator[EventSink]:
    s = await EventSink(settings).start()
    yield s
    await s.close()


@pytest.fixture(scope="module")
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of this module's own, on a free port (about 5 s to start)."""
    require(shutil.which("rabbitmq-server") is not None, "rabbitmq-server")
    rabbit = PrivateRabbit()
    try:
        rabbit.start()
    except BaseException:
        rabbit.stop()
        raise
    yield rabbit
    rabbit.stop()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of this test's own, on a free port, that the test may kill."""
    require(shutil.which("redis-server") is not None, "redis-server")
    server = PrivateRedis().start()
    yield server
    server.stop()
