"""PNG of one evaluation: speed, events by kind, accelerator state and power per policy; with
the evaluation's JSON also the Pareto plane (accelerator energy vs readiness) of the
configured policy, the contract baselines and the causal ones (timeout sweep, warm_idle)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def plot(
    runs: Sequence[PolicyRun], scenario: Scenario, path: str | Path, result: Mapping[str, Any] | None = None
) -> Path:
    """Draw the scenario and each policy's accelerator timeline to `path` (PNG); with `result`
    (the evaluation JSON) the Pareto plane beside it."""
    out = Path(path)
    if result is not None and result.get("causal_baselines"):
        fig = plt.figure(figsize=(20, 8))
        grid = fig.add_gridspec(3, 2, width_ratios=[3, 1])
        first = fig.add_subplot(grid[0, 0])
        axes = [first, fig.add_subplot(grid[1, 0], sharex=first), fig.add_subplot(grid[2, 0], sharex=first)]
        plane(fig.add_subplot(grid[:, 1]), result)
    else:
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


def plane(ax: Any, result: Mapping[str, Any]) -> None:
    """Accelerator energy vs readiness: the timeout sweeps as lines (one per rest state), the
    other policies as labelled points; lower right is better."""
    rows = [*result["results"], *result.get("causal_baselines", [])]
    sweeps: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        name = r["policy"]
        if name.startswith("timeout_"):
            rest = name.rsplit("_", 1)[1]
            sweeps.setdefault(rest, []).append((r["accelerator_energy_j"], r["readiness"], name.split("_")[1]))
    for rest, pts in sorted(sweeps.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=0.8, label=f"timeout → {rest}")
        for e, r, label in pts:
            ax.annotate(label, (e, r), fontsize=6, xytext=(2, 2), textcoords="offset points")
    mine = result["results"][0]["policy"]
    for r in rows:
        if r["policy"].startswith("timeout_"):
            continue
        marker = "*" if r["policy"] == mine else "o"
        ax.scatter([r["accelerator_energy_j"]], [r["readiness"]], marker=marker, s=120 if marker == "*" else 30,
                   label=r["policy"], zorder=3)
    ax.set_xlabel("accelerator energy J")
    ax.set_ylabel("readiness")
    dominated = result.get("dominated_by") or []
    ax.set_title(f"dominated by: {', '.join(dominated) if dominated else 'none'}", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)


def _transition_power(run: PolicyRun, a: float, b: float) -> float:
    """Mean power of the transition segment [a, b] (the model gives its energy and latency)."""
    model = run.accelerator.model
    span = b - a
    for table in (model.exit, model.enter):
        for cost in table.values():
            if abs(cost.latency_s - span) < 1e-6:
                return cost.mean_power_w
    return model.power_w[AccelState.ACTIVE]
