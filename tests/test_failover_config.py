"""``failover.toml``: checking (one-line errors), the examples in compose/, and one worker
process running several actions from one file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from hbbus.cli.main import cli
from hbbus.client import Heartbeater
from hbbus.errors import ConfigError
from hbbus.workers.failover_runner import load_config
from tests.helpers import EventSink, run_cli, wait_until

COMPOSE = Path(__file__).parent.parent / "compose"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "failover.toml"
    path.write_text(text)
    return str(path)


def test_the_compose_examples_are_valid(monkeypatch):
    monkeypatch.setenv("HBBUS_WEBHOOK_SECRET", "x")
    monkeypatch.setenv("REDIS_PASSWORD", "x")
    kinds = [s.type for s in load_config(str(COMPOSE / "failover.example.toml"))]
    assert kinds == ["routes", "haproxy", "redis-promote", "webhook", "exec"]
    specs = load_config(str(COMPOSE / "failover.toml"))
    assert [(s.name, s.type) for s in specs] == [("routes", "routes"), ("ops", "exec")]
    assert specs[1].retry.max_retries == 5 and specs[1].bindings == ["dead.#", "left.#"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[action]\n", "not valid TOML"),
        ("", "no [[action]] tables"),
        ("[other]\n", "unknown table 'other'"),
        ('[defaults]\nretries = 1\n[[action]]\nname="a"\ntype="routes"\n', "[defaults] takes"),
        ('[[action]]\ntype = "routes"\n', "every action needs name"),
        ('[[action]]\nname = "a b"\ntype = "routes"\n', "invalid name 'a b'"),
        ('[[action]]\nname = "a"\ntype = "pager"\n', "type must be one of"),
        ('[[action]]\nname = "a"\ntype = "routes"\nsocket = "x"\n', "unknown key 'socket'"),
        ('[[action]]\nname = "a"\ntype = "exec"\ncommand = "true"\n', "give bind"),
        ('[[action]]\nname = "a"\ntype = "exec"\nbind = ["#"]\n', "needs a command"),
        ('[[action]]\nname="a"\ntype="exec"\nbind="#"\ncommand=1\n', "command must be str"),
        ('[[action]]\nname="a"\ntype="exec"\nbind="#"\ncommand="x"\nmax_retries=-1\n', "retry"),
        ('[[action]]\nname="a"\ntype="haproxy"\nservices=["web"]\n', "at least one socket"),
        ('[[action]]\nname="a"\ntype="haproxy"\nbind="#"\nsockets=["x"]\n', "expected a path"),
        (
            '[[action]]\nname="a"\ntype="haproxy"\nbind="#"\nsockets="/s"\ndown_state="off"\n',
            "down",
        ),
        ('[[action]]\nname="a"\ntype="redis-promote"\n', "service"),
        (
            '[[action]]\nname="a"\ntype="redis-promote"\nservice="c"\npassword_env="NO_SUCH"\n',
            "password_env: environment variable NO_SUCH is not set",
        ),
        ('[[action]]\nname="a"\ntype="webhook"\nbind="#"\nurl="ftp://x"\n', "http(s)"),
        (
            '[[action]]\nname="a"\ntype="webhook"\nbind="#"\nurl="http://x"\nsecret_env="NO_SUCH"\n',
            "NO_SUCH is not set",
        ),
        (
            '[[action]]\nname="a"\ntype="routes"\n[[action]]\nname="a"\ntype="routes"\n',
            "two actions",
        ),
    ],
)
def test_config_errors_are_one_line_and_name_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(info.value).startswith(path) and "\n" not in str(info.value)


def test_cli_check_and_bad_combinations(tmp_path):
    runner = CliRunner()
    good = write(tmp_path, '[[action]]\nname = "r"\ntype = "routes"\n')
    result = runner.invoke(cli, ["failover", "check", "--config", good])
    assert result.exit_code == 0 and result.output.startswith("r ")
    (tmp_path / "bad.toml").write_text('[[action]]\nname = "r"\ntype = "nope"\n')
    result = runner.invoke(cli, ["failover", "check", "--config", str(tmp_path / "bad.toml")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "hbbus: error:" in result.output and "type must be one of" in result.output
    result = runner.invoke(cli, ["failover", "run", "--group", "g", "--bind", "#"])
    assert result.exit_code == 2 and "exactly one of --exec" in result.output
    result = runner.invoke(cli, ["failover", "run", "--config", good, "--exec", "true"])
    assert result.exit_code == 2 and "--config excludes" in result.output
    result = runner.invoke(cli, ["failover", "run", "--routes"])
    assert result.exit_code == 2 and "--group is required" in result.output
    result = runner.invoke(cli, ["failover", "run", "--group", "r", "--routes", "--timeout", "3"])
    assert result.exit_code == 2 and "--timeout does not apply to the routes" in result.output


async def test_one_process_runs_every_action_of_the_file(settings, aggregators, tmp_path):
    """`hbbus failover run --config`: a routes action and an exec action in one process;
    each does its part for one death and says so with an action.succeeded event."""
    await aggregators(1)
    out = tmp_path / "deaths.jsonl"
    config = write(
        tmp_path,
        f"""
[defaults]
backoff_s = 0.2

[[action]]
name = "routes"
type = "routes"
services = ["cfg"]

[[action]]
name = "log"
type = "exec"
bind = ["dead.cfg.*"]
command = "cat >> {out}; echo >> {out}"
""",
    )
    env = {
        **os.environ,
        "HBBUS_AMQP_URL": settings.amqp_url,
        "HBBUS_REDIS_URL": settings.redis_url,
        "HBBUS_NAMESPACE": settings.namespace,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "hbbus.cli", "failover", "run", "--config", config],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    actions = await EventSink(settings, "action.#").start()
    try:
        hb = Heartbeater(
            "cfg", "c-1", interval_s=0.2, misses=3, meta={"endpoint": "h:1"}, settings=settings
        )
        await wait_until(lambda: _groups_exist(settings), 15, "the two groups' queues")
        await hb.start()
        await wait_until(lambda: hb.sent >= 3, 5, "heartbeats")
        await hb.abort()
        await wait_until(lambda: out.exists() and '"kind":"dead"' in out.read_text(), 10, "exec")
        await actions.wait_for("action.succeeded", count=3, timeout_s=10)  # join, death, log
        groups = sorted(
            (e["data"]["group"], e["data"]["for_kind"]) for e in actions.of("action.succeeded")
        )
        assert groups == [("log", "dead"), ("routes", "dead"), ("routes", "joined")]
        routes = orjson.loads((await run_cli(settings, "routes", "cfg", "--json")).output)
        assert routes[0]["endpoints"][0]["reason"] == "dead"
        history = await run_cli(settings, "events", "action.#")
        assert history.output.count("action.succeeded") == 3, history.output
    finally:
        await actions.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "failover group routes (routes) consuming" in err
    assert "failover group log (exec) consuming" in err


async def _groups_exist(settings) -> bool:
    """Both groups' queues are declared (a passive declare fails on a missing queue)."""
    from hbbus.amqp import connect

    connection = await connect(settings, "test-groups", robust=False)
    try:
        for group in ("routes", "log"):
            channel = await connection.channel()
            try:
                await channel.declare_queue(f"{settings.namespace}.failover.{group}", passive=True)
            except Exception:
                return False
        return True
    finally:
        await connection.close()
