"""PNG of one evaluation: speed, events by kind, accelerator state and power per policy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt

from ..accel import AccelState
from .evaluate import PolicyRun
from .events import EventKind, Scenario

_KIND_COLOURS = {
    EventKind.HIGHWAY: "tab:blue",
    EventKind.URBAN: "tab:orange",
    EventKind.PARKING: "tab:green",
    EventKind.SURPRISE: "tab:red",
}
_LEVEL = {
    AccelState.OFF: 0,
    AccelState.SLEEP: 1,
    AccelState.IDLE: 2,
    AccelState.WAKING: 2.5,
    AccelState.SUSPENDING: 2.5,
    AccelState.ACTIVE: 3,
}


def plot(runs: Sequence[PolicyRun], scenario: Scenario, path: str | Path) -> Path:
    """Draw the scenario and each policy's accelerator timeline to `path` (PNG)."""
    out = Path(path)
    fig, axes = plt.subplots(3, 1, figsize=(14, 8), sharex=True, height_ratios=[2, 2, 2])
    t0 = scenario.cycle.times[0]
    ax = axes[0]
    ax.plot([t - t0 for t in scenario.cycle.times], scenario.cycle.speeds, color="black", lw=0.8)
    ax.set_ylabel("speed km/h")
    top = max(scenario.cycle.speeds) * 1.05 + 1
    for kind, colour in _KIND_COLOURS.items():
        spans = [(e.start_s - t0, e.end_s - e.start_s) for e in scenario.events if e.kind is kind]
        if spans:
            ax.broken_barh(spans, (top, top * 0.08), color=colour, label=kind.value)
    ax.legend(loc="upper right", fontsize=8, ncols=4)
    ax.set_title(f"{scenario.cycle.name}:{scenario.name} seed {scenario.seed}")

    for i, run in enumerate(runs):
        xs, ys, ps = [], [], []
        model = run.accelerator.model
        for a, b, state in run.accelerator.segments:
            level = _LEVEL.get(state, 0) + 0.05 * i
            xs += [a, b]
            ys += [level, level]
            power = model.power_w.get(state)
            if power is None:  # a transition: its mean power
                power = _transition_power(run, a, b)
            ps += [power, power]
        axes[1].plot(xs, ys, lw=0.9, label=run.name)
        axes[2].plot(xs, ps, lw=0.8, label=run.name)
    axes[1].set_yticks([0, 1, 2, 3], ["off", "sleep", "idle", "active"])
    axes[1].set_ylabel("accelerator")
    axes[1].legend(loc="upper right", fontsize=8, ncols=4)
    axes[2].set_ylabel("power W")
    axes[2].set_xlabel("time s")
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out


def _transition_power(run: PolicyRun, a: float, b: float) -> float:
    """Mean power of the transition segment [a, b] (the model gives its energy and latency)."""
    model = run.accelerator.model
    span = b - a
    for table in (model.exit, model.enter):
        for cost in table.values():
            if abs(cost.latency_s - span) < 1e-6:
                return cost.mean_power_w
    return model.power_w[AccelState.ACTIVE]
