"""``hbbus``: the operator's command line. Each command is one call into the library."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Coroutine
from datetime import datetime
from typing import Any, NoReturn

import click
import orjson

import hbbus
from hbbus import ops
from hbbus.errors import ConfigError, HbbusError, NotFound, Unavailable
from hbbus.names import split_instance_id
from hbbus.runtime import install_signal_handlers, run, setup_logging
from hbbus.settings import DEFAULT_NAMESPACE, Settings, check_name, env_secret, parse_addr
from hbbus.wire import MAX_MESSAGE_BYTES, Heartbeat

EXIT_OK = 0
EXIT_PROBLEMS = 1  # doctor found a problem
EXIT_USAGE = 2  # bad argument or setting (click's own code for usage errors)
EXIT_NOT_FOUND = 3  # the named instance, group or queue does not exist
EXIT_UNAVAILABLE = 69  # RabbitMQ or Redis unreachable (sysexits EX_UNAVAILABLE)

EPILOG = """\b
Examples:
  hbbus demo --duration 30
  hbbus aggregator -v
  hbbus send api api-1 --every 1 --meta endpoint=10.0.0.5:8080
  hbbus status --state dead
  hbbus events --follow 'dead.#'
  hbbus failover run --group db --bind 'dead.db.*' --exec ./promote.sh
"""


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"hbbus: error: {message}", err=True)
    sys.exit(code)


class HbbusGroup(click.Group):
    """Turns the errors a user can fix into one line on stderr and a named exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
        except NotFound as exc:
            fail(str(exc), EXIT_NOT_FOUND)
        except Unavailable as exc:
            fail(str(exc), EXIT_UNAVAILABLE)
        except HbbusError as exc:
            fail(str(exc), EXIT_PROBLEMS)
        except KeyboardInterrupt:
            sys.exit(130)


def settings_of(ctx: click.Context) -> Settings:
    return ctx.find_root().obj["settings"]


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    return run(coro)


@click.group(
    cls=HbbusGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--amqp-url",
    envvar="HBBUS_AMQP_URL",
    show_envvar=True,
    help="RabbitMQ URL [default: amqp://guest:guest@127.0.0.1:5672/]",
)
@click.option(
    "--redis-url",
    envvar="HBBUS_REDIS_URL",
    show_envvar=True,
    help="Redis URL [default: redis://127.0.0.1:6379/0]",
)
@click.option(
    "--namespace",
    envvar="HBBUS_NAMESPACE",
    show_envvar=True,
    help=f"prefix of every exchange, queue and key [default: {DEFAULT_NAMESPACE}]",
)
@click.option("-v", "--verbose", count=True, help="-v: info logs, -vv: debug logs")
@click.version_option(hbbus.__version__, prog_name="hbbus")
@click.pass_context
def cli(
    ctx: click.Context,
    amqp_url: str | None,
    redis_url: str | None,
    namespace: str | None,
    verbose: int,
) -> None:
    """hbbus — a heartbeat bus: heartbeats over RabbitMQ, liveness in Redis, failover events."""
    setup_logging(verbose)
    try:
        settings = Settings.from_env(
            {}, amqp_url=amqp_url, redis_url=redis_url, namespace=namespace
        )
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    ctx.obj = {"settings": settings, "verbose": verbose}


def verbose_option(func: Any) -> Any:
    """``-v`` after the command name too (``hbbus aggregator -v``)."""

    def bump(ctx: click.Context, _param: click.Parameter, value: int) -> int:
        if value:
            root = ctx.find_root().obj
            root["verbose"] += value
            setup_logging(root["verbose"])
        return value

    return click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=bump,
        help="-v: info logs, -vv: debug logs",
    )(func)


def worker_logging(ctx: click.Context) -> None:
    """Workers log their lifecycle (start, stop with counts) at info level by default."""
    if ctx.find_root().obj["verbose"] == 0:
        setup_logging(1)


