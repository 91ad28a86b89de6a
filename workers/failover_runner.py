"""The failover runner process and its built-in actions (now: exec)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence

from hbbus.errors import ActionFailed
from hbbus.failover import FailoverConsumer, RetryPolicy
from hbbus.settings import Settings
from hbbus.wire import Event


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def exec_action(command: str, timeout_s: float = 60.0):
    """A handler that runs ``command`` in ``/bin/sh`` with the event JSON on stdin.

    The environment also carries ``HBBUS_EVENT_ID``, ``HBBUS_EVENT_KIND``, ``HBBUS_SERVICE``
    and ``HBBUS_INSTANCE``. A non-zero exit (or a timeout, which kills the command's process
    group) raises :class:`ActionFailed`, so the framework retries.
    """

    async def run_command(event: Event) -> None:
        env = {
            **os.environ,
            "HBBUS_EVENT_ID": event.id,
            "HBBUS_EVENT_KIND": event.kind,
            "HBBUS_SERVICE": event.service,
            "HBBUS_INSTANCE": event.instance,
        }
        proc = await asyncio.create_subprocess_shell(
            command, stdin=asyncio.subprocess.PIPE, env=env, start_new_session=True
        )
        try:
            async with asyncio.timeout(timeout_s):
                await proc.communicate(event.raw)
        except TimeoutError:
            await _kill_group(proc)
            raise ActionFailed(f"command timed out after {timeout_s:g}s") from None
        except asyncio.CancelledError:
            await _kill_group(proc)
            raise
        if proc.returncode != 0:
            raise ActionFailed(f"command exited with status {proc.returncode}")

    return run_command


def exec_consumer(
    settings: Settings,
    group: str,
    bindings: Sequence[str],
    command: str,
    *,
    retry: RetryPolicy,
    timeout_s: float,
) -> FailoverConsumer:
    """A consumer of ``group`` that runs ``command`` once per event its bindings match."""
    consumer = FailoverConsumer(
        settings, group, bindings, retry=retry, handler_timeout_s=timeout_s + 5
    )
    consumer.on("*")(exec_action(command, timeout_s))
    return consumer
