"""The CLI through click's runner and as real subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import orjson
import pytest
from click.testing import CliRunner

from hbbus.cli.main import EXIT_NOT_FOUND, EXIT_UNAVAILABLE, cli
from hbbus.store import Store
from hbbus.wire import Heartbeat
from tests.helpers import cli_settings

HBBUS = [sys.executable, "-m", "hbbus.cli"]


def invoke(settings, *args):
    return CliRunner().invoke(cli, [*cli_settings(settings), *args])


def seed(settings, *beats):
    async def go():
        store = Store.from_settings(settings)
        try:
            for beat in beats:
                await store.ingest([(beat, beat.interval_ms, beat.interval_ms * beat.misses)])
        finally:
            await store.close()

    asyncio.run(go())


def env_for(settings):
    return {
        **os.environ,
        "HBBUS_AMQP_URL": settings.amqp_url,
        "HBBUS_REDIS_URL": settings.redis_url,
        "HBBUS_NAMESPACE": settings.namespace,
    }


def wait_for(cond, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)
    return value


def events_of(settings):
    result = invoke(settings, "events", "--json", "--last", "100")
    assert result.exit_code == 0, result.output
    return [orjson.loads(line) for line in result.output.splitlines()]


def test_status_show_events_forget(settings):
    seed(
        settings,
        Heartbeat("api", "api-1", "inc1", 1, 60_000, 3, 0, "ok", {"endpoint": "10.0.0.1:80"}),
        Heartbeat("api", "api-2", "inc2", 1, 60_000, 3, 0, "degraded", {}),
        Heartbeat("db", "db-1", "inc3", 1, 60_000, 3, 0, "ok", {"role": "primary"}),
    )
    result = invoke(settings, "status")
    assert result.exit_code == 0, result.output
    first, second = result.output.splitlines()[:2]
    assert first.startswith("observer: no aggregator running")
    assert second == "3 instances: 3 alive, 0 suspect, 0 dead, 0 left"
    assert "api-1" in result.output and "endpoint=10.0.0.1:80" in result.output
    assert "alive (degraded)" in result.output

    rows = orjson.loads(invoke(settings, "status", "--json", "--service", "api").output)
    assert [r["instance"] for r in rows] == ["api-1", "api-2"]
    assert rows[0]["meta"] == {"endpoint": "10.0.0.1:80"} and rows[0]["state"] == "alive"
    assert orjson.loads(invoke(settings, "status", "--json", "--state", "dead").output) == []

    shown = invoke(settings, "show", "db/db-1")
    assert shown.exit_code == 0 and "joined" in shown.output and "primary" in shown.output
    doc = orjson.loads(invoke(settings, "show", "--json", "db/db-1").output)
    assert doc["history"][0]["kind"] == "joined" and doc["alive_for_ms"] > 0

    assert [e["instance"] for e in events_of(settings)] == ["api-1", "api-2", "db-1"]
    only_db = invoke(settings, "events", "--json", "joined.db.*")
    assert [orjson.loads(x)["instance"] for x in only_db.output.splitlines()] == ["db-1"]

    assert invoke(settings, "forget", "db/db-1").exit_code == 0
    missing = invoke(settings, "show", "db/db-1")
    assert missing.exit_code == EXIT_NOT_FOUND
    assert "no instance db/db-1" in missing.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["show", "no-slash"], 2, "expected SERVICE/INSTANCE"),
        (["show", "bad name/x"], 2, "invalid service"),
        (["forget", "a/b"], EXIT_NOT_FOUND, "no instance a/b"),
        (["send", "a.b", "x"], 2, "invalid service"),
        (["send", "a", "x", "--meta", "oops"], 2, "--meta expects key=value"),
        (["send", "a", "x", "--every", "1", "--interval", "2"], 2, "--interval is for one-shot"),
        (["status", "--state", "zombie"], 2, "Invalid value for '--state'"),
        (["failover", "dlq", "--group", "nope"], EXIT_NOT_FOUND, "no dead-letter queue"),
    ],
)
def test_bad_arguments_are_one_line_errors(settings, args, code, message):
    result = invoke(settings, *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args", [["status"], ["doctor"], ["send", "a", "b"]])
def test_unreachable_servers_are_one_line_errors(args):
    result = subprocess.run(
        [
            *HBBUS,
            "--amqp-url",
            "amqp://guest:secret@127.0.0.1:1/",
            "--redis-url",
            "redis://127.0.0.1:1/0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if args == ["doctor"]:
        assert result.returncode == 1
        assert "[FAIL] rabbitmq" in result.stdout and "[FAIL] redis" in result.stdout
    else:
        assert result.returncode == EXIT_UNAVAILABLE, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("hbbus: error: ")
    assert "secret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_help():
    runner = CliRunner()
    assert "hbbus, version" in runner.invoke(cli, ["--version"]).output
    assert "Examples:" in runner.invoke(cli, ["--help"]).output


@pytest.fixture
def aggregator_process(settings):
    proc = subprocess.Popen(
        [*HBBUS, "aggregator", "-v"], env=env_for(settings), stderr=subprocess.PIPE, text=True
    )
    wait_for(
        lambda: "consuming" in (proc.stderr.readline() or "") or proc.poll() is not None,
        20,
        "aggregator start",
    )
    assert proc.poll() is None, "aggregator exited"
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)


def test_send_every_sigkill_is_dead_sigterm_is_left(settings, aggregator_process):
    env = env_for(settings)
    killed = subprocess.Popen(
        [*HBBUS, "send", "cli", "k-1", "--every", "0.2", "--meta", "role=replica"], env=env
    )
    termed = subprocess.Popen(
        [*HBBUS, "send", "cli", "t-1", "--every", "0.2"], env=env, stderr=subprocess.PIPE, text=True
    )
    wait_for(
        lambda: len([e for e in events_of(settings) if e["kind"] == "joined"]) == 2,
        20,
        "both joined",
    )
    killed.send_signal(signal.SIGKILL)
    termed.send_signal(signal.SIGTERM)
    _, err = termed.communicate(timeout=10)
    assert termed.returncode == 0 and "then left" in err
    killed.wait(10)
    kinds = wait_for(
        lambda: (
            (k := {(e["kind"], e["instance"]) for e in events_of(settings)})
            >= {("dead", "k-1"), ("left", "t-1")}
            and k
        ),
        10,
        "dead and left",
    )
    assert ("dead", "t-1") not in kinds and ("left", "k-1") not in kinds
    dead = next(e for e in events_of(settings) if e["kind"] == "dead")
    assert dead["meta"] == {"role": "replica"}

    # SIGTERM to the aggregator: a clean exit with its one-line summary
    aggregator_process.send_signal(signal.SIGTERM)
    _, err = aggregator_process.communicate(timeout=20)
    assert aggregator_process.returncode == 0 and "stopped on SIGTERM" in err


def test_one_shot_sends_keep_one_incarnation(settings, aggregator_process):
    env = env_for(settings)
    for _ in range(2):
        subprocess.run(
            [*HBBUS, "send", "cron", "nightly", "--interval", "3600"],
            env=env,
            check=True,
            timeout=30,
        )
        time.sleep(0.01)
    wait_for(lambda: any(e["kind"] == "joined" for e in events_of(settings)), 10, "joined")
    time.sleep(0.5)
    assert [e["kind"] for e in events_of(settings)] == ["joined"], "a repeated send is no restart"
    rows = orjson.loads(invoke(settings, "status", "--json").output)
    assert rows[0]["ttl_ms"] == 3 * 3600 * 1000


def test_events_follow_prints_live_json_lines(settings, aggregator_process):
    follower = subprocess.Popen(
        [*HBBUS, "events", "--follow", "--json", "*.live.*"],
        env=env_for(settings),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # let it bind its queue; the events below could also come from history
        subprocess.run(
            [*HBBUS, "send", "live", "l-1"], env=env_for(settings), check=True, timeout=30
        )
        line = follower.stdout.readline()
        assert orjson.loads(line)["kind"] == "joined"
    finally:
        follower.send_signal(signal.SIGTERM)
        follower.communicate(timeout=10)
    assert follower.returncode == 0


def test_failover_run_exec_subprocess(settings, aggregator_process, tmp_path):
    out = tmp_path / "handled.jsonl"
    runner = subprocess.Popen(
        [
            *HBBUS,
            "failover",
            "run",
            "--group",
            "ops",
            "--bind",
            "dead.#",
            "--exec",
            f"cat >> {out}; echo >> {out}",
        ],
        env=env_for(settings),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sender = subprocess.Popen(
            [*HBBUS, "send", "fo", "f-1", "--every", "0.2"], env=env_for(settings)
        )
        wait_for(lambda: any(e["kind"] == "joined" for e in events_of(settings)), 20, "joined")
        sender.send_signal(signal.SIGKILL)
        sender.wait(10)
        handled = wait_for(
            lambda: out.exists() and out.read_text().strip().splitlines(), 20, "the exec action ran"
        )
        assert [orjson.loads(x)["kind"] for x in handled] == ["dead"]
    finally:
        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=20)
    assert runner.returncode == 0
    assert "1 handled" in err


def test_doctor_healthy_and_unhealthy(settings, aggregator_process):
    result = invoke(settings, "doctor")
    assert result.exit_code == 0, result.output
    assert "[ok  ] aggregators: 1 consuming" in result.output
    assert "] redis memory: hash-max-listpack-value " in result.output
    aggregator_process.send_signal(signal.SIGTERM)
    aggregator_process.communicate(timeout=20)
    result = invoke(settings, "doctor")
    assert result.exit_code == 1
    assert "[FAIL] aggregators: nobody consumes" in result.output


def test_maintenance_commands(settings):
    on = invoke(settings, "maintenance", "on", "db/db-1", "--for", "30m", "--reason", "disk")
    assert on.exit_code == 0, on.output
    assert on.output.startswith("maintenance on db/db-1 until ")
    assert (
        invoke(settings, "maintenance", "on", "api", "--for", "2h", "--reason", "x").exit_code == 0
    )
    listed = orjson.loads(invoke(settings, "maintenance", "list", "--json").output)
    assert [w["target"] for w in listed] == ["api", "db/db-1"]
    assert 29 * 60_000 < listed[1]["left_ms"] <= 30 * 60_000 and listed[1]["reason"] == "disk"
    assert invoke(settings, "maintenance", "off", "db/db-1").exit_code == 0
    missing = invoke(settings, "maintenance", "off", "db/db-1")
    assert missing.exit_code == EXIT_NOT_FOUND and "no maintenance window" in missing.output
    bad = invoke(settings, "maintenance", "on", "api", "--for", "soon", "--reason", "x")
    assert bad.exit_code == 2 and "invalid duration 'soon'" in bad.output


def test_detector_and_why(settings):
    assert (
        invoke(settings, "detector", "list").output.strip() == "no service has adaptive deadlines"
    )
    ok = invoke(settings, "detector", "set", "api", "--k", "5", "--floor", "2s", "--ceiling", "1m")
    assert ok.exit_code == 0 and "k=5, floor 2000 ms, ceiling 60000 ms" in ok.output
    assert "api: k=5 floor=2000 ms ceiling=60000 ms" in invoke(settings, "detector", "list").output
    bad = invoke(settings, "detector", "set", "api", "--floor", "10s", "--ceiling", "1s")
    assert bad.exit_code == 2 and "--floor must not be above --ceiling" in bad.output
    seed(settings, Heartbeat("api", "api-1", "inc1", 1, 60_000, 3, 0, "ok", {}))
    why = invoke(settings, "why", "api/api-1")
    assert why.exit_code == 0, why.output
    assert "deadline: warming up (0 of 20 gaps)" in why.output
    assert "transitions (newest first):" in why.output and "joined" in why.output
    doc = orjson.loads(invoke(settings, "why", "--json", "api/api-1").output)
    assert doc["detector"] == "5 2000 60000" and doc["history"][0]["kind"] == "joined"
    assert invoke(settings, "detector", "off", "api").exit_code == 0
    assert invoke(settings, "detector", "off", "api").exit_code == EXIT_NOT_FOUND
    assert "declared: interval 60000 ms x 3 misses" in invoke(settings, "why", "api/api-1").output
    assert invoke(settings, "why", "api/nope").exit_code == EXIT_NOT_FOUND
