"""Adaptive deadlines: the detector maths, in Python.

The aggregators run the same maths in Lua (``hbbus/lua/ingest.lua``, ``adapt``); this module
is what ``hbbus why`` uses to explain a verdict and what the property tests exercise.

For each instance of a service that has an adaptive detector, the inter-arrival gaps feed an
exponentially weighted mean ``m`` and variance ``v`` (weight ``ALPHA``). Once ``WARMUP`` gaps
are known, the instance is dead after ``clamp(max(m + k*sigma, 1.5 * longest recent gap),
floor, ceiling)`` of silence (sigma at least m/4) and suspect after
``clamp(m + 2*sigma, floor, ceiling)`` when that comes first; before, the declared
interval * misses (clamped) applies. ``ceiling`` is the promise: a stopped instance is
declared dead at most that long after its last heartbeat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ALPHA = 0.125
WARMUP = 20
KEEP_GAPS = 20
SIGMA_FLOOR = 0.25  # sigma is at least this share of the mean
ENVELOPE = 1.6  # never dead sooner than 1.6 x the longest of the recent gaps


@dataclass(frozen=True)
class DetectorConfig:
    k: float = 4.0
    floor_ms: int = 1_000
    ceiling_ms: int = 30_000

    def __post_init__(self) -> None:
        if not (self.k > 0 and 0 < self.floor_ms <= self.ceiling_ms):
            raise ValueError("a detector needs k > 0 and 0 < floor <= ceiling")

    def encode(self) -> str:
        return f"{self.k:g} {self.floor_ms} {self.ceiling_ms}"

    @classmethod
    def decode(cls, text: str) -> DetectorConfig:
        k, floor, ceiling = text.split()
        return cls(float(k), int(floor), int(ceiling))


@dataclass
class GapStats:
    """The running statistics of one instance's inter-arrival gaps."""

    n: int = 0
    mean: float = 0.0
    var: float = 0.0
    recent: list[int] = field(default_factory=list)

    def observe(self, gap_ms: int) -> None:
        if self.n == 0:
            self.mean, self.var = float(gap_ms), 0.0
        else:
            d = gap_ms - self.mean
            self.mean += ALPHA * d
            self.var = (1 - ALPHA) * (self.var + ALPHA * d * d)
        self.n += 1
        self.recent = [*self.recent, gap_ms][-KEEP_GAPS:]

    @property
    def sigma(self) -> float:
        return math.sqrt(self.var)


def clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def deadlines(
    stats: GapStats, config: DetectorConfig, declared_ttl_ms: int
) -> tuple[int, int | None]:
    """``(dead_after_ms, suspect_after_ms or None)``, counted from the last heartbeat."""
    if stats.n < WARMUP:
        return int(clamp(declared_ttl_ms, config.floor_ms, config.ceiling_ms)), None
    sigma = effective_sigma(stats)
    raw = max(stats.mean + config.k * sigma, ENVELOPE * max(stats.recent, default=0))
    dead = math.floor(clamp(raw, config.floor_ms, config.ceiling_ms))
    suspect = math.floor(clamp(stats.mean + 2 * sigma, config.floor_ms, config.ceiling_ms))
    return dead, (suspect if suspect < dead else None)


def effective_sigma(stats: GapStats) -> float:
    """The spread, never below a quarter of the mean: a run of very regular gaps must not make
    the next ordinary late one look like a death (the role of Akka's min-std-deviation)."""
    return max(stats.sigma, stats.mean * SIGMA_FLOOR)


def explain(stats: GapStats, config: DetectorConfig, declared_ttl_ms: int) -> str:
    dead, _ = deadlines(stats, config, declared_ttl_ms)
    if stats.n < WARMUP:
        return (
            f"warming up ({stats.n} of {WARMUP} gaps): declared TTL {declared_ttl_ms} ms "
            f"clamped to [{config.floor_ms}, {config.ceiling_ms}] = {dead} ms"
        )
    sigma = effective_sigma(stats)
    raw = max(stats.mean + config.k * sigma, ENVELOPE * max(stats.recent, default=0))
    return (
        f"adaptive: max(mean gap {stats.mean:.0f} ms + k {config.k:g} * sigma {sigma:.0f} ms, "
        f"{ENVELOPE:g} x longest recent gap {max(stats.recent, default=0)} ms) "
        f"= {raw:.0f} ms, clamped to [{config.floor_ms}, {config.ceiling_ms}] = {dead} ms"
    )
