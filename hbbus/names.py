"""Every exchange, queue and Redis key name, built in this one place.

Redis keys share the hash tag ``{<ns>}`` so that all keys one Lua call touches live in one
slot of a Redis Cluster (DESIGN.md section 7).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from hbbus.errors import ConfigError
from hbbus.settings import check_name


def instance_id(service: str, instance: str) -> str:
    return f"{service}/{instance}"


def split_instance_id(value: str) -> tuple[str, str]:
    """``'svc/inst'`` -> ``('svc', 'inst')``; raises ConfigError when malformed."""
    service, sep, instance = value.partition("/")
    if not sep:
        raise ConfigError(f"expected SERVICE/INSTANCE, got {value!r}")
    return check_name(service, "service"), check_name(instance, "instance")


@dataclass(frozen=True)
class Names:
    namespace: str

    def __post_init__(self) -> None:
        check_name(self.namespace, "namespace")

    # -- RabbitMQ ---------------------------------------------------------------------------
    @property
    def heartbeats_exchange(self) -> str:
        return f"{self.namespace}.heartbeats"

    @property
    def aggregator_queue(self) -> str:
        return f"{self.namespace}.aggregator"

    @property
    def invalid_queue(self) -> str:
        return f"{self.namespace}.invalid"

    @property
    def events_exchange(self) -> str:
        return f"{self.namespace}.events"

    @property
    def unrouted_exchange(self) -> str:
        return f"{self.namespace}.events.unrouted"

    @property
    def unrouted_queue(self) -> str:
        return f"{self.namespace}.events.unrouted"

    def failover_queue(self, group: str) -> str:
        return f"{self.namespace}.failover.{group}"

    def failover_retry_queue(self, group: str, delay_ms: int) -> str:
        return f"{self.namespace}.failover.{group}.retry.{delay_ms}ms"

    def failover_dlq(self, group: str) -> str:
        return f"{self.namespace}.failover.{group}.dlq"

    @staticmethod
    def probe_routing_key(aggregator: str) -> str:
        return "probe." + "".join(c if c.isalnum() or c in "_-" else "-" for c in aggregator)

    @staticmethod
    def heartbeat_routing_key(service: str, instance: str) -> str:
        return f"hb.{service}.{instance}"

    @staticmethod
    def event_routing_key(kind: str, service: str, instance: str) -> str:
        return f"{kind}.{service}.{instance}"

    # -- Redis ------------------------------------------------------------------------------
    @property
    def key_prefix(self) -> str:
        """Prefix of every Redis key; the Lua scripts append the documented suffixes."""
        return "{" + self.namespace + "}:"

    @staticmethod
    @functools.lru_cache(maxsize=1 << 18)
    def bucket(service: str, instance: str) -> str:
        """The bucket of an instance: the first three hex digits of sha1("svc/inst")."""
        return hashlib.sha1(f"{service}/{instance}".encode()).hexdigest()[:3]

    def bucket_key(self, service: str, instance: str) -> str:
        """Hash holding the instance's packed record (and about 1/4096 of the others')."""
        return f"{self.key_prefix}r:{self.bucket(service, instance)}"

    def deadline_key(self, service: str, instance: str) -> str:
        """Sorted set of the deadlines of the instance's bucket."""
        return f"{self.key_prefix}dl:{self.bucket(service, instance)}"

    @property
    def dlmin_key(self) -> str:
        """Sorted set: bucket -> its earliest deadline (every non-empty bucket)."""
        return f"{self.key_prefix}dlmin"

    def record_key(self, service: str, instance: str) -> str:
        """The record hash of the earlier layout (moved into the buckets when first read)."""
        return f"{self.key_prefix}inst:{service}/{instance}"

    def meta_key(self, service: str, instance: str) -> str:
        return f"{self.key_prefix}meta:{service}/{instance}"

    def alive_key(self, service: str, instance: str) -> str:
        """The alive key of the earlier layout."""
        return f"{self.key_prefix}alive:{service}/{instance}"

    def history_key(self, service: str, instance: str) -> str:
        return f"{self.key_prefix}history:{service}/{instance}"

    @property
    def instances_key(self) -> str:
        """The set of the earlier layout's instances not moved into the buckets yet."""
        return f"{self.key_prefix}instances"

    @property
    def deadlines_key(self) -> str:
        """The earlier layout's sorted set of every instance's deadline."""
        return f"{self.key_prefix}deadlines"

    @property
    def outbox_key(self) -> str:
        return f"{self.key_prefix}outbox"

    @property
    def outbox_body_key(self) -> str:
        return f"{self.key_prefix}outbox:body"

    @property
    def outbox_due_key(self) -> str:
        """Sorted set: each instance's oldest pending event -> when it may be handed out (its
        lease's end; 0: now). The events behind it wait in ``outbox:wait:<svc>/<inst>``."""
        return f"{self.key_prefix}outbox:due"

    @property
    def outbox_pending_key(self) -> str:
        return f"{self.key_prefix}outbox:pending"

    @property
    def observers_key(self) -> str:
        """Hash: aggregator -> "<newest probe applied, ms> <last seen, ms>" (the watermark)."""
        return f"{self.key_prefix}observers"

    @property
    def observer_key(self) -> str:
        """Hash: the observer's own state (ok/degraded, since, reason, last watermark)."""
        return f"{self.key_prefix}observer"

    @property
    def maintenance_key(self) -> str:
        """Hash: service or service/instance -> "<until ms> <reason>"."""
        return f"{self.key_prefix}maintenance"

    @property
    def guard_key(self) -> str:
        """Hash: tripped mass-expiry scope -> "<tripped ms> <last release ms>"."""
        return f"{self.key_prefix}guard"

    @property
    def flapcheck_key(self) -> str:
        """Sorted set: flapping instance -> when to check whether it has been stable."""
        return f"{self.key_prefix}flapcheck"

    @property
    def detectors_key(self) -> str:
        """Hash: service -> "<k> <floor ms> <ceiling ms>" (adaptive deadlines)."""
        return f"{self.key_prefix}detectors"

    @property
    def notalive_key(self) -> str:
        """Sorted set: instances not alive (suspect, dead by since, left at 0): the guard's
        cheap bounds."""
        return f"{self.key_prefix}notalive"

    def held_key(self, scope: str) -> str:
        """Sorted set of the deaths a tripped scope holds (``service:api``, ``zone:eu-1``)."""
        return f"{self.key_prefix}held:{scope}"

    def service_members_key(self, service: str) -> str:
        return f"{self.key_prefix}svc:{service}"

    @property
    def log_key(self) -> str:
        return f"{self.key_prefix}log"

    @property
    def stats_key(self) -> str:
        return f"{self.key_prefix}stats"

    # -- routing (hbbus.routing) ----------------------------------------------------------
    @property
    def routed_services_key(self) -> str:
        """Set: the services that have a routing table."""
        return f"{self.key_prefix}routes"

    def routes_key(self, service: str) -> str:
        """Hash: instance -> JSON entry (endpoint, role, weight, routable, fenced, ...)."""
        return f"{self.key_prefix}routes:{service}"

    def routes_state_key(self, service: str) -> str:
        """Hash: the table's ``version``, fencing ``epoch`` and ``primary``."""
        return f"{self.key_prefix}routes:{service}:state"

    def promotion_key(self, service: str) -> str:
        """Hash: the promotion in progress (epoch, old primary, candidate, owner, lease)."""
        return f"{self.key_prefix}promotion:{service}"

    def failover_key(self, group: str, what: str) -> str:
        return f"{self.key_prefix}fo:{group}:{what}"
