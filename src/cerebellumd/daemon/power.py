"""Rail-map power: per-rail sensors (`[power.rail_sensors]`) read off the loop on a period, turned
into per-domain watts by the rail map (`[power.rails]`, `policies.rails.domain_power`: a total
and the parts inside it are never summed), and energy integrated per domain by trapezoid on the
monotonic clock (`policies.rails.integrate_trapezoid`).

The ledger's own integration (rectangles on its tick) skips these domains (registered with
`integrates_itself`): energy is added here, once, between two readings. This service runs
on its own timer, so energy keeps being counted while the daemon is paused in NM bus sleep.

Exports, besides the contract's `cerebellumd_domain_power_watts{source="sensor"}` (set by the
daemon from `power_sources`) and `cerebellumd_domain_energy_joules_total`:
`cerebellumd_rail_power_watts{rail}`, `cerebellumd_rail_overdrawn_total{rail}` (a group whose
parts exceeded its total: a sensor or map error) and `cerebellumd_rail_missing_total{rail}`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Mapping

from prometheus_client import Counter, Gauge

from ..config import SensorConfig
from ..drivers.accel_mcu import McuPowerSensor
from ..drivers.base import PowerSensor
from ..drivers.hwmon import HwmonSensor
from ..drivers.mcu_link import McuLink
from ..policies.rails import DomainPower, RailMap, domain_power, integrate_trapezoid
from .host import EnergyHost, Undo
from .metrics import Metrics
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)
_HISTORY = 256  # readings kept for `status`/tests; bounded


def build_rail_sensor(config: SensorConfig, link: McuLink | None) -> PowerSensor:
    if config.driver == "hwmon":
        return HwmonSensor(config.options)
    if config.driver == "mcu":
        if link is None:
            raise ValueError("a rail sensor with driver=mcu needs an [mcu] section")
        return McuPowerSensor(config.options, link=link)
    raise ValueError(f"unknown rail sensor driver {config.driver!r} (hwmon, mcu)")


class RailPower:
    """A daemon service reading every mapped rail each `interval_s`."""

    def __init__(self, rail_map: RailMap, sensors: Mapping[str, PowerSensor], interval_s: float,
                 *, metrics: Metrics | None = None, energy: EnergyHost | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rail_map = rail_map
        self.sensors = dict(sensors)
        self.interval_s = interval_s
        self._energy = energy
        self._clock = clock
        self._undo: list[Undo] = []
        self.domains = sorted({g.other_domain for g in rail_map.groups}
                              | {d for g in rail_map.groups for d in g.parts.values()}
                              | set(rail_map.independent.values()))
        self.watts: dict[str, float] = {}
        self.joules: dict[str, float] = dict.fromkeys(self.domains, 0.0)
        self.rail_watts: dict[str, float] = {}
        self.overdrawn: collections.Counter[str] = collections.Counter()
        self.missing: collections.Counter[str] = collections.Counter()
        self.reads = 0
        self.last: DomainPower | None = None
        self.history: collections.deque[tuple[float, dict[str, float]]] = collections.deque(maxlen=_HISTORY)
        self._prev: dict[str, tuple[float, float]] = {}  # domain -> (t, watts) of the last reading
        self._task: asyncio.Task[None] | None = None
        self.m_rail: Gauge | None = None
        self.m_overdrawn: Counter | None = None
        self.m_missing: Counter | None = None
        if metrics is not None:
            self.m_rail = metrics.gauge("cerebellumd_rail_power_watts", "Power of one measured rail (W).", ["rail"])
            self.m_overdrawn = metrics.counter("cerebellumd_rail_overdrawn",
                                               "Readings where a group's parts exceeded its total rail.", ["rail"])
            self.m_missing = metrics.counter("cerebellumd_rail_missing",
                                             "Readings without a usable value, by rail.", ["rail"])
            for rail in rail_map.rails():
                self.m_rail.labels(rail).set(0)
                self.m_missing.labels(rail)
            for group in rail_map.groups:
                self.m_overdrawn.labels(group.total)
            for domain in self.domains:
                metrics.domain_energy.labels(domain)

    def source(self, domain: str) -> Callable[[], float | None]:
        return lambda: self.watts.get(domain)

    async def async_start(self) -> None:
        if self._energy is not None:
            for domain in self.domains:
                self._undo.append(self._energy.add_power_source(domain, self.source(domain)))
        self._task = asyncio.create_task(self._run(), name="rail-power")

    async def async_stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        while self._undo:
            self._undo.pop()()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            await self.read_once()
            # Absolute deadlines (no drift); after a long stall skip to the next one.
            due = max(due + self.interval_s, loop.time())
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def read_once(self) -> DomainPower:
        """Read every rail (concurrently, each off the loop), map, integrate."""
        rails = list(self.sensors)
        results = await asyncio.gather(*(self.sensors[r].async_read() for r in rails), return_exceptions=True)
        t = self._clock()
        readings: dict[str, float] = {}
        for rail, result in zip(rails, results, strict=True):
            if isinstance(result, BaseException):
                log.error("rail sensor %s failed: %s", rail, result)
            elif result is not None and math.isfinite(result.watts):
                readings[rail] = result.watts
        power = domain_power(readings, self.rail_map)
        self._account(t, readings, power)
        return power

    def _account(self, t: float, readings: Mapping[str, float], power: DomainPower) -> None:
        self.reads += 1
        self.last = power
        self.rail_watts = dict(readings)
        for rail in power.overdrawn:
            self.overdrawn[rail] += 1
        for rail in power.missing:
            self.missing[rail] += 1
        if power.overdrawn:
            log.warning("rail map: parts exceed the total of %s (sensor or map error)", ", ".join(power.overdrawn))
        for domain in self.domains:
            w = power.watts.get(domain)
            prev = self._prev.pop(domain, None)
            if w is None:
                continue  # no reading: nothing integrated for this interval (counted as missing)
            if prev is not None:
                joules = integrate_trapezoid(prev[0], prev[1], t, w)
                self.joules[domain] += joules
                self._export_energy(domain, joules)
            self._prev[domain] = (t, w)
        self.watts = dict(power.watts)
        self.history.append((t, dict(power.watts)))
        self._export(readings, power)

    def _export_energy(self, domain: str, joules: float) -> None:
        if self._energy is not None:
            self._energy.add_energy(domain, joules)

    def _export(self, readings: Mapping[str, float], power: DomainPower) -> None:
        if self.m_rail is None or self.m_overdrawn is None or self.m_missing is None:
            return
        for rail, w in readings.items():
            if rail in self.rail_map.rails():
                self.m_rail.labels(rail).set(w)
        for rail in power.overdrawn:
            self.m_overdrawn.labels(rail).inc()
        for rail in power.missing:
            self.m_missing.labels(rail).inc()


__all__ = ["RailPower", "build_rail_sensor"]
