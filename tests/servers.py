"""Private servers for tests that must stop, restart or empty a server.

The shared RabbitMQ and Redis are never stopped or reconfigured by a test; these run on free
ports and are torn down by their fixtures (../shared/TESTING.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hbbus.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float, up: bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not {'up' if up else 'down'} after {timeout_s}s")


class PrivateRedis:
    """``redis-server`` on a free port, without persistence, as a child process."""

    def __init__(self, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> PrivateRedis:
        self.dir = tempfile.mkdtemp(prefix="hbbus-redis-")  # a replica writes the RDB it gets
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--dir",
                self.dir,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 10)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
            wait_port(self.port, 10, up=False)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class PrivateRabbit:
    """A RabbitMQ node of the test's own (about 5 s to start), stopped and started at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"hbbustest{self.port}@localhost"
        self.dir = Path(tempfile.mkdtemp(prefix="hbbus-rabbit-"))
        self._watermark: str | None = None  # the memory watermark while the alarm is up

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid_file(self) -> Path:
        return self.dir / "mnesia" / f"{self.node}.pid"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            # a config of its own: the system's rabbitmq.conf may pin `listeners.tcp` to
            # 5672, which overrides RABBITMQ_NODE_PORT (the node then dies: eaddrinuse)
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
        }

    def _ctl(self, *args: str, timeout_s: float = 60) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self._env(),
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )

    def start(self) -> PrivateRabbit:
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        try:
            user = pwd.getpwnam("rabbitmq")
            for path in (
                self.dir,
                self.dir / "mnesia",
                self.dir / "log",
                self.dir / "enabled_plugins",
                self.dir / "rabbitmq.conf",
            ):
                os.chown(path, user.pw_uid, user.pw_gid)
        except KeyError:
            pass
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self._env(),
            check=True,
            capture_output=True,
            timeout=60,
        )
        # `-detached` returns before the node has registered with epmd, so `await_startup` alone
        # can fail at once ("not running at all"); `wait PIDFILE` waits for the node to boot
        self._ctl("wait", str(self.pid_file), "--timeout", "90", timeout_s=100)
        self._ctl("await_startup", timeout_s=90)
        wait_port(self.port, 30)
        return self

    def set_env(self, key: str, value: str) -> None:
        """Set a ``rabbit`` application parameter on the running node, e.g. ``frame_max``
        (connections opened afterwards negotiate with it)."""
        self._ctl("eval", f"application:set_env(rabbit, {key}, {value}).")

    def get_env(self, key: str) -> str:
        """A ``rabbit`` application parameter of the running node, as Erlang prints it."""
        out = subprocess.run(
            ["rabbitmqctl", "-n", self.node, "eval", f"application:get_env(rabbit, {key})."],
            env=self._env(),
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        match = re.fullmatch(r"\{ok,(.*)\}", out)
        if match is None:
            raise RuntimeError(f"rabbit {key} is not set on {self.node}: {out!r}")
        return match.group(1)

    def memory_alarm(self, on: bool) -> None:
        """Raise or clear the memory alarm: while it is up the node stops reading from every
        connection that publishes (``connection.blocked``), and the TCP connections stay up.
        Clearing it restores the node's own watermark, whatever its version's default."""
        if on:
            self._watermark = self.get_env("vm_memory_high_watermark")
            self._ctl("set_vm_memory_high_watermark", "0")
        elif self._watermark is not None:
            restore = f"vm_memory_monitor:set_vm_memory_high_watermark({self._watermark})."
            self._ctl("eval", restore)
            self._watermark = None

    def stop_app(self) -> None:
        self._ctl("stop_app")
        wait_port(self.port, 30, up=False)

    def start_app(self) -> None:
        self._ctl("start_app")
        wait_port(self.port, 30)

    def stop(self) -> None:
        try:  # with the pid file, `stop` returns only once the node's process has exited
            self._ctl("stop", str(self.pid_file))
        except (subprocess.SubprocessError, OSError):
            subprocess.run(["pkill", "-9", "-f", self.node], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateHAProxy:
    """``haproxy -db`` in front of ``servers`` (name -> port) of one backend ``web``, with a
    runtime API on a unix socket and on a TCP port of its own. No health checks: what takes
    a server out of rotation is hbbus."""

    def __init__(self, servers: dict[str, int], workdir: Path) -> None:
        self.port = free_port()
        self.api_port = free_port()
        self.socket = str(workdir / "haproxy.sock")
        self.config = workdir / "haproxy.cfg"
        self.servers = servers
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateHAProxy:
        lines = [
            "global",
            f"  stats socket {self.socket} mode 600 level admin",
            f"  stats socket ipv4@127.0.0.1:{self.api_port} level admin",
            "defaults",
            "  mode http",
            "  timeout connect 1s",
            "  timeout client 5s",
            "  timeout server 5s",
            "frontend fe",
            f"  bind 127.0.0.1:{self.port}",
            "  default_backend web",
            "backend web",
            "  balance roundrobin",
            *(f"  server {name} 127.0.0.1:{port}" for name, port in self.servers.items()),
        ]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            ["haproxy", "-f", str(self.config), "-db"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 10)
        wait_port(self.api_port, 10)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


HBBUS = [sys.executable, "-m", "hbbus.cli"]
FAST_SYNC = ("--repl-diskless-sync-delay", "0")  # Redis waits 5 s for more replicas by default


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HBBUS_AMQP_URL": settings.amqp_url,
        "HBBUS_REDIS_URL": settings.redis_url,
        "HBBUS_NAMESPACE": settings.namespace,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        **extra,
    }


@dataclass
class RedisGroup:
    """The redis-servers (r1 primary, r2 and r3 replicas), their sidecars, the workers."""

    settings: Settings
    logs: Path
    interval_s: float = 0.2
    servers: dict[str, PrivateRedis] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_servers(self) -> None:
        primary = PrivateRedis(args=FAST_SYNC).start()
        self.servers["r1"] = primary
        for name in ("r2", "r3"):
            args = (*FAST_SYNC, "--replicaof", "127.0.0.1", str(primary.port))
            self.servers[name] = PrivateRedis(args=args).start()

    def spawn(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [*HBBUS, *args], env=env_for(self.settings, **env), stdout=log, stderr=log
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_sidecar(self, name: str, misses: int = 3) -> None:
        addr = self.servers[name].addr
        self.spawn(
            f"sidecar-{name}",
            "sidecar",
            "redis",
            "--addr",
            addr,
            "--service",
            "db",
            "--instance",
            name,
            "--interval",
            str(self.interval_s),
            "--misses",
            str(misses),
        )

    def start_worker(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        run = ("failover", "run", "--group", "db", "--redis-promote", "db", *args)
        return self.spawn(name, *run, **env)

    async def workers_consuming(self, *names: str, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        for name in names:
            while "consuming" not in self.log_of(name):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not start consuming")
                await asyncio.sleep(0.05)

    def log_of(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for server in self.servers.values():
            server.stop()
