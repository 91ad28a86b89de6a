"""Process plumbing shared by the workers: signal handling, logging, an event loop policy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

log = logging.getLogger("hbbus")


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set ``stop`` (the worker then drains and exits); a second one exits at once.

    The handler only flips state. Embedders that manage signals themselves do not call this.
    """
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second %s: exiting now", name)
            os._exit(128 + signum)
        log.info("%s received: finishing in-flight work", name)
        stop.received_signal = name  # type: ignore[attr-defined]
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


def stop_reason(stop: asyncio.Event) -> str:
    return getattr(stop, "received_signal", "request")


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; return True at once if ``stop`` is set meanwhile."""
    if stop.is_set() or seconds <= 0:
        return stop.is_set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; whether it is set.

    Uses ``asyncio.timeout``: unlike ``asyncio.wait_for`` before Python 3.12, it never
    swallows a cancellation that races with completion.
    """
    return await sleep_or_stop(event, seconds)


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel those of ``tasks`` that are not done, all of them first, then wait until they
    have ended. A cancellation of the caller during the wait is raised, never swallowed (as
    ``await task`` under ``suppress(CancelledError)`` would), and no task is left running
    because an earlier one's wait was interrupted."""
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


def setup_logging(verbosity: int) -> None:
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # the libraries' own connection errors are reported by hbbus in one line of its own
    library_level = (
        logging.DEBUG
        if verbosity > 2
        else (logging.WARNING if verbosity >= 1 else logging.CRITICAL)
    )
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(library_level)


def run(main: object) -> object:
    """``asyncio.run`` with uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]
