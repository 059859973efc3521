"""The narrow interface the daemon's parts are given instead of the daemon itself.

A part (MQTT, leases, NM, the lifecycle watchdog, power readers, ...) receives its own config
section, the few peers it needs (passed by `daemon/assembly.py`, never found by scanning) and
one or more of the Protocols below. Every registration returns its `Undo`; a part pushes those
on its undo stack and they run in reverse when it stops or is replaced on reload, so no part
ever writes another part's private state and nothing is left registered by a part that is gone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from ..accel import AccelState
from ..policies.calibration import Calibration
from ..policies.entry_risk import EntryRisk, EntryRiskParams
from ..policies.types import Hold, Sample

#: Undoes one registration; calling it twice is harmless.
Undo = Callable[[], None]
#: (signal, value) pairs and their policy time.
SampleSink = Callable[[Sequence[tuple[str, float]], float], None]
#: A source of holds or leases: called with policy time at every decision.
HoldSource = Callable[[float], Sequence[Hold]]
#: A measured power reading for a domain: latest watts, or None while unknown.
PowerSource = Callable[[], float | None]

T = TypeVar("T")


class Hooks(Generic[T]):
    """An ordered set of callbacks; `add` returns the undo. Iteration sees a copy, so a hook
    may remove itself (or another) while the hooks run."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[T] = []

    def add(self, item: T) -> Undo:
        self._items.append(item)

        def undo() -> None:
            if item in self._items:
                self._items.remove(item)

        return undo

    def __iter__(self) -> Iterator[T]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the daemon's state for the live view, MQTT and `status`."""

    time: float
    state: AccelState
    target: AccelState
    reason: str
    active_demands: tuple[str, ...]
    stale_signals: tuple[str, ...]
    watts: Mapping[str, float]
    joules: Mapping[str, float]
    signals: Mapping[str, float]
    holds: tuple[Hold, ...]
    wakes: int
    sleeps: int
    frames: int
    can_errors: int
    last_wake_latency_s: float | None = None
    measured: frozenset[str] = field(default_factory=frozenset)


class Events(Protocol):
    """The loop's events. Callbacks run on the loop and must not block."""

    def on_tick(self, hook: Callable[[float], None]) -> Undo: ...
    def on_telemetry(self, hook: Callable[[float], None]) -> Undo: ...
    def on_decision(self, listener: Callable[[Snapshot], None]) -> Undo: ...
    def on_input_while_paused(self, hook: Callable[[float], None]) -> Undo: ...


class Inputs(Protocol):
    def publish_samples(self, samples: Sequence[tuple[str, float]], t: float) -> None: ...
    def signal_value(self, name: str | None, now: float) -> float | None: ...
    def latest_sample(self, name: str | None) -> Sample | None: ...


class HoldsHost(Protocol):
    def add_hold_source(self, source: HoldSource) -> Undo: ...
    def active_holds(self, now: float) -> tuple[Hold, ...]: ...
    def operator_holds(self, now: float) -> tuple[Hold, ...]: ...


class EnergyHost(Protocol):
    def add_power_source(self, domain: str, source: PowerSource) -> Undo: ...
    def add_energy(self, domain: str, joules: float) -> None: ...
    def domain_watts(self) -> Mapping[str, float]: ...


class BusHost(Protocol):
    """What network management needs: go quiet, come back, and what the policy wants."""

    @property
    def paused(self) -> bool: ...
    def pause(self) -> None: ...
    def resume(self, *, reset: bool = True) -> None: ...
    def set_quiet(self, quiet: bool) -> None: ...
    def demand_needs_bus(self, now: float) -> bool: ...
    @property
    def deepest_state(self) -> AccelState: ...


class AcceleratorHost(Protocol):
    """The actuator as its peers see it."""

    @property
    def state(self) -> AccelState: ...
    @property
    def goal(self) -> AccelState | None: ...
    @property
    def last_wake_latency_s(self) -> float | None: ...
    def request(self, target: AccelState) -> None: ...
    def reapply(self, fallback: AccelState) -> None: ...
    @property
    def clamped_by(self) -> str | None: ...
    def add_target_filter(self, name: str, override: Callable[[], AccelState | None]) -> Undo: ...
    def on_transition(self, listener: Callable[[AccelState, float], None]) -> Undo: ...
    def on_failure(self, listener: Callable[[AccelState, str], None]) -> Undo: ...


@dataclass(frozen=True)
class CoreTotals:
    """What survives a restart: energy per domain and the wake/sleep counts."""

    joules: Mapping[str, float]
    wakes: int
    sleeps: int


class TotalsHost(Protocol):
    def totals(self) -> CoreTotals: ...
    def restore_totals(self, totals: CoreTotals) -> None: ...


class VehicleHost(Protocol):
    """What the vehicle power part tells the policy: the car is off (parked)."""

    def set_parked(self, parked: bool) -> None: ...
    @property
    def deepest_state(self) -> AccelState: ...
    @property
    def latency_budget_s(self) -> float: ...


class CalibrationHost(Protocol):
    """The policy's self-calibrating readiness, as its exporter and persistence see it."""

    def calibration(self) -> Calibration | None: ...
    def restore_calibration(self, calibration: Calibration) -> None: ...
    def unannounced_budget_s(self) -> float: ...
    def learned_table(self) -> dict[str, Any] | None: ...
    def restore_learned(self, data: Any) -> int: ...
    def entry_risk(self) -> EntryRisk | None: ...
    def entry_risk_params(self) -> EntryRiskParams: ...
    def restore_entry_risk(self, risk: EntryRisk) -> None: ...


class StateExtra(Protocol):
    """A part that adds a section to MQTT `state` (watchdog, leases, NM)."""

    def state_extra(self) -> dict[str, Any]: ...


class Part(Protocol):
    """Something the assembly starts and stops."""

    async def async_start(self) -> None: ...

    async def async_stop(self) -> None: ...


__all__ = [
    "AcceleratorHost", "BusHost", "CalibrationHost", "CoreTotals", "EnergyHost", "Events", "HoldSource",
    "HoldsHost", "Hooks", "Inputs", "Part", "PowerSource", "SampleSink", "Snapshot", "StateExtra", "TotalsHost", "Undo",
    "VehicleHost",
]


@dataclass(frozen=True)
class PowerDownResult:
    """The answer to a power-down permission: `acked` False means the MCU never acknowledged it
    (after the link's repeats) or refused it; the caller escalates (e.g. shuts the gateway down
    by its own means). `frames`: how many frames were sent (repeats included)."""

    acked: bool
    frames: int
    detail: str


class PowerDownLink(Protocol):
    """The gateway's own supply, through the companion MCU (docs/mcu-protocol.md: POWER_DOWN_ALLOWED,
    NEXT_WAKE). Implemented by the MCU source part; the assembly hands it to whoever decides
    (the 12 V budget part) and to the lease part for next-wake requests."""

    async def async_allow_power_down(self, reason: int, after_s: float | None = None) -> PowerDownResult: ...
    async def async_revoke_power_down(self) -> PowerDownResult: ...
    async def async_request_wake_at(self, when: float | None, reason: int = 4) -> None:
        """Wake the gateway at wall time `when` (time.time() scale); None cancels. Raises when the
        MCU did not acknowledge it."""
        ...
