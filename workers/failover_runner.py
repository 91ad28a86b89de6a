"""The failover runner: builds failover actions from ``failover.toml`` (or the single-action
flags of ``hbbus failover run``) and runs each as a consumer group in one process.

A config file::

    [defaults]                  # optional; every action may override these
    max_retries = 5             # retries after the first try, then the group's DLQ
    backoff_s = 1.0             # first retry delay, doubled per retry ...
    max_backoff_s = 60.0        # ... up to this

    [[action]]
    name = "lb"                 # the consumer group: one durable queue per name
    type = "haproxy"            # routes | haproxy | redis-promote | webhook | exec
    services = ["web"]          # haproxy/routes: binds their kinds for these services
    sockets = ["/run/haproxy/admin.sock"]

Each action type takes the keys listed in :data:`ACTION_KEYS`; an unknown key, a missing one
or a wrong type is a one-line :class:`ConfigError` naming the file and the action.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from hbbus.errors import ActionFailed, ConfigError
from hbbus.failover import Action, FailoverConsumer, RetryPolicy
from hbbus.settings import Settings, check_name, env_secret
from hbbus.wire import Event
from hbbus.workers.routes import LIFECYCLE_KINDS

COMMON_KEYS = frozenset(
    {"name", "type", "bind", "max_retries", "backoff_s", "max_backoff_s", "handler_timeout_s"}
)
ACTION_KEYS: dict[str, frozenset[str]] = {
    "routes": frozenset({"services"}),
    "haproxy": frozenset({"services", "sockets", "server", "servers", "down_state", "timeout_s"}),
    "redis-promote": frozenset({"service", "password_env", "lease_ms", "timeout_s"}),
    "webhook": frozenset({"url", "secret_env", "secret_file", "timeout_s", "headers"}),
    "exec": frozenset({"command", "timeout_s"}),
}
DEFAULT_KEYS = frozenset({"max_retries", "backoff_s", "max_backoff_s", "handler_timeout_s"})


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


class ExecAction(Action):
    """Runs ``command`` in ``/bin/sh`` with the event JSON on stdin.

    The environment also carries ``HBBUS_EVENT_ID``, ``HBBUS_EVENT_KIND``, ``HBBUS_SERVICE``
    and ``HBBUS_INSTANCE``. A non-zero exit (or a timeout, which kills the command's process
    group) raises :class:`ActionFailed`, so the framework retries.
    """

    type: ClassVar[str] = "exec"

    def __init__(self, command: str, timeout_s: float = 60.0) -> None:
        if not command.strip():
            raise ConfigError("the exec action needs a command")
        self.command = command
        self.timeout_s = timeout_s

    async def handle(self, event: Event) -> object:
        env = {
            **os.environ,
            "HBBUS_EVENT_ID": event.id,
            "HBBUS_EVENT_KIND": event.kind,
            "HBBUS_SERVICE": event.service,
            "HBBUS_INSTANCE": event.instance,
        }
        proc = await asyncio.create_subprocess_shell(
            self.command, stdin=asyncio.subprocess.PIPE, env=env, start_new_session=True
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                await proc.communicate(event.raw)
        except TimeoutError:
            await _kill_group(proc)
            raise ActionFailed(f"command timed out after {self.timeout_s:g}s") from None
        except asyncio.CancelledError:
            await _kill_group(proc)
            raise
        if proc.returncode != 0:
            raise ActionFailed(f"command exited with status {proc.returncode}")
        return "command exited 0"


@dataclass
class ActionSpec:
    """One action of a config file, checked."""

    name: str
    type: str
    bindings: list[str]
    retry: RetryPolicy
    handler_timeout_s: float
    action: Action


def _want(spec: dict[str, Any], key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = kinds if isinstance(kinds, tuple) else (kinds,)
        want = " or ".join(k.__name__ for k in names)
        raise ConfigError(f"{where}: {key} must be {want}, got {value!r}")
    return value


def _str_list(spec: dict[str, Any], key: str, where: str) -> list[str]:
    value = spec.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {key} must be a string or a list of strings")
    return list(value)


def _default_bindings(kind: str, spec: dict[str, Any], where: str) -> list[str]:
    if kind == "redis-promote":
        service = check_name(str(spec.get("service") or ""), "service")
        return [f"{k}.{service}.*" for k in LIFECYCLE_KINDS]
    services = [check_name(s, "service") for s in _str_list(spec, "services", where)]
    if kind == "routes":
        return [f"{k}.{s}.*" for k in LIFECYCLE_KINDS for s in services or ["*"]]
    if kind == "haproxy" and services:
        return [f"{k}.{s}.*" for k in LIFECYCLE_KINDS for s in services]
    raise ConfigError(f"{where}: give bind = [...] (the event patterns it acts on)")


def check_spec(raw: dict[str, Any], defaults: dict[str, Any], source: str) -> ActionSpec:
    """Check one ``[[action]]`` table (with the file's defaults) into an ActionSpec; every
    error names the file and the action."""
    name = raw.get("name")
    where = f"{source}: action {name!r}" if name else f"{source}: an action without a name"
    try:
        return _check_spec(raw, defaults, where)
    except ConfigError as exc:
        if str(exc).startswith(source):
            raise
        raise ConfigError(f"{where}: {exc}") from None


def _check_spec(raw: dict[str, Any], defaults: dict[str, Any], where: str) -> ActionSpec:
    name = raw.get("name")
    if not isinstance(name, str):
        raise ConfigError(f'{where}: every action needs name = "..." (its consumer group)')
    check_name(name, "name")
    kind = raw.get("type")
    if kind not in ACTION_KEYS:
        raise ConfigError(f"{where}: type must be one of {', '.join(ACTION_KEYS)}; got {kind!r}")
    unknown = sorted(set(raw) - COMMON_KEYS - ACTION_KEYS[kind])
    if unknown:
        known = ", ".join(sorted(COMMON_KEYS | ACTION_KEYS[kind]))
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} for type {kind} (known: {known})")
    merged = {**defaults, **raw}
    bindings = _str_list(raw, "bind", where) or _default_bindings(kind, raw, where)
    number = (int, float)
    max_retries = _want(merged, "max_retries", int, where)
    retry = RetryPolicy(
        max_retries=5 if max_retries is None else max_retries,
        base_s=float(_want(merged, "backoff_s", number, where) or 1.0),
        max_s=float(_want(merged, "max_backoff_s", number, where) or 60.0),
    )
    timeout = float(_want(merged, "handler_timeout_s", number, where) or 60.0)
    options = {k: v for k, v in raw.items() if k in ACTION_KEYS[kind]}
    # built now: every option is checked before the first event arrives
    action = build_action(kind, options, where)
    return ActionSpec(name, kind, bindings, retry, timeout, action)


def load_config(path: str) -> list[ActionSpec]:
    """Read and check a failover config file; ConfigError (one line) when anything is off."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(doc) - {"defaults", "action"})
    if unknown:
        raise ConfigError(f"{path}: unknown table {unknown[0]!r} (known: defaults, action)")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) - DEFAULT_KEYS:
        raise ConfigError(f"{path}: [defaults] takes only {', '.join(sorted(DEFAULT_KEYS))}")
    actions = doc.get("action", [])
    if not isinstance(actions, list) or not actions:
        raise ConfigError(f"{path}: no [[action]] tables")
    specs = [check_spec(raw, defaults, path) for raw in actions]
    names = Counter(s.name for s in specs)
    twice = [n for n, c in names.items() if c > 1]
    if twice:
        raise ConfigError(f"{path}: two actions are named {twice[0]!r} (names are groups)")
    return specs


