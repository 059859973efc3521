"""The table "every shipped cycle x event file" of docs/PERFORMANCE.md: the configured policy
(the demo config, or --policy) on every cycle, world and seed, as a first drive (cold) and as a
car that has driven before (warm: it starts from what `--teach` earlier drives of the same cycle
and world taught it, seeds S+1000, S+2000, ..., chained through the persisted form, as
`cerebellumd evaluate --save-state` / `--state` do). Teaching seeds never overlap the reported
ones.

Per cell: readiness mean / min over the seeds (cold and warm), warm readiness after adaptation,
accelerator energy / the oracle's (sums over the seeds), warm energy against cold, the runs with
a non-empty `dominated_by` (cold / warm), and `timeout`'s readiness for reference.

    python scripts/worlds_table.py [--worlds default tight ...] [--cycles udds ...] [--seeds 1-30]
        [--teach N] [--workers N] [--policy FILE] [--json FILE]

Needs the [sim] extra. One cell of it by hand:

    cerebellumd evaluate --scenario udds --events tight --seed 1001 --save-state car.json
    cerebellumd evaluate --scenario udds --events tight --seed 1 --state car.json --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

WORLDS = ("default", "tight", "surprise_heavy", "no_precursors")
CYCLES = ("udds", "hwfet", "us06", "wltc_class3b", "nedc")


def seeds(text: str) -> list[int]:
    """'1-30' or '1,5,9'."""
    if "-" in text:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",")]


def figures(result: dict[str, Any]) -> dict[str, Any]:
    by = {r["policy"]: r for r in result["results"]}
    mine = result["results"][0]
    return {"readiness": mine["readiness"], "energy_j": mine["accelerator_energy_j"],
            "oracle_j": by["oracle"]["accelerator_energy_j"], "dominated_by": result.get("dominated_by", []),
            "after_adaptation": result["calibration"]["readiness_after_adaptation"],
            "timeout_readiness": by["timeout"]["readiness"]}


def one_cell(job: tuple[str | None, str, str, int, int]) -> dict[str, Any]:
    policy, world, cycle, seed, teach = job
    from cerebellumd.config import builtin_example, load_config, parse_config, policy_params
    from cerebellumd.config.state_file import CALIBRATION_SECTION
    from cerebellumd.sim.cycles import load_cycle
    from cerebellumd.sim.evaluate import run_evaluation
    from cerebellumd.sim.events import build_scenario
    from cerebellumd.sim.events_config import resolve_events
    from cerebellumd.sim.learning_state import learning_from_sections, learning_sections

    config = load_config(policy) if policy else parse_config(builtin_example(), "demo.toml")
    params = policy_params(config)
    name, model = resolve_events(world)
    cyc = load_cycle(cycle)
    sections: dict[str, Any] = {}
    for k in range(1, teach + 1):  # the earlier drives, oldest first, each from what the one before left
        learning = learning_from_sections(sections, params, "<chained drives>")
        teaching = run_evaluation(config, build_scenario(cyc, seed + 1000 * k, model, name=name),
                                  causal_baselines=False, **learning.as_kwargs())
        final = teaching.runs[0].final_state
        assert final is not None
        sections = learning_sections(params, final, teaching.result["duration_s"])
    cold = figures(run_evaluation(config, build_scenario(cyc, seed, model, name=name)).result)
    learning = learning_from_sections(sections, params, "<chained drives>")
    warm = figures(run_evaluation(config, build_scenario(cyc, seed, model, name=name), **learning.as_kwargs()).result)
    taught = sections.get(CALIBRATION_SECTION, {}).get("budget_s") is not None
    return {"world": world, "cycle": cycle, "seed": seed, "cold": cold, "warm": warm, "taught": taught}


def table(rows: list[dict[str, Any]]) -> str:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["world"], r["cycle"])].append(r)
    out = ["| world | cycle | cold readiness mean / min | warm readiness mean / min | warm after adapt. mean / min "
           "| cold J ÷ oracle | warm J ÷ oracle | warm E vs cold | dominated cold / warm | taught | "
           "timeout readiness mean / min |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (world, cycle), rs in cells.items():
        def stat(side: str, key: str, rs: list[dict[str, Any]] = rs) -> str:
            values = [r[side][key] for r in rs]
            return f"{statistics.mean(values):.3f} / {min(values):.3f}"

        oracle = sum(r["cold"]["oracle_j"] for r in rs)
        cold_j = sum(r["cold"]["energy_j"] for r in rs)
        warm_j = sum(r["warm"]["energy_j"] for r in rs)
        dom = f"{sum(bool(r['cold']['dominated_by']) for r in rs)} / {sum(bool(r['warm']['dominated_by']) for r in rs)}"
        out.append(f"| {world} | {cycle} | {stat('cold', 'readiness')} | {stat('warm', 'readiness')} | "
                   f"{stat('warm', 'after_adaptation')} | {cold_j / oracle:.2f} | {warm_j / oracle:.2f} | "
                   f"{100 * (warm_j / cold_j - 1):+.1f} % | {dom} | {sum(r['taught'] for r in rs)}/{len(rs)} | "
                   f"{stat('cold', 'timeout_readiness')} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", nargs="+", default=list(WORLDS), help="shipped event files or paths")
    p.add_argument("--cycles", nargs="+", default=list(CYCLES))
    p.add_argument("--seeds", type=seeds, default=seeds("1-30"), help="reported seeds: 1-30 or 1,5,9")
    p.add_argument("--teach", type=int, default=1, help="earlier drives a warm car has made (0: warm = cold)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--policy", help="config file (default: the shipped demo)")
    p.add_argument("--json", metavar="FILE", help="also write every run's figures")
    a = p.parse_args(argv)
    jobs = [(a.policy, w, c, s, a.teach) for w in a.worlds for c in a.cycles for s in a.seeds]
    with ProcessPoolExecutor(max(1, a.workers)) as pool:
        rows = list(pool.map(one_cell, jobs, chunksize=4))
    print(table(rows))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
