"""Small builders for policy tests."""

from __future__ import annotations

from cerebellumd.accel import AcceleratorModel, AccelState, Transition
from cerebellumd.policies.expr import compile_expression
from cerebellumd.policies.types import DemandClass, DemandSpec, OnStale, PolicyParams, Sample, SignalSpec

SIGNALS = ("crit", "norm", "ant", "battery")


def model() -> AcceleratorModel:
    return AcceleratorModel(
        name="test",
        power_w={AccelState.OFF: 0.0, AccelState.SLEEP: 1.0, AccelState.IDLE: 5.0, AccelState.ACTIVE: 15.0},
        enter={AccelState.IDLE: Transition(0.02, 0.2), AccelState.SLEEP: Transition(1.5, 9.0),
               AccelState.OFF: Transition(5.0, 30.0)},
        exit={AccelState.IDLE: Transition(0.05, 0.5), AccelState.SLEEP: Transition(1.0, 8.0),
              AccelState.OFF: Transition(25.0, 175.0)},
    )


def params(**overrides: object) -> PolicyParams:
    names = frozenset(SIGNALS)
    base: dict[str, object] = dict(
        signals=(
            SignalSpec("crit", 0.5, OnStale.WAKE),
            SignalSpec("norm", 0.5, OnStale.IGNORE),
            SignalSpec("ant", 0.5, OnStale.IGNORE),
            SignalSpec("battery", 2.0, OnStale.IGNORE),
        ),
        demands=(
            DemandSpec("collision", compile_expression("crit == 1", names), DemandClass.CRITICAL, 0.0, 1.5),
            DemandSpec("perception", compile_expression("norm == 1", names), DemandClass.NORMAL, 0.2, 1.0),
            DemandSpec("precursor", compile_expression("ant == 1", names), DemandClass.ANTICIPATORY, 0.0, 0.3),
        ),
        release_s=2.0,
        min_dwell_s=0.5,
        max_wake_cycles_per_hour=60,
        latency_budget_s=1.5,
    )
    base.update(overrides)
    return PolicyParams(**base)  # type: ignore[arg-type]


def samples(t: float, **values: float) -> dict[str, Sample]:
    full = {"crit": 0.0, "norm": 0.0, "ant": 0.0, "battery": 13.5}
    full.update(values)
    return {k: Sample(v, t) for k, v in full.items()}