def build_action(kind: str, o: dict[str, Any], where: str) -> Action:
    """The Action of type ``kind`` with options ``o`` (ConfigError names ``where``)."""
    from hbbus.workers.haproxy import HAProxyAction
    from hbbus.workers.redis_failover import RedisPromoteAction
    from hbbus.workers.routes import RoutesAction
    from hbbus.workers.webhook import WebhookAction, read_secret

    timeout = _want(o, "timeout_s", (int, float), where)
    if kind == "routes":
        return RoutesAction(tuple(_str_list(o, "services", where)))
    if kind == "haproxy":
        servers = _want(o, "servers", dict, where) or {}
        return HAProxyAction(
            _str_list(o, "sockets", where),
            server=_want(o, "server", str, where) or "{service}/{instance}",
            servers={str(k): str(v) for k, v in servers.items()},
            down_state=_want(o, "down_state", str, where) or "maint",
            timeout_s=timeout or 5.0,
        )
    if kind == "redis-promote":
        password_env = _want(o, "password_env", str, where)
        return RedisPromoteAction(
            check_name(str(o.get("service") or ""), "service"),
            password=env_secret(password_env, f"{where}: password_env") if password_env else None,
            lease_ms=int(_want(o, "lease_ms", int, where) or 5000),
            timeout_s=timeout or 2.0,
        )
    if kind == "webhook":
        headers = _want(o, "headers", dict, where) or {}
        return WebhookAction(
            str(_want(o, "url", str, where) or ""),
            secret=read_secret(
                _want(o, "secret_env", str, where), _want(o, "secret_file", str, where)
            ),
            timeout_s=timeout or 5.0,
            headers={str(k): str(v) for k, v in headers.items()},
        )
    return ExecAction(str(_want(o, "command", str, where) or ""), timeout_s=timeout or 60.0)


def build_consumer(settings: Settings, spec: ActionSpec) -> FailoverConsumer:
    consumer = FailoverConsumer(
        settings,
        spec.name,
        spec.bindings,
        retry=spec.retry,
        handler_timeout_s=spec.handler_timeout_s,
    )
    consumer.add_action(spec.action)
    return consumer


async def run_consumers(consumers: Sequence[FailoverConsumer], stop: asyncio.Event) -> None:
    """Run every consumer until ``stop``; if one fails, stop the others and raise its error."""
    tasks = [asyncio.create_task(c.run(stop), name=f"failover-{c.group}") for c in consumers]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


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
    consumer = FailoverConsumer(settings, group, bindings, retry=retry)
    consumer.add_action(ExecAction(command, timeout_s))
    return consumer
