"""Frozen value types shared by every policy: what goes into `step` and what comes out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from ..accel import AccelState
from .calibration import CalibrationParams
from .entry_risk import EntryRiskParams
from .expr import Expression


class DemandClass(StrEnum):
    CRITICAL = "critical"
    NORMAL = "normal"
    ANTICIPATORY = "anticipatory"


class OnStale(StrEnum):
    WAKE = "wake"
    HOLD = "hold"
    IGNORE = "ignore"


class HoldMode(StrEnum):
    AWAKE = "awake"  # keep the accelerator active while held
    SLEEP = "sleep"  # keep it resting; critical demands still win


@dataclass(frozen=True, slots=True)
class Sample:
    """One signal value and the monotonic time it was received."""

    value: float
    time: float


@dataclass(frozen=True, slots=True)
class SignalSpec:
    name: str
    max_age_s: float
    on_stale: OnStale


@dataclass(frozen=True, slots=True)
class DemandSpec:
    name: str
    expression: Expression
    demand_class: DemandClass
    confirm_s: float = 0.0
    deadline_s: float = 1.0


@dataclass(frozen=True, slots=True)
class Hold:
    """An operator hold or an application lease, with an absolute expiry (monotonic s)."""

    id: str
    owner: str
    reason: str
    mode: HoldMode
    expires_at: float
    priority: int = 0  # higher wins; safety-critical leases use a high priority


@dataclass(frozen=True, slots=True)
class Guards:
    battery_signal: str | None = None
    battery_min_v: float = 0.0
    temperature_signal: str | None = None
    temperature_max_c: float = float("inf")


@dataclass(frozen=True, slots=True)
class LearnedParams:
    """Learned anticipation (policies/learned.py). `features`: (signal, bin edges) pairs; empty
    edges: categorical (the bin is the value). No features: learning off."""

    features: tuple[tuple[str, tuple[float, ...]], ...] = ()
    min_rate_per_h: float = 60.0
    min_ratio: float = 2.0
    prior_exposure_s: float = 30.0
    min_onsets: int = 1

    @property
    def enabled(self) -> bool:
        return bool(self.features)


@dataclass(frozen=True, slots=True)
class PolicyParams:
    signals: tuple[SignalSpec, ...]
    demands: tuple[DemandSpec, ...]
    release_s: float = 5.0
    min_dwell_s: float = 0.5
    max_wake_cycles_per_hour: int = 60
    latency_budget_s: float = 1.5
    anticipation_release_s: float = 3.0
    initial_idle_prediction_s: float = 30.0
    idle_prediction_weight: float = 0.3
    deepest_state: AccelState = AccelState.OFF
    guards: Guards = field(default_factory=Guards)
    # Self-calibrating readiness (policies/calibration.py): on by default.
    calibration: CalibrationParams = field(default_factory=CalibrationParams)
    # How much time entries may spend where an unannounced challenge would be late (policies/entry_risk.py).
    entry_risk: EntryRiskParams = field(default_factory=EntryRiskParams)
    # Learned anticipation (policies/learned.py): off without features.
    learned: LearnedParams = field(default_factory=LearnedParams)


@dataclass(frozen=True, slots=True)
class Inputs:
    """What the shell hands to `step`: latest samples, operator holds, the accelerator state
    read back from its driver, and whether this step runs on the fast path (frame arrival)."""

    samples: Mapping[str, Sample]
    holds: tuple[Hold, ...] = ()
    actual: AccelState = AccelState.UNKNOWN
    fast_path: bool = False
    # The vehicle bus is going to sleep or asleep (CAN NM): signals go stale because their
    # senders stopped on purpose, not because something failed, so `on_stale` does not apply
    # (a stale signal is simply unknown) and the fail-safe wake stays for real faults.
    quiet_bus: bool = False
    # The vehicle is off (the fused power state, policies/vehicle_power.py): normal and
    # anticipatory demands are denied ("parked"), the accelerator rests in its deepest allowed
    # state at once (no release), and silent signals are quiet as in `quiet_bus`. Critical
    # demands and awake holds (a garage-mode lease) still wake it; min_dwell still applies.
    parked: bool = False
    # Lateness (s) of challenges served late, as reported by whoever owns their real deadline
    # (the consumer of the accelerator; in evaluation the scenario's ground truth). Each report
    # belongs to the policy's latest wake; it teaches the calibration what that challenge allowed.
    late_reports: tuple[float, ...] = ()
    # Time (s) each challenge served *on time* by the policy's latest wake allowed from its onset
    # to its real deadline, as reported by its consumer (in evaluation the scenario's ground
    # truth). One that allowed less than the deadline the wake counted on teaches the calibration
    # as a late one does, before any miss. In the daemon both come from MQTT commands (`late`, `served`).
    served_reports: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class DemandStatus:
    """Per-demand validation state (pending -> validated / expired, as EcuM wake validation)."""

    active: bool = False
    pending_since: float | None = None
    last_true: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    target: AccelState
    reason: str
    changed: bool
    active_demands: tuple[str, ...] = ()
    stale_signals: tuple[str, ...] = ()
    validations: tuple[tuple[str, str], ...] = ()  # (demand, "validated" | "expired")
    wake: bool = False  # this decision starts a wake cycle
    denied: str | None = None  # a guard or cap that kept a demand from waking
