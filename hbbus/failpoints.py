"""Failpoints: named places where a process can be made to die on purpose, to prove that a
half-done step is finished by someone else (tests, and operators rehearsing a failure).

``HBBUS_FAILPOINTS=promote:after-replicaof`` makes the process SIGKILL itself when it reaches
that point, exactly as a crash would. Unset (always, in production), a failpoint costs one
environment lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("hbbus.failpoints")

#: every failpoint there is (documented in the README)
FAILPOINTS = frozenset({"promote:after-replicaof"})


def hit(name: str) -> None:
    """Die here if ``name`` is armed in ``HBBUS_FAILPOINTS`` (comma-separated)."""
    assert name in FAILPOINTS, name
    armed = os.environ.get("HBBUS_FAILPOINTS", "")
    if armed and name in armed.split(","):
        log.critical("failpoint %s armed: killing the process", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
