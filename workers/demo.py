"""``hbbus demo``: a small fleet of real Heartbeaters, two aggregator processes and a failover
consumer process against the real servers, with a scripted sequence of failures, shown live."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from hbbus import ops
from hbbus.amqp import connect, declare_events
from hbbus.client import Heartbeater
from hbbus.errors import Unavailable
from hbbus.names import Names
from hbbus.settings import Settings, redact
from hbbus.store import Store

INTERVAL_S = 0.5
MISSES = 3
FLEET = {"api": 4, "db": 3, "cache": 3}
INSTALL_HINT = (
    "start the servers first: `make servers` (uses Docker Compose where a Docker "
    "engine exists), or install them: `apt-get install rabbitmq-server redis-server`"
)


@dataclass
class DemoState:
    settings: Settings
    beaters: dict[str, Heartbeater] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    story: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    printed: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("story", "events", "actions"), 0)
    )

    def say(self, text: str) -> None:
        self.story.append(f"{time.monotonic() - self.started:5.1f}s  {text}")

    async def start_instance(self, service: str, instance: str) -> None:
        index = int(instance.rsplit("-", 1)[1])
        meta = {"endpoint": f"10.0.0.{index}:{8000 + index}", "version": "1.4.2"}
        if service == "db":
            meta["role"] = "primary" if index == 1 else "replica"
        hb = Heartbeater(
            service,
            instance,
            interval_s=INTERVAL_S,
            misses=MISSES,
            meta=meta,
            settings=self.settings,
        )
        await hb.start()
        self.beaters[instance] = hb

    async def crash(self, instance: str) -> None:
        await self.beaters.pop(instance).abort()
        self.say(f"[red]crash[/]: {instance} stops without a word")

    async def leave(self, instance: str) -> None:
        await self.beaters.pop(instance).stop(leave=True)
        self.say(f"[yellow]clean exit[/]: {instance} says goodbye")


async def _worker(settings: Settings, log: IO[str], *args: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "HBBUS_AMQP_URL": settings.amqp_url,
        "HBBUS_REDIS_URL": settings.redis_url,
        "HBBUS_NAMESPACE": settings.namespace,
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hbbus.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )


async def _check_servers(settings: Settings) -> None:
    async with ops.open_store(settings):
        pass
    connection = await connect(settings, "hbbus-demo check", robust=False)
    await connection.close()


async def _wait_for_consumers(settings: Settings, queue_name: str, count: int) -> None:
    """Wait (up to 30 s) until ``count`` workers consume ``queue_name``."""
    connection = await connect(settings, "hbbus-demo wait", robust=False)
    async with connection:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                queue = await channel.declare_queue(queue_name, passive=True)
                if (queue.declaration_result.consumer_count or 0) >= count:
                    return
            await asyncio.sleep(0.2)
    raise Unavailable("the demo's workers did not start within 30 s; see their log")


async def _collect_events(settings: Settings, state: DemoState, stop: asyncio.Event) -> None:
    connection = await connect(settings, "hbbus-demo events", robust=True)
    async with connection:
        channel = await connection.channel()
        exchange = await declare_events(channel, Names(settings.namespace))
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")

        async def on_event(message: Any) -> None:
            state.events.append(orjson.loads(message.body))

        await queue.consume(on_event, no_ack=True)
        await stop.wait()


async def _read_actions(proc: asyncio.subprocess.Process, state: DemoState) -> None:
    assert proc.stdout is not None
    async for line in proc.stdout:
        state.actions.append(line.decode().strip())


async def _poll_status(store: Store, state: DemoState, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):
            now_ms = await store.time_ms()
            state.rows = [ops.record_row(r, now_ms) for r in await store.records()]
        await asyncio.sleep(0.25)


def _render(state: DemoState) -> Group:
    from hbbus.cli.main import fmt_event, status_table, summary

    table = status_table(state.rows, title=summary(state.rows))
    recent = "\n".join(fmt_event(e)[11:] for e in state.events[-10:]) or "(none yet)"
    actions = "\n".join(state.actions[-6:]) or "(none yet)"
    return Group(
        table,
        Panel("\n".join(state.story[-8:]), title="what the demo does"),
        Panel(recent, title=f"events on {state.settings.namespace}.events"),
        Panel(actions, title="failover consumer (group demo, bound to dead.#)"),
    )


async def _script(
    state: DemoState,
    procs: list[asyncio.subprocess.Process],
    at: Callable[[float], Awaitable[None]],
) -> None:
    await at(0.15)
    await state.crash("api-2")
    await state.crash("db-1")
    await at(0.30)
    await state.leave("cache-1")
    await at(0.45)
    await state.start_instance("api", "api-2")
    state.say("[green]back[/]: api-2 restarts after it was declared dead")
    await at(0.55)
    await state.crash("db-2")
    await state.start_instance("db", "db-2")
    state.say("[cyan]quick restart[/]: db-2 restarts within its TTL")
    await at(0.65)
    procs[0].send_signal(signal.SIGKILL)
    state.say("[red]kill -9[/] aggregator #1: aggregator #2 carries on alone")
    await at(0.70)
    await state.crash("cache-2")


EXPECTED = [
    ("dead", "api-2"),
    ("dead", "db-1"),
    ("left", "cache-1"),
    ("recovered", "api-2"),
    ("restarted", "db-2"),
    ("dead", "cache-2"),
]


async def run_demo(settings: Settings, duration_s: float, keep: bool = False) -> int:
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        await _check_servers(settings)
    except Unavailable as exc:
        raise Unavailable(f"{exc}\n{INSTALL_HINT}") from None
    console.print(
        f"hbbus demo: namespace [bold]{settings.namespace}[/], RabbitMQ "
        f"{redact(settings.amqp_url)}, Redis {redact(settings.redis_url)}, "
        f"{duration_s:.0f}s",
        highlight=False,
    )
    state = DemoState(settings)
    stop = asyncio.Event()
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - the workers write to it until the end
        "w", prefix="hbbus-demo-", suffix=".log", delete=False
    )
    procs = [await _worker(settings, log, "aggregator"), await _worker(settings, log, "aggregator")]
    action = 'echo "$(date +%T) rerouting traffic away from $HBBUS_SERVICE/$HBBUS_INSTANCE"'
    procs.append(
        await _worker(
            settings,
            log,
            "failover",
            "run",
            "--group",
            "demo",
            "--bind",
            "dead.#",
            "--exec",
            action,
            "--backoff",
            "0.5",
        )
    )
    store = Store.from_settings(settings, client_name="hbbus-demo")
    tasks = [
        asyncio.create_task(_collect_events(settings, state, stop)),
        asyncio.create_task(_read_actions(procs[2], state)),
        asyncio.create_task(_poll_status(store, state, stop)),
    ]
    try:
        await _wait_for_consumers(settings, Names(settings.namespace).aggregator_queue, 2)
        for service, n in FLEET.items():
            for i in range(1, n + 1):
                await state.start_instance(service, f"{service}-{i}")
        state.say(
            f"started {sum(FLEET.values())} instances (interval {INTERVAL_S}s, "
            f"{MISSES} misses: dead after {INTERVAL_S * MISSES:g}s of silence)"
        )
        await _run_live(console, state, duration_s, procs)
    finally:
        stop.set()
        for hb in state.beaters.values():
            await hb.stop()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 15)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not keep:
            await _cleanup(settings, store)
        await store.close()
        log.close()
    return _report(console, state, log.name)


async def _run_live(
    console: Console, state: DemoState, duration_s: float, procs: list[asyncio.subprocess.Process]
) -> None:
    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, state.started + fraction * duration_s - time.monotonic()))

    script = asyncio.create_task(_script(state, procs, at))
    if console.is_terminal:
        with Live(_render(state), console=console, refresh_per_second=8) as live:
            while time.monotonic() < state.started + duration_s:
                live.update(_render(state))
                await asyncio.sleep(0.125)
    else:  # piped or in CI: one line per thing that happens
        while time.monotonic() < state.started + duration_s:
            _print_new(console, state)
            await asyncio.sleep(0.2)
        _print_new(console, state)
    await script


def _print_new(console: Console, state: DemoState) -> None:
    """Print what happened since the last call: the story, events, failover actions."""
    from hbbus.cli.main import fmt_event

    printed = state.printed
    for line in state.story[printed["story"] :]:
        console.print(line, highlight=False)
    for event in state.events[printed["events"] :]:
        console.print("       event   " + fmt_event(event), highlight=False)
    for line in state.actions[printed["actions"] :]:
        console.print("       action  " + line, highlight=False)
    printed["story"], printed["events"] = len(state.story), len(state.events)
    printed["actions"] = len(state.actions)


async def _cleanup(settings: Settings, store: Store) -> None:
    with contextlib.suppress(Exception):
        await store.drop_namespace()
    names = Names(settings.namespace)
    with contextlib.suppress(Exception):
        connection = await connect(settings, "hbbus-demo cleanup", robust=False)
        async with connection:
            channel = await connection.channel()
            for queue in (
                names.aggregator_queue,
                names.invalid_queue,
                names.unrouted_queue,
                names.failover_queue("demo"),
                names.failover_dlq("demo"),
                names.failover_retry_queue("demo", 500),
                *[names.failover_retry_queue("demo", 500 * 2**i) for i in range(1, 5)],
            ):
                await channel.queue_delete(queue)
            for exchange in (
                names.heartbeats_exchange,
                names.events_exchange,
                names.unrouted_exchange,
            ):
                await channel.exchange_delete(exchange)


def _report(console: Console, state: DemoState, log_path: str) -> int:
    seen = Counter((e["kind"], e["instance"]) for e in state.events)
    table = Table(title="what the demo expected", title_justify="left")
    table.add_column("event")
    table.add_column("seen", justify="right")
    ok = True
    for kind, instance in EXPECTED:
        n = seen[(kind, instance)]
        ok &= n == 1
        table.add_row(f"{kind} {instance}", f"[{'green' if n == 1 else 'red'}]{n}")
    false_deaths = [i for (k, i), n in seen.items() if k == "dead" and (k, i) not in EXPECTED]
    ok &= not false_deaths
    console.print(table)
    kinds = Counter(e["kind"] for e in state.events)
    console.print(
        f"{len(state.events)} events ({', '.join(f'{n} {k}' for k, n in kinds.items())}"
        f"); {len(state.actions)} failover actions; false deaths: "
        f"{', '.join(false_deaths) or 'none'}; worker logs: {log_path}",
        highlight=False,
    )
    return 0 if ok else 1
