"""PNG of a day (`cerebellumd evaluate --day ... --plot`): the 12 V budget of each policy over
the day, the parked periods shaded, garage leases marked, and the accelerator's power."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt


def plot_day(result: Mapping[str, Any], path: str | Path) -> Path:
    out = Path(path)
    scenario = result["_scenario"]
    runs = result["_runs"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 7), sharex=True, height_ratios=[3, 2])
    for ax in (top, bottom):
        for k in scenario.model.key_off:
            ax.axvspan(k.at_s / 3600, (k.at_s + k.duration_s) / 3600, color="0.92", lw=0)
        for h in scenario.model.holds:
            ax.axvspan(h.at_s / 3600, (h.at_s + h.duration_s) / 3600, color="tab:olive", alpha=0.3, lw=0)
    for run in runs:
        curve = run.path.budget_curve if run.path is not None else []
        if curve:
            top.plot([t / 3600 for t, _ in curve], [wh for _, wh in curve], lw=1.2, label=run.name)
        xs: list[float] = []
        ps: list[float] = []
        model = run.accelerator.model
        for a, b, state in run.accelerator.segments:
            power = model.power_w.get(state, model.power_w[max(model.power_w, key=lambda s: model.power_w[s])])
            xs += [a / 3600, b / 3600]
            ps += [power, power]
        bottom.plot(xs, ps, lw=0.8, label=run.name)
    top.set_ylabel("12 V budget Wh")
    top.set_title(f"day {result['day']}: budget per policy (grey: parked, olive: garage leases)")
    top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("accelerator W")
    bottom.set_xlabel("hour of day")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out


__all__ = ["plot_day"]
