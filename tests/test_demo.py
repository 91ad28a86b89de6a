"""The main job, as a user runs it: `hbbus demo` ends by itself and saw what it expected."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_and_every_expected_event_is_seen(settings):
    env = {**os.environ, "HBBUS_AMQP_URL": settings.amqp_url, "HBBUS_REDIS_URL": settings.redis_url}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hbbus.cli",
            "demo",
            "--duration",
            "12",
            "--demo-namespace",
            settings.namespace,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "false deaths: none" in out
    for line in (
        "dead api-2",
        "dead db-1",
        "left cache-1",
        "recovered api-2",
        "restarted db-2",
        "dead cache-2",
    ):
        assert line in out
    assert "rerouting traffic away from db/db-1" in out
