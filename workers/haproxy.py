"""The HAProxy action: takes a dead instance's server out of rotation through HAProxy's
runtime API (the stats socket, unix or TCP), and puts it back when the instance returns.

``dead``/``left`` set the server's admin state to MAINT (or DRAIN); ``joined``/``recovered``/
``restarted`` set it to READY. Which ``backend/server`` an instance is comes from, in order:
the action's ``servers`` map (``"service/instance" = "backend/server"``), the instance's
``meta.haproxy``, then the ``server`` template (default ``"{service}/{instance}"``).
Each command goes to every configured socket (several HAProxy processes in front of the same
servers); one that fails makes the event fail and be retried — the commands are idempotent.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from hbbus.errors import ActionFailed, ConfigError, PermanentFailure
from hbbus.failover import Action
from hbbus.settings import parse_addr
from hbbus.wire import Event
from hbbus.workers.routes import DOWN_KINDS, UP_KINDS

DOWN_STATES = ("maint", "drain")


def parse_socket(address: str) -> tuple[str, int] | str:
    """``/run/haproxy.sock`` or ``unix:/run/haproxy.sock`` -> a path; ``tcp://host:port`` or
    ``host:port`` -> (host, port)."""
    if address.startswith("unix:"):
        return address[5:]
    if address.startswith("/"):
        return address
    try:
        return parse_addr(address.removeprefix("tcp://"))
    except ConfigError:
        raise ConfigError(
            f"HAProxy socket {address!r}: expected a path, unix:PATH or host:port"
        ) from None


def _check_server(value: str, source: str) -> str:
    backend, sep, server = value.partition("/")
    if not sep or not backend or not server or any(c.isspace() for c in value):
        raise PermanentFailure(f"{source} gives {value!r}; expected backend/server")
    return value


async def runtime_command(address: str, command: str, timeout_s: float = 5.0) -> str:
    """Send one command to HAProxy's runtime API and return its answer (the socket closes
    after one command in non-interactive mode)."""
    target = parse_socket(address)
    try:
        async with asyncio.timeout(timeout_s):
            if isinstance(target, str):
                reader, writer = await asyncio.open_unix_connection(target)
            else:
                reader, writer = await asyncio.open_connection(*target)
            try:
                writer.write(command.encode() + b"\n")
                await writer.drain()
                answer = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        raise ActionFailed(f"HAProxy at {address}: {exc or type(exc).__name__}") from None
    return answer.decode(errors="replace").strip()


class HAProxyAction(Action):
    type: ClassVar[str] = "haproxy"
    kinds: ClassVar[frozenset[str]] = DOWN_KINDS | UP_KINDS

    def __init__(
        self,
        sockets: list[str],
        *,
        server: str = "{service}/{instance}",
        servers: dict[str, str] | None = None,
        down_state: str = "maint",
        timeout_s: float = 5.0,
    ) -> None:
        if not sockets:
            raise ConfigError("the haproxy action needs at least one socket")
        for address in sockets:
            parse_socket(address)
        if down_state not in DOWN_STATES:
            raise ConfigError(f"down_state must be maint or drain, got {down_state!r}")
        try:
            server.format(service="s", instance="i")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"server template {server!r}: {exc}") from None
        self.sockets = list(sockets)
        self.server = server
        self.servers = dict(servers or {})
        self.down_state = down_state
        self.timeout_s = timeout_s

    def server_of(self, event: Event) -> str:
        mapped = self.servers.get(event.instance_id)
        if mapped is not None:
            return _check_server(mapped, f"servers[{event.instance_id!r}]")
        meta = event.meta.get("haproxy")
        if isinstance(meta, str) and meta:
            return _check_server(meta, "meta.haproxy")
        name = self.server.format(service=event.service, instance=event.instance)
        return _check_server(name, f"the template {self.server!r}")

    async def handle(self, event: Event) -> object:
        server = self.server_of(event)
        state = self.down_state if event.kind in DOWN_KINDS else "ready"
        for address in self.sockets:
            answer = await runtime_command(
                address, f"set server {server} state {state}", self.timeout_s
            )
            if answer:  # success is an empty answer
                if answer.startswith("No such"):
                    raise PermanentFailure(f"HAProxy at {address}: {server}: {answer}")
                raise ActionFailed(f"HAProxy at {address}: {server}: {answer}")
        return f"{server} {state.upper()} on {len(self.sockets)} HAProxy"


async def server_states(address: str, backend: str, timeout_s: float = 5.0) -> dict[str, str]:
    """``server -> MAINT|DRAIN|READY`` for one backend, read with ``show servers state``."""
    answer = await runtime_command(address, f"show servers state {backend}", timeout_s)
    states: dict[str, str] = {}
    for line in answer.splitlines():
        parts = line.split()
        if len(parts) < 8 or not parts[0].isdigit():
            continue
        # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ...
        admin = int(parts[6])
        if admin & 0x01 or admin & 0x02 or admin & 0x04:  # forced, inherited or config maint
            states[parts[3]] = "MAINT"
        elif admin & 0x08:  # forced drain
            states[parts[3]] = "DRAIN"
        else:
            states[parts[3]] = "READY"
    return states
