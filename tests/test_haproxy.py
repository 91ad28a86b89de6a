"""The HAProxy action end to end: a real HAProxy in front of three real HTTP backends (each a
process with a heartbeater); one is killed with SIGKILL, HAProxy puts it in MAINT and a loop of
real requests through HAProxy sees no error after that; restarted, it is READY again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hbbus.failover import FailoverConsumer, RetryPolicy
from hbbus.settings import Settings
from hbbus.workers.haproxy import HAProxyAction, runtime_command, server_states
from tests.helpers import Background, run_cli, running, wait_until
from tests.servers import PrivateHAProxy, env_for, free_port

INTERVAL_S = 0.3
TTL_S = INTERVAL_S * 3
BACKEND = Path(__file__).parent / "apps" / "http_backend.py"


class Backends:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ports = {f"web-{i}": free_port() for i in (1, 2, 3)}
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str) -> None:
        proc = subprocess.Popen(
            [sys.executable, str(BACKEND), name, str(self.ports[name]), str(INTERVAL_S)],
            env=env_for(self.settings),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.stdout.close()
        self.procs[name] = proc

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(10)


class Traffic(Background):
    """Requests through HAProxy in a loop, each on a new connection: (start, ok, body)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.url = f"http://127.0.0.1:{port}/"
        self.results: list[tuple[float, bool, str]] = []

    async def _loop(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=3) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    answer = await client.get(self.url)
                    self.results.append((started, answer.status_code == 200, answer.text))
                except httpx.HTTPError as exc:
                    self.results.append((started, False, repr(exc)))
                await asyncio.sleep(0.005)

    def since(self, t: float) -> list[tuple[float, bool, str]]:
        return [r for r in self.results if r[0] >= t]


async def test_killed_backend_goes_maint_then_ready_again(
    settings, aggregators, need_tool, tmp_path
):
    need_tool("haproxy")
    await aggregators(1)
    backends = Backends(settings)
    proxy = PrivateHAProxy(backends.ports, tmp_path).start()
    unix, tcp = proxy.socket, f"127.0.0.1:{proxy.api_port}"
    consumer = FailoverConsumer(
        settings,
        "lb",
        [f"{k}.web.*" for k in ("dead", "left", "joined", "recovered", "restarted")],
        retry=RetryPolicy(max_retries=3, base_s=0.2),
    )
    consumer.add_action(HAProxyAction([unix, tcp]))  # both kinds of socket, one HAProxy
    traffic = Traffic(proxy.port)
    try:
        async with running(consumer):
            # all three start in MAINT; the bus makes them READY when they join
            for name in backends.ports:
                assert await runtime_command(unix, f"set server web/{name} state maint") == ""
                backends.start(name)
            await wait_until(
                lambda: _all_in(unix, "READY", ["web-1", "web-2", "web-3"]),
                10,
                "the three servers READY",
            )
            traffic.start()
            await wait_until(lambda: len(traffic.results) > 30, 10, "traffic")
            killed_at = time.monotonic()
            backends.kill("web-2")
            await wait_until(
                lambda: _all_in(unix, "MAINT", ["web-2"]), TTL_S + 1.0, "web-2 in MAINT"
            )
            maint_at = time.monotonic()
            await wait_until(lambda: len(traffic.since(maint_at)) > 100, 20, "traffic after")
            after = traffic.since(maint_at)
            errors = [r for r in after if not r[1]]
            assert errors == [], f"{len(errors)} errors after MAINT: {errors[:3]}"
            assert {r[2] for r in after} == {"web-1", "web-3"}
            # the history says what was done about the failure
            result = await run_cli(settings, "events", "action.#", "--last", "50")
            assert "action.succeeded" in result.output and "web/web-2" in result.output

            backends.start("web-2")  # a new process: a new incarnation
            await wait_until(lambda: _all_in(unix, "READY", ["web-2"]), 10, "web-2 READY")
            back_at = time.monotonic()
            await wait_until(
                lambda: any(r[2] == "web-2" for r in traffic.since(back_at)), 10, "web-2 served"
            )
            await traffic.stop()
            print(
                f"killed -> MAINT {maint_at - killed_at:.2f}s (TTL {TTL_S}s); "
                f"errors before MAINT: {sum(1 for r in traffic.results if not r[1])}"
            )
    finally:
        await traffic.stop()
        backends.stop_all()
        proxy.stop()


async def _all_in(socket: str, state: str, servers: list[str]) -> bool:
    states = await server_states(socket, "web")
    return all(states.get(name) == state for name in servers)


async def test_unknown_server_goes_to_the_dlq_with_the_haproxy_answer(
    settings, need_tool, tmp_path
):
    need_tool("haproxy")
    proxy = PrivateHAProxy({"web-1": free_port()}, tmp_path).start()
    try:
        action = HAProxyAction([proxy.socket], server="web/{instance}")
        from hbbus.errors import PermanentFailure
        from tests.test_routing import event

        with pytest.raises(PermanentFailure, match="No such server"):
            await action.handle(event("dead", "nope", 1))
        assert await action.handle(event("dead", "web-1", 1)) == "web/web-1 MAINT on 1 HAProxy"
        assert (await server_states(proxy.socket, "web"))["web-1"] == "MAINT"
    finally:
        proxy.stop()
