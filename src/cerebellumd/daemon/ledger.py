"""The energy ledger: watts and joules per power domain, integrated on the decision tick.

Each domain's watts come from its source: the accelerator model (`model`), a fixed estimate
(`constant`) or a registered power source (`hwmon`, `mcu`, a rail map). The domains the rail map
feeds (`self_integrated`, from the config) are integrated by that part between its readings (by
trapezoid) and added through `add_energy`: the ledger never integrates them, so each joule is
counted once, also while that part is being stopped or rebuilt.

`reconfigure` applies a new `[power.domains]` list live: totals of the domains that stay are
kept, new domains start at zero, and a removed domain stops accruing (its counter series keeps
its last value, as Prometheus counters must).

The accelerator's domain (`[power] accelerator_domain`) is also counted by reason: each interval
between two `integrate` calls goes to the reason passed at the first of them, the one in force
while the energy was used (the daemon passes a path clamp's name, `path:*`, while one holds the
target). Reasons that carry an application's or a context's name (`hold:<owner>`,
`learned:<context>`) are counted under their prefix, so the label stays a bounded set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from ..config import DomainConfig
from .host import PowerSource, Undo
from .metrics import Metrics

MEASURED_SOURCES = frozenset({"hwmon", "mcu"})
#: Reasons named after an application or a learned context: counted under the prefix.
_OPEN_ENDED = ("hold:", "learned:")


def reason_label(reason: str) -> str:
    for prefix in _OPEN_ENDED:
        if reason.startswith(prefix):
            return prefix[:-1]
    return reason


class EnergyLedger:
    def __init__(self, domains: Iterable[DomainConfig], metrics: Metrics, model_watts: Callable[[], float],
                 self_integrated: Iterable[str] = (), accelerator_domain: str | None = None) -> None:
        self._metrics = metrics
        self._model_watts = model_watts
        self._domains: tuple[DomainConfig, ...] = ()
        self._sources: dict[str, PowerSource] = {}
        self.self_integrated: frozenset[str] = frozenset()
        self._last: float | None = None
        self.watts: dict[str, float] = {}
        self.joules: dict[str, float] = {}
        self.accelerator_domain: str | None = None
        self.reason = "start"  # in force since the last `integrate`
        self.reconfigure(domains, self_integrated, accelerator_domain)

    # -- configuration ---------------------------------------------------------------------

    def reconfigure(self, domains: Iterable[DomainConfig], self_integrated: Iterable[str] = (),
                    accelerator_domain: str | None = None) -> None:
        self._domains = tuple(domains)
        self.accelerator_domain = accelerator_domain
        self.self_integrated = frozenset(self_integrated)
        names = [d.name for d in self._domains]
        self.joules = {name: self.joules.get(name, 0.0) for name in names}
        self.watts = {name: self.watts.get(name, 0.0) for name in names}
        for d in self._domains:
            self._metrics.domain_energy.labels(d.name)
            self._metrics.domain_power.labels(d.name, self.source_label(d.name))

    @property
    def domains(self) -> tuple[DomainConfig, ...]:
        return self._domains

    @property
    def measured(self) -> frozenset[str]:
        return frozenset(d.name for d in self._domains if d.source in MEASURED_SOURCES)

    def source_label(self, domain: str) -> str:
        return "sensor" if domain in self.measured else "model"

    def add_power_source(self, domain: str, source: PowerSource) -> Undo:
        self._sources[domain] = source

        def undo() -> None:
            if self._sources.get(domain) is source:
                del self._sources[domain]

        return undo

    def reading(self, domain: str) -> float | None:
        """The latest watts of a domain's registered power source (None: none, or no reading yet)."""
        source = self._sources.get(domain)
        return source() if source is not None else None

    # -- accounting ------------------------------------------------------------------------

    def add_energy(self, domain: str, joules: float) -> None:
        """Energy integrated by a part itself (between its own readings)."""
        if joules <= 0 or domain not in self.joules:
            return
        self._account(domain, joules)

    def restore(self, joules: Mapping[str, float]) -> list[str]:
        """Add totals saved by an earlier run; returns the domains that are no longer configured."""
        dropped = []
        for domain, amount in joules.items():
            if domain not in self.joules:
                dropped.append(domain)
                continue
            self.joules[domain] += amount
            self._metrics.domain_energy.labels(domain).inc(amount)
        return dropped

    def integrate(self, now: float, reason: str | None = None) -> None:
        """Rectangles since the last call, at the watts read now; then `reason` (None: unchanged)
        is the one in force until the next call."""
        last, self._last = self._last, now
        dt = 0.0 if last is None or now <= last else now - last
        for d in self._domains:
            if d.source == "model":
                watts = self._model_watts()
            elif d.source == "constant":
                watts = d.watts or 0.0
            else:
                reading = self.reading(d.name)
                watts = reading if reading is not None else self.watts.get(d.name, 0.0)
            self.watts[d.name] = watts
            if dt <= 0 or d.name in self.self_integrated:
                continue
            self._account(d.name, watts * dt)
        if reason is not None:
            self.reason = reason

    def _account(self, domain: str, joules: float) -> None:
        self.joules[domain] += joules
        self._metrics.domain_energy.labels(domain).inc(joules)
        if domain == self.accelerator_domain:
            self._metrics.accelerator_energy.labels(reason_label(self.reason)).inc(joules)

    def export_power(self) -> None:
        for d in self._domains:
            self._metrics.domain_power.labels(d.name, self.source_label(d.name)).set(self.watts.get(d.name, 0.0))