def parse_meta(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs; a value that reads as JSON (number, true, null…) is typed."""
    meta: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta expects key=value, got {pair!r}")
        try:
            meta[key] = orjson.loads(value)
        except orjson.JSONDecodeError:
            meta[key] = value
    return meta


# -- services -------------------------------------------------------------------------------------
@cli.command()
@click.argument("service")
@click.argument("instance")
@click.option(
    "--every",
    type=click.FloatRange(min=0.01),
    help="keep sending every SECONDS until SIGINT/SIGTERM, then publish `left`",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    help="one-shot sends: the declared interval in seconds [default: 60]",
)
@click.option(
    "--misses",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="missed intervals before the instance is dead",
)
@click.option("--meta", "meta_pairs", multiple=True, metavar="KEY=VALUE", help="repeatable")
@click.option(
    "--status", type=click.Choice(["ok", "degraded", "draining"]), default="ok", show_default=True
)
@click.option(
    "--incarnation",
    help="one-shot sends only: the sender's identity [default: "
    "'oneshot'; one-shot heartbeats carry seq 0, which is never stale]",
)
@click.pass_context
def send(
    ctx: click.Context,
    service: str,
    instance: str,
    every: float | None,
    interval: float | None,
    misses: int,
    meta_pairs: tuple[str, ...],
    status: str,
    incarnation: str | None,
) -> None:
    """Send heartbeats for SERVICE INSTANCE: one (for cron and scripts), or --every SECONDS."""
    settings = settings_of(ctx)
    check_name(service, "service")
    check_name(instance, "instance")
    meta = parse_meta(meta_pairs)
    if every is not None and interval is not None:
        raise ConfigError("--interval is for one-shot sends; with --every the interval is EVERY")
    if every is None:
        # seq 0: an unordered sender; repeated sends are one living instance, whatever the
        # sender's clock does (it never decides life or death)
        beat = Heartbeat(
            service,
            instance,
            check_name(incarnation or "oneshot", "incarnation"),
            0,
            round((interval or 60.0) * 1000),
            misses,
            int(time.time() * 1000),
            status,
            meta,
        )
        if len(beat.encode()) > MAX_MESSAGE_BYTES:
            raise ConfigError(f"heartbeat would exceed {MAX_MESSAGE_BYTES} bytes; trim --meta")
        run_async(ops.send_once(settings, beat))
        return
    from hbbus.client import Heartbeater

    async def keep_sending() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        hb = Heartbeater(
            service,
            instance,
            interval_s=every,
            misses=misses,
            meta=meta,
            settings=settings,
            status=status,
        )
        async with hb:
            await stop.wait()
        click.echo(f"sent {hb.sent} heartbeats, then left", err=True)

    run_async(keep_sending())


# -- workers -----------------------------------------------------------------------------
@cli.command()
@click.option("--prefetch", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option(
    "--linger-ms",
    type=click.FloatRange(min=0, max=100),
    default=5.0,
    show_default=True,
    help="with few heartbeats in hand and no verdict waiting, wait this long for more "
    "(bigger batches, less CPU per heartbeat)",
)
@click.option(
    "--lease-ms",
    type=click.IntRange(min=100),
    default=5000,
    show_default=True,
    help="how long a claimed event may stay unpublished before another aggregator publishes it",
)
@click.option(
    "--retention-s",
    type=click.IntRange(min=1),
    default=86400,
    show_default=True,
    help="how long dead and left records are kept",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=0,
    help="serve Prometheus metrics on this port (0: off)",
)
@click.option("--metrics-addr", default="127.0.0.1", show_default=True)
@click.option(
    "--degraded-after-ms",
    type=click.IntRange(min=200),
    default=2000,
    show_default=True,
    help="watermark lag after which the observer is degraded (all aggregators must agree)",
)
@click.option(
    "--mass-share",
    type=click.FloatRange(min=0, max=1),
    default=0.5,
    show_default=True,
    help="mass-expiry guard: trips when more than this share of a service or zone fails",
)
@click.option(
    "--mass-min",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="mass-expiry guard: and at least this many instances",
)
@click.option("--mass-window-s", type=click.FloatRange(min=1), default=30, show_default=True)
@click.option(
    "--release-after-s",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="release held deaths by themselves after this long (0: only by `hbbus guard release`)",
)
@click.option(
    "--release-every-s",
    type=click.FloatRange(min=0.01),
    default=1,
    show_default=True,
    help="one held death released per this many seconds",
)
@click.option(
    "--flap-max",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="flapping: more than this many dead/recovered changes ...",
)
@click.option(
    "--flap-window-s",
    type=click.FloatRange(min=1),
    default=60,
    show_default=True,
    help="... within this window",
)
@click.option(
    "--flap-stable-s",
    type=click.FloatRange(min=0.1),
    default=30,
    show_default=True,
    help="flapping ends after this long without such a change",
)
@click.option(
    "--grace-ms",
    type=click.IntRange(min=0),
    default=6000,
    show_default=True,
    help="after the observer recovers, instances not heard since get max(TTL, this) more",
)
@verbose_option
@click.pass_context
def aggregator(
    ctx: click.Context,
    prefetch: int,
    linger_ms: float,
    lease_ms: int,
    retention_s: int,
    metrics_port: int,
    metrics_addr: str,
    degraded_after_ms: int,
    grace_ms: int,
    mass_share: float,
    mass_min: int,
    mass_window_s: float,
    release_after_s: float,
    release_every_s: float,
    flap_max: int,
    flap_window_s: float,
    flap_stable_s: float,
) -> None:
    """Run an aggregator: ingest heartbeats into Redis and publish transitions (until SIGTERM)."""
    from hbbus import metrics
    from hbbus.amqp import use_buffered_frame_reader
    from hbbus.store import StoreConfig
    from hbbus.workers.aggregator import Aggregator, AggregatorConfig

    worker_logging(ctx)
    if not use_buffered_frame_reader():  # this process reads many deliveries: read in chunks
        logging.getLogger("hbbus.aggregator").info(
            "this aiormq has no FrameReceiver to replace: frames are read as aiormq reads them"
        )
    store = StoreConfig(
        lease_ms=lease_ms,
        retention_ms=retention_s * 1000,
        degraded_after_ms=degraded_after_ms,
        grace_ms=grace_ms,
        mass_share=mass_share,
        mass_min=mass_min,
        mass_window_ms=round(mass_window_s * 1000),
        release_after_ms=round(release_after_s * 1000),
        release_every_ms=round(release_every_s * 1000),
        flap_max=flap_max,
        flap_window_ms=round(flap_window_s * 1000),
        flap_stable_ms=round(flap_stable_s * 1000),
    )
    config = AggregatorConfig(prefetch=prefetch, linger_ms=linger_ms, store=store)

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        metrics.serve(metrics_port, metrics_addr)
        await Aggregator(settings_of(ctx), config).run(stop)

    # What the imports built lives as long as the process: full collections need not walk it
    # again and again. Their pauses, which delay deaths, fell from 20-100 ms to 5-20 ms.
    gc.collect()  # not the imports' garbage, though
    gc.freeze()
    run_async(main())


@cli.group()
def failover() -> None:
    """Failover consumers: run one, inspect and replay its dead letters."""


@failover.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="failover.toml with several actions (see the README); excludes the flags below",
)
@click.option("--group", help="consumer group (one durable queue per group)")
@click.option(
    "--bind",
    "bindings",
    multiple=True,
    metavar="PATTERN",
    help="event routing-key pattern, e.g. 'dead.db.*' (repeatable)",
)
@click.option(
    "--exec",
    "command",
    help="shell command run once per event, event JSON on stdin; non-zero exit = failure = retry",
)
@click.option("--webhook", metavar="URL", help="POST each event to URL, signed (--secret-env)")
@click.option("--secret-env", metavar="VAR", help="webhook: the HMAC secret's env variable")
@click.option(
    "--haproxy",
    "sockets",
    multiple=True,
    metavar="SOCKET",
    help="HAProxy runtime API (path, unix:PATH or host:port; repeatable)",
)
@click.option(
    "--server",
    default="{service}/{instance}",
    show_default=True,
    help="haproxy: backend/server template",
)
@click.option("--down-state", type=click.Choice(["maint", "drain"]), default="maint")
@click.option("--routes", is_flag=True, help="keep the routing tables (hbbus routes, Router)")
@click.option("--redis-promote", metavar="SERVICE", help="promote replicas of this Redis group")
@click.option("--max-retries", type=click.IntRange(min=0), default=5, show_default=True)
@click.option(
    "--backoff",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="first retry delay in seconds, doubled per retry",
)
@click.option("--max-backoff", type=click.FloatRange(min=0.01), default=60.0, show_default=True)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=None,
    help="seconds an action may take (exec: 60, webhook: 5, haproxy: 5, redis-promote: 2)",
)
@verbose_option
@click.pass_context
def failover_run(ctx: click.Context, config_path: str | None, **flags: Any) -> None:
    """Run failover actions until SIGTERM: every action of --config, or the one the flags
    describe (--exec, --webhook, --haproxy, --routes or --redis-promote, with --group)."""
    from hbbus.workers.failover_runner import build_consumer, load_config, run_consumers

    if config_path and any(flags[k] for k in (*ACTION_FLAGS, "group", "bindings")):
        raise ConfigError("--config excludes --group, --bind and the single-action flags")
    specs = load_config(config_path) if config_path else [single_action_spec(flags)]
    worker_logging(ctx)
    consumers = [build_consumer(settings_of(ctx), spec) for spec in specs]

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await run_consumers(consumers, stop)

    run_async(main())


ACTION_FLAGS = ("command", "webhook", "sockets", "routes", "redis_promote")


def single_action_spec(flags: dict[str, Any]) -> Any:
    """The ActionSpec the single-action flags of ``failover run`` describe."""
    from hbbus.failover import RetryPolicy
    from hbbus.workers.failover_runner import ACTION_KEYS, ActionSpec, check_spec

    chosen = [k for k in ACTION_FLAGS if flags[k]]
    if len(chosen) != 1:
        raise ConfigError(
            "give --config, or exactly one of --exec, --webhook, --haproxy, --routes, "
            "--redis-promote (with --group)"
        )
    if not flags["group"]:
        raise ConfigError("--group is required without --config")
    raw: dict[str, Any] = {"name": flags["group"], **_action_keys(chosen[0], flags)}
    if flags["bindings"]:
        raw["bind"] = list(flags["bindings"])
    if flags["timeout"] is not None:
        if "timeout_s" not in ACTION_KEYS[raw["type"]]:
            raise ConfigError(f"--timeout does not apply to the {raw['type']} action")
        raw["timeout_s"] = flags["timeout"]
    spec: ActionSpec = check_spec(raw, {}, "flags")
    spec.retry = RetryPolicy(
        max_retries=flags["max_retries"],
        base_s=flags["backoff"],
        max_s=max(flags["backoff"], flags["max_backoff"]),
    )
    return spec


def _action_keys(flag: str, flags: dict[str, Any]) -> dict[str, Any]:
    """The config keys that one single-action flag (and its companions) stand for."""
    if flag == "command":
        return {"type": "exec", "command": flags["command"]}
    if flag == "webhook":
        secret = {"secret_env": flags["secret_env"]} if flags["secret_env"] else {}
        return {"type": "webhook", "url": flags["webhook"], **secret}
    if flag == "sockets":
        return {
            "type": "haproxy",
            "sockets": list(flags["sockets"]),
            "server": flags["server"],
            "down_state": flags["down_state"],
        }
    if flag == "routes":
        return {"type": "routes"}
    return {"type": "redis-promote", "service": flags["redis_promote"]}


@failover.command("check")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def failover_check(config_path: str) -> None:
    """Check a failover config file and print its actions (no connection is made)."""
    from hbbus.workers.failover_runner import load_config

    for spec in load_config(config_path):
        click.echo(
            f"{spec.name:<16} {spec.type:<14} bind {', '.join(spec.bindings)}  "
            f"(retries {spec.retry.max_retries}, backoff {spec.retry.base_s:g}s)"
        )


@failover.command("dlq")
@click.option("--group", required=True)
@click.option("--replay", is_flag=True, help="move the messages back to the group's queue")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def failover_dlq(ctx: click.Context, group: str, replay: bool, limit: int, as_json: bool) -> None:
    """Show (or --replay) the events a group gave up on, with their last error."""
    from hbbus.failover import dlq_messages

    check_name(group, "group")
    items = run_async(dlq_messages(settings_of(ctx), group, limit, replay))
    for item in items:
        if as_json:
            click.echo(orjson.dumps(item).decode())
        else:
            click.echo(f"{item['body']}\n    attempts={item['attempts']} error={item['error']}")
    if not as_json:
        click.echo(f"{len(items)} {'replayed' if replay else 'dead-lettered'} events", err=True)


@cli.group()
def sidecar() -> None:
    """Heartbeat on behalf of a server that cannot (Redis)."""


@sidecar.command("redis")
@click.option("--addr", required=True, metavar="HOST:PORT", help="the redis-server to watch")
@click.option("--service", required=True, help="the service (the group of servers)")
@click.option("--instance", help="instance name [default: redis-HOST-PORT]")
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True)
@click.option("--misses", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--password-env", metavar="VAR", help="environment variable with its password")
@verbose_option
@click.pass_context
def sidecar_redis(
    ctx: click.Context,
    addr: str,
    service: str,
    instance: str | None,
    interval: float,
    misses: int,
    password_env: str | None,
) -> None:
    """Heartbeat for a redis-server with its role and replication offset in meta; a server
    that does not answer stops the heartbeats. SIGTERM sends `left`."""

    from hbbus.workers.sidecar import run_redis_sidecar

    parse_addr(addr)
    check_name(service, "service")
    if instance is not None:
        check_name(instance, "instance")
    password = env_secret(password_env, "--password-env") if password_env else None
    worker_logging(ctx)

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await run_redis_sidecar(
            settings_of(ctx),
            addr,
            service=service,
            instance=instance,
            interval_s=interval,
            misses=misses,
            password=password,
            stop=stop,
        )

    run_async(main())


def routes_table(table: dict[str, Any]) -> Any:
    from rich.table import Table

    title = (
        f"{table['service']}: version {table['version']}, epoch {table['epoch']}, "
        f"primary {table['primary'] or '-'}"
    )
    out = Table(title=title, title_justify="left", header_style="bold")
    for col in ("instance", "endpoint", "role", "weight", "load", "route", "since", "reason"):
        out.add_column(col, no_wrap=col != "reason")
    now_ms = time.time() * 1000
    for e in table["endpoints"]:
        route = "[red]fenced" if e["fenced"] else "[green]yes" if e["routable"] else "[dim]no"
        out.add_row(
            e["instance"],
            e["endpoint"],
            e["role"] or "-",
            str(e["weight"]),
            "-" if e["load"] is None else f"{e['load']:g}",
            route,
            fmt_age(int(now_ms - e["since_ms"])) if e["since_ms"] else "-",
            e["reason"],
        )
    return out


@cli.command()
@click.argument("service", required=False)
@click.option("--json", "as_json", is_flag=True, help="one JSON array of tables")
@click.pass_context
def routes(ctx: click.Context, service: str | None, as_json: bool) -> None:
    """The routing tables (of SERVICE): endpoints, roles, which are routable, the fencing
    epoch and the primary."""
    if service is not None:
        check_name(service, "service")
    tables = run_async(ops.routes(settings_of(ctx), service))
    if as_json:
        click.echo(orjson.dumps(tables).decode())
        return
    if not tables:
        click.echo("no routing tables (is a routes or redis-promote action running?)")
        return
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    for table in tables:
        console.print(routes_table(table))


# -- operators -------------------------------------------------------------------------------------
def fmt_age(ms: int) -> str:
    if ms < 10_000:
        return f"{ms / 1000:.1f}s"
    if ms < 3_600_000:
        return f"{ms // 60_000}m{ms // 1000 % 60:02d}s"
    return f"{ms // 3_600_000}h{ms // 60_000 % 60:02d}m"


def fmt_meta(meta: dict[str, Any], width: int = 48) -> str:
    text = " ".join(f"{k}={v}" for k, v in meta.items())
    return text if len(text) <= width else text[: width - 1] + "…"


def status_table(rows: list[dict[str, Any]], title: str | None = None) -> Any:
    from rich.table import Table

    colours = {"alive": "green", "suspect": "yellow", "dead": "bold red", "left": "dim"}
    table = Table(title=title, title_justify="left", header_style="bold")
    for col in ("service", "instance", "state", "age", "seq", "incarnation", "meta"):
        table.add_column(
            col, justify="right" if col in ("age", "seq") else "left", no_wrap=col != "meta"
        )
    for r in rows:
        state = r["state"] if r["status"] in ("ok", "left", "") else f"{r['state']} ({r['status']})"
        if r.get("flapping"):
            state += " (flapping)"
        if r.get("held"):
            state += " (held)"
        elif r.get("muted"):
            state += " (maintenance)"
        table.add_row(
            r["service"],
            r["instance"],
            f"[{colours.get(r['state'], '')}]{state}",
            fmt_age(r["age_ms"]),
            str(r["seq"]),
            r["incarnation"],
            fmt_meta(r["meta"]),
        )
    return table


def summary(rows: list[dict[str, Any]]) -> str:
    counts = {s: sum(1 for r in rows if r["state"] == s) for s in ops.STATES}
    return f"{len(rows)} instances: " + ", ".join(f"{n} {s}" for s, n in counts.items())


@cli.command()
@click.option("--service", help="only this service")
@click.option("--state", type=click.Choice(ops.STATES), help="only instances in this state")
@click.option("--json", "as_json", is_flag=True, help="one JSON array")
@click.pass_context
def status(ctx: click.Context, service: str | None, state: str | None, as_json: bool) -> None:
    """The observer's health, then a table of every instance: state, age of its last
    heartbeat, seq, incarnation, meta."""
    rows = run_async(ops.status(settings_of(ctx), service, state))
    if as_json:
        click.echo(orjson.dumps(rows).decode())
        return
    from rich.console import Console

    obs = run_async(ops.observer(settings_of(ctx)))
    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: do not wrap rows
    console.print(ops.observer_line(obs), highlight=False, markup=False)
    console.print(summary(rows), highlight=False)
    if rows:
        console.print(status_table(rows))


@cli.command()
@click.argument("target", metavar="SERVICE/INSTANCE")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx: click.Context, target: str, as_json: bool) -> None:
    """One instance's record and its recent transitions."""
    service, instance = split_instance_id(target)
    row = run_async(ops.show(settings_of(ctx), service, instance))
    if as_json:
        click.echo(orjson.dumps(row).decode())
        return
    for key in (
        "service",
        "instance",
        "state",
        "status",
        "incarnation",
        "seq",
        "interval_ms",
        "ttl_ms",
        "alive_for_ms",
    ):
        click.echo(f"{key:>17}: {row[key]}")
    click.echo(f"{'last heartbeat':>17}: {fmt_age(row['age_ms'])} ago")
    click.echo(f"{'meta':>17}: {orjson.dumps(row['meta']).decode()}")
    click.echo("history (newest first):")
    for event in row["history"]:
        click.echo("  " + fmt_event(event))


def fmt_event(event: dict[str, Any]) -> str:
    at = datetime.fromtimestamp(event["at_ms"] / 1000).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    extra = ""
    data = event.get("data") or {}
    if event["kind"] == "dead":
        extra = f"  silent {event['at_ms'] - event['last_seen_ms']} ms (ttl {event['ttl_ms']} ms)"
    elif event["kind"].startswith("action."):
        what = data.get("detail") or data.get("error") or ""
        extra = (
            f"  {data.get('group')} ({data.get('action')}) on {data.get('for_kind')}, "
            f"try {data.get('attempt')}: {what}"
        )
    elif event["kind"] == "promoted":
        extra = f"  epoch {data.get('epoch')}, replaces {data.get('old_primary')}"
    return (
        f"{at}  {event['kind']:<10} {event['service']}/{event['instance']}  "
        f"inc={event['incarnation']} seq={event['seq']} id={event['id']}{extra}"
    )


@cli.command()
@click.argument("pattern", default="#")
@click.option("--follow", "-f", is_flag=True, help="keep printing live events")
@click.option("--json", "as_json", is_flag=True, help="one event JSON per line, flushed")
@click.option(
    "--last",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="how many past events to print first",
)
@click.pass_context
def events(ctx: click.Context, pattern: str, follow: bool, as_json: bool, last: int) -> None:
    """Recent transitions matching PATTERN (e.g. 'dead.#', '*.db.*'), then live with --follow."""
    settings = settings_of(ctx)

    def emit(event: dict[str, Any]) -> None:
        click.echo(orjson.dumps(event).decode() if as_json else fmt_event(event))
        sys.stdout.flush()

    async def main() -> None:
        if not follow:
            for event in await ops.recent_events(settings, pattern, last):
                emit(event)
            return
        stop = asyncio.Event()
        install_signal_handlers(stop)
        async for event in ops.follow_events(settings, pattern, last, stop):
            emit(event)

    run_async(main())


@cli.command()
@click.argument("target", metavar="SERVICE/INSTANCE")
@click.pass_context
def forget(ctx: click.Context, target: str) -> None:
    """Remove an instance's record (it rejoins if it is still heartbeating)."""
    service, instance = split_instance_id(target)
    run_async(ops.forget(settings_of(ctx), service, instance))
    click.echo(f"forgot {service}/{instance}")


@cli.command()
@click.argument("target", metavar="SERVICE/INSTANCE")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def why(ctx: click.Context, target: str, as_json: bool) -> None:
    """Explain an instance's verdict: gaps, deadline and how it was computed, transitions."""
    service, instance = split_instance_id(target)
    doc = run_async(ops.why(settings_of(ctx), service, instance))
    if as_json:
        click.echo(orjson.dumps(doc).decode())
        return
    state = doc["state"] + (" (flapping)" if doc["flapping"] else "")
    state += f" (held by the guard: {doc['held_by']})" if doc["held_by"] else ""
    state += " (maintenance)" if doc["muted"] else ""
    click.echo(f"{service}/{instance}: {state}, last heartbeat {fmt_age(doc['age_ms'])} ago")
    click.echo(f"  {doc['observer']}")
    click.echo(f"  recent gaps (ms): {' '.join(map(str, doc['gaps_ms'])) or '-'}")
    click.echo(f"  deadline: {doc['deadline']}")
    if doc["state"] in ("alive", "suspect"):
        click.echo(
            f"  suspect in {doc['suspect_at_ms_from_now']} ms, "
            f"dead in {doc['dead_at_ms_from_now']} ms (if nothing arrives)"
        )
    for w in doc["maintenance"]:
        click.echo(f"  maintenance on {w['target']} for {fmt_age(w['left_ms'])}: {w['reason']}")
    click.echo("  transitions (newest first):")
    for event in doc["history"]:
        flags = [f for f in ("muted", "resync") if event.get(f)]
        if event.get("held"):
            flags.append(f"held by {event['held']}")
        note = f"  [{', '.join(flags)}]" if flags else ""
        click.echo(f"    {fmt_event(event)}  prev={event['prev']}{note}")


@cli.group()
def detector() -> None:
    """Adaptive deadlines per service (mean + k*sigma of the gaps), instead of the declared."""


@detector.command("set")
@click.argument("service")
@click.option("--k", type=click.FloatRange(min=0.5), default=4.0, show_default=True)
@click.option(
    "--floor",
    "floor_",
    default="1s",
    show_default=True,
    help="never dead sooner than this after the last heartbeat",
)
@click.option(
    "--ceiling",
    default="30s",
    show_default=True,
    help="always dead at most this long after the last heartbeat",
)
@click.pass_context
def detector_set(ctx: click.Context, service: str, k: float, floor_: str, ceiling: str) -> None:
    """Judge SERVICE's instances on their own gaps (takes effect with their next heartbeats)."""
    from hbbus.detect import DetectorConfig

    check_name(service, "service")
    floor_ms, ceiling_ms = ops.parse_duration_ms(floor_), ops.parse_duration_ms(ceiling)
    if floor_ms > ceiling_ms:
        raise ConfigError("--floor must not be above --ceiling")
    config = DetectorConfig(k, floor_ms, ceiling_ms)
    run_async(ops.detector_set(settings_of(ctx), service, config))
    click.echo(
        f"{service}: adaptive deadlines, k={k:g}, floor {floor_ms} ms, ceiling {ceiling_ms} ms"
    )


@detector.command("off")
@click.argument("service")
@click.pass_context
def detector_off(ctx: click.Context, service: str) -> None:
    """Back to the declared interval x misses."""
    run_async(ops.detector_off(settings_of(ctx), check_name(service, "service")))
    click.echo(f"{service}: declared deadlines")


@detector.command("list")
@click.pass_context
def detector_list(ctx: click.Context) -> None:
    """Services with adaptive deadlines."""
    configured = run_async(ops.detectors(settings_of(ctx)))
    for service, config in configured.items():
        click.echo(
            f"{service}: k={config.k:g} floor={config.floor_ms} ms ceiling={config.ceiling_ms} ms"
        )
    if not configured:
        click.echo("no service has adaptive deadlines")


@cli.group()
def guard() -> None:
    """The mass-expiry guard: what it holds, and releasing it."""


@guard.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def guard_status(ctx: click.Context, as_json: bool) -> None:
    """Tripped scopes (a service or a zone) and the deaths each holds."""
    tripped = run_async(ops.guard_status(settings_of(ctx)))
    if as_json:
        click.echo(orjson.dumps(tripped).decode())
        return
    for g in tripped:
        click.echo(
            f"{g['scope']}: tripped {fmt_age(g['tripped_ms_ago'])} ago, "
            f"{len(g['held'])} dead events held: {' '.join(g['held']) or '-'}"
        )
    if not tripped:
        click.echo("the mass-expiry guard holds nothing")


@guard.command("release")
@click.argument("service", required=False)
@click.option("--zone", help="release a zone's held deaths instead of a service's")
@click.pass_context
def guard_release(ctx: click.Context, service: str | None, zone: str | None) -> None:
    """Publish the dead events the guard holds for SERVICE (or --zone; neither: everything)."""
    scopes = []
    if service:
        scopes.append(f"service:{check_name(service, 'service')}")
    if zone:
        scopes.append(f"zone:{check_name(zone, 'zone')}")
    released, done = run_async(ops.guard_release(settings_of(ctx), scopes))
    click.echo(f"released {released} dead events ({', '.join(done) or 'nothing was held'})")


@cli.group()
def maintenance() -> None:
    """Quiet `suspect` and `dead` events of a service or instance for a while."""


def maintenance_target(target: str) -> str:
    if "/" in target:
        return "/".join(split_instance_id(target))
    return check_name(target, "service")


@maintenance.command("on")
@click.argument("target", metavar="SERVICE[/INSTANCE]")
@click.option("--for", "duration", required=True, help="how long: 90s, 30m, 2h, 1d")
@click.option("--reason", required=True, help="why (shown in `hbbus maintenance list`)")
@click.pass_context
def maintenance_on(ctx: click.Context, target: str, duration: str, reason: str) -> None:
    """Start a window: deaths are tracked and shown but not published; it ends by itself."""
    target = maintenance_target(target)
    until_ms = run_async(
        ops.maintenance_on(settings_of(ctx), target, ops.parse_duration_ms(duration), reason)
    )
    until = datetime.fromtimestamp(until_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
    click.echo(f"maintenance on {target} until {until}: {reason}")


@maintenance.command("off")
@click.argument("target", metavar="SERVICE[/INSTANCE]")
@click.pass_context
def maintenance_off(ctx: click.Context, target: str) -> None:
    """End a window early; deaths it kept quiet and that still hold are then published."""
    target = maintenance_target(target)
    run_async(ops.maintenance_off(settings_of(ctx), target))
    click.echo(f"maintenance off {target}")


@maintenance.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def maintenance_list(ctx: click.Context, as_json: bool) -> None:
    """The open windows."""
    windows = run_async(ops.maintenance_list(settings_of(ctx)))
    if as_json:
        click.echo(orjson.dumps(windows).decode())
        return
    for w in windows:
        click.echo(f"{w['target']:<40} {fmt_age(w['left_ms'])} left  {w['reason']}")
    if not windows:
        click.echo("no maintenance window is open")


@cli.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check RabbitMQ, Redis, the topology, the aggregators and the clock; say what is wrong."""
    report = run_async(ops.doctor(settings_of(ctx)))
    for check in report.checks:
        mark = "ok  " if check.ok else ("warn" if check.warning else "FAIL")
        click.echo(f"[{mark}] {check.name}: {check.detail}")
    if not all(c.ok or c.warning for c in report.checks):
        sys.exit(EXIT_PROBLEMS)


@cli.command()
@click.option(
    "--duration",
    type=click.FloatRange(min=10),
    default=45.0,
    show_default=True,
    help="seconds; the demo ends by itself",
)
@click.option("--demo-namespace", help="namespace for the demo [default: <namespace>-demo]")
@click.option("--keep", is_flag=True, help="keep the demo's queues and keys afterwards")
@verbose_option
@click.pass_context
def demo(ctx: click.Context, duration: float, demo_namespace: str | None, keep: bool) -> None:
    """A simulated fleet, two aggregators and a failover consumer, live in the terminal."""
    from hbbus.workers.demo import run_demo

    settings = settings_of(ctx)
    settings = settings.with_namespace(demo_namespace or f"{settings.namespace}-demo"[:64])
    code = run_async(run_demo(settings, duration, keep=keep))
    sys.exit(code)


def main() -> None:
    cli(prog_name="hbbus")


if __name__ == "__main__":
    main()
