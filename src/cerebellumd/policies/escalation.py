"""Wake watchdog: an escalation ladder for a wake that does not reach `active` in time.

A wake command has a deadline. If the accelerator is not read back `active` by then, the
ladder climbs one rung at a time — retry, driver unbind/bind, PCI remove/rescan, power-rail
cycle — each rung with its own deadline, and finally gives up: an alarm, and the accelerator
is left in the backend's safe state. Which rungs apply, and how long each may take, depends on
the backend (docs/accelerators.md): e.g. a Coral has no runtime PM and needs long timeouts; a
Jetson is never PCI-rescanned; a plain GPIO rail has nothing to rebind.

Pure: `Ladder.step(state, observed, now) -> (state, action | None)`; the shell performs the
action (time-limited, via the drivers) and keeps feeding the read-back state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType

from ..accel import AccelState


class Rung(StrEnum):
    RETRY = "retry"  # send the wake command again
    REBIND = "rebind"  # driver unbind + bind (sysfs)
    PCI_RESCAN = "pci_rescan"  # PCI remove + bus rescan
    RAIL_CYCLE = "rail_cycle"  # cut the power rail, wait, restore
    GIVE_UP = "give_up"  # alarm; leave the accelerator in the safe state


#: Order of severity. A ladder's rungs must follow it (a retry after a rail cycle is useless).
SEVERITY: tuple[Rung, ...] = (Rung.RETRY, Rung.REBIND, Rung.PCI_RESCAN, Rung.RAIL_CYCLE)


class Phase(StrEnum):
    IDLE = "idle"  # no wake under watch
    WATCHING = "watching"  # the wake (or the last rung) runs; its deadline not yet passed
    SUCCEEDED = "succeeded"
    GAVE_UP = "gave_up"


@dataclass(frozen=True, slots=True)
class RungSpec:
    rung: Rung
    timeout_s: float  # how long after this rung's action `active` must be read back


@dataclass(frozen=True, slots=True)
class LadderSpec:
    """One backend's ladder: the first wake's deadline, the rungs in order, the safe state."""

    backend: str
    wake_timeout_s: float
    rungs: tuple[RungSpec, ...]
    safe_state: AccelState = AccelState.OFF

    def __post_init__(self) -> None:
        if any(r.rung is Rung.GIVE_UP for r in self.rungs):
            raise ValueError("give_up is implicit after the last rung")
        ranks = [SEVERITY.index(r.rung) for r in self.rungs]
        if ranks != sorted(ranks):
            raise ValueError(f"{self.backend}: rungs must escalate ({', '.join(SEVERITY)})")
        if self.wake_timeout_s <= 0 or any(r.timeout_s <= 0 for r in self.rungs):
            raise ValueError(f"{self.backend}: timeouts must be positive")


@dataclass(frozen=True, slots=True)
class Action:
    rung: Rung
    attempt: int  # 1-based position on the ladder (the wake itself is 0)
    reason: str  # what timed out, e.g. "wake timed out after 5.0 s"
    deadline: float | None  # when the next rung follows (None for give_up)
    safe_state: AccelState | None = None  # give_up: where to leave the accelerator


@dataclass(frozen=True, slots=True)
class LadderState:
    phase: Phase = Phase.IDLE
    rung_index: int = -1  # -1: the wake command itself; i: spec.rungs[i]
    started_at: float | None = None
    deadline: float | None = None
    # Counters that outlive each wake, for export: actions taken per rung, and outcomes.
    counts: tuple[tuple[str, int], ...] = ()

    def count(self, key: str) -> int:
        return dict(self.counts).get(key, 0)


def _bump(counts: tuple[tuple[str, int], ...], key: str) -> tuple[tuple[str, int], ...]:
    d = dict(counts)
    d[key] = d.get(key, 0) + 1
    return tuple(sorted(d.items()))


class Ladder:
    def __init__(self, spec: LadderSpec) -> None:
        self.spec = spec

    def begin(self, state: LadderState, now: float, expected_s: float = 0.0) -> LadderState:
        """A wake was commanded: watch it. A wake already under watch keeps its progress
        (a second wake command must not reset the ladder to the bottom). `expected_s`: the
        power model's exit latency from where the wake starts; the wake's deadline is that plus
        `wake_timeout_s`, so a cold start (25 s from `off` on an Orin) is not a failure."""
        if state.phase is Phase.WATCHING:
            return state
        return replace(
            state, phase=Phase.WATCHING, rung_index=-1, started_at=now,
            deadline=now + max(0.0, expected_s) + self.spec.wake_timeout_s,
        )

    def cancel(self, state: LadderState) -> LadderState:
        """The policy no longer wants the accelerator awake: stop watching (not a failure)."""
        if state.phase is not Phase.WATCHING:
            return state
        return replace(state, phase=Phase.IDLE, deadline=None, counts=_bump(state.counts, "cancelled"))

    def step(
        self, state: LadderState, observed: AccelState, now: float
    ) -> tuple[LadderState, Action | None]:
        if state.phase is not Phase.WATCHING:
            return state, None
        if observed is AccelState.ACTIVE:
            key = "succeeded" if state.rung_index < 0 else f"recovered_by:{self._rung(state).value}"
            return replace(
                state, phase=Phase.SUCCEEDED, deadline=None, counts=_bump(state.counts, key)
            ), None
        if state.deadline is None or now < state.deadline:
            return state, None
        failed = "wake" if state.rung_index < 0 else self._rung(state).value
        took = (now - state.started_at) if state.started_at is not None else 0.0
        reason = f"{failed} timed out ({observed.value} after {took:.1f} s)"
        nxt = state.rung_index + 1
        if nxt >= len(self.spec.rungs):
            counts = _bump(state.counts, Rung.GIVE_UP.value)
            action = Action(Rung.GIVE_UP, nxt + 1, reason, None, self.spec.safe_state)
            return replace(state, phase=Phase.GAVE_UP, rung_index=nxt, deadline=None,
                           counts=counts), action
        rung = self.spec.rungs[nxt]
        deadline = now + rung.timeout_s
        action = Action(rung.rung, nxt + 1, reason, deadline)
        return replace(
            state, rung_index=nxt, deadline=deadline, counts=_bump(state.counts, rung.rung.value)
        ), action

    def next_deadline(self, state: LadderState) -> float | None:
        return state.deadline if state.phase is Phase.WATCHING else None

    def _rung(self, state: LadderState) -> Rung:
        return self.spec.rungs[state.rung_index].rung


# -- per-backend defaults (docs/accelerators.md explains each) ----------------------------------


def _ladder(backend: str, wake_s: float, safe: AccelState, *rungs: tuple[Rung, float]) -> LadderSpec:
    return LadderSpec(backend, wake_s, tuple(RungSpec(r, t) for r, t in rungs), safe)


DEFAULT_LADDERS: Mapping[str, LadderSpec] = MappingProxyType({
    # D3hot -> D0 on open takes well under a second; firmware-control timeouts after boot are
    # known to need a reboot, so a rail cycle (if wired) is the last useful rung.
    "hailo_pcie": _ladder(
        "hailo_pcie", 3.0, AccelState.SLEEP,
        (Rung.RETRY, 3.0), (Rung.REBIND, 10.0), (Rung.PCI_RESCAN, 15.0), (Rung.RAIL_CYCLE, 30.0),
    ),
    # No runtime PM: open resets the chip, and resets of 12 s have been seen: long timeouts.
    "coral_pcie": _ladder(
        "coral_pcie", 15.0, AccelState.OFF,
        (Rung.RETRY, 15.0), (Rung.REBIND, 20.0), (Rung.PCI_RESCAN, 20.0), (Rung.RAIL_CYCLE, 30.0),
    ),
    # A Jetson module is its own computer (Ethernet, not a PCIe endpoint of the gateway):
    # wake from SC7 by its wake pin; a rail cycle means a full boot (~90 s with nvpmodel).
    "jetson": _ladder(
        "jetson", 5.0, AccelState.OFF,
        (Rung.RETRY, 5.0), (Rung.RAIL_CYCLE, 120.0),
    ),
    # Any PCIe device with runtime PM (power/control = auto/on); no rail unless one is wired.
    "pcie_runtime_pm": _ladder(
        "pcie_runtime_pm", 2.0, AccelState.IDLE,
        (Rung.RETRY, 2.0), (Rung.REBIND, 10.0), (Rung.PCI_RESCAN, 15.0),
    ),
    # An enable line: nothing to rebind; re-assert, then cycle the rail.
    "gpio_rail": _ladder(
        "gpio_rail", 5.0, AccelState.OFF,
        (Rung.RETRY, 5.0), (Rung.RAIL_CYCLE, 15.0),
    ),
    # The simulated accelerator (demo, tests, evaluator).
    "simulated": _ladder("simulated", 2.0, AccelState.IDLE, (Rung.RETRY, 2.0)),
})
