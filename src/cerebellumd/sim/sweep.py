"""Parameter sweeps: evaluate a grid of policy parameters over scenarios and seeds in
parallel, print the Pareto front (accelerator energy vs readiness), write every row.

Sweep file (TOML):

    policy = "path/to/base.toml"   # optional; default the shipped demo config
    scenarios = ["udds", "hwfet:surprise_heavy"]
    events = ["tight", "my_world.toml"]  # optional: shipped names or event files; crossed
                                         # with every scenario (which then names no variant)
    seeds = [1, 2, 3]
    state = "car.json"             # optional: every run starts from what a daemon learned
                                   # (its state file; as `evaluate --state`)
    [grid]                         # keys of the [policy] section, each a list of values
    release_ms = [2000, 4000]
    latency_budget_ms = [1000, 1500]
"""

from __future__ import annotations

import csv
import itertools
import json
import tomllib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..config import PolicyConfig, builtin_example, parse_config, policy_params
from .cycles import load_cycle
from .evaluate import evaluate
from .events import EventModel, build_scenario, named_scenario
from .events_config import NAMED_MODELS, resolve_events
from .learning_state import Learning, learning_from_sections, read_sections


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str | None = Field(None, description="Base config file; default: the shipped demo.")
    scenarios: list[str] = Field(["udds"], description="CYCLE[:VARIANT] names or cycle CSV paths.")
    events: list[str] = Field(
        default_factory=list,
        description="Event models (shipped names or event-file paths, relative to the sweep file) crossed "
        "with every scenario; empty: each scenario's own variant.",
    )
    seeds: list[int] = Field([1], description="Seeds to evaluate every point on.")
    state: str | None = Field(
        None, description="A daemon's state file (relative to the sweep file): every run's configured policy starts "
        "from the calibration and learned table in it, as `evaluate --state`; default: nothing learned.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="[policy] key -> values.")


def load_sweep(path: str | Path) -> SweepSpec:
    p = Path(path)
    spec = SweepSpec.model_validate(tomllib.loads(p.read_text(encoding="utf-8")))
    unknown = sorted(set(spec.grid) - set(PolicyConfig.model_fields))
    if unknown:
        raise ValueError(f"{p}: [grid] keys are not [policy] keys: {', '.join(unknown)}")
    if spec.policy is not None and not Path(spec.policy).is_absolute():
        spec = spec.model_copy(update={"policy": str(p.parent / spec.policy)})
    events = [e if e in NAMED_MODELS or Path(e).is_absolute() else str(p.parent / e) for e in spec.events]
    spec = spec.model_copy(update={"events": events})
    if spec.state is not None:
        state = spec.state if Path(spec.state).is_absolute() else str(p.parent / spec.state)
        spec = spec.model_copy(update={"state": state})
        base = parse_config(base_text(spec))
        learning_from_sections(read_sections(state), policy_params(base), state)  # fail before fanning out
    check_events(spec)
    return spec


def base_text(spec: SweepSpec) -> str:
    """The text of the sweep's base config: its `policy` file, or the shipped demo."""
    return Path(spec.policy).read_text(encoding="utf-8") if spec.policy else builtin_example()


def check_events(spec: SweepSpec) -> None:
    """With `events`, scenarios name cycles only; every event model must load."""
    if not spec.events:
        return
    with_variant = [s for s in spec.scenarios if ":" in s]
    if with_variant:
        raise ValueError(f"scenarios name a variant and `events` is set: {', '.join(with_variant)}")
    for e in spec.events:
        resolve_events(e)


def worlds(spec: SweepSpec) -> list[tuple[str, str, str, EventModel]]:
    """(scenario label, cycle, event model name, event model) for every scenario x event model."""
    if not spec.events:
        out = []
        for s in spec.scenarios:
            cycle, variant = split_scenario(s)
            out.append((s, cycle, variant, named_scenario(variant)))
        return out
    models = [resolve_events(e) for e in spec.events]
    return [(f"{cycle}:{name}", cycle, name, model) for cycle in spec.scenarios for name, model in models]


def split_scenario(name: str) -> tuple[str, str]:
    cycle, _, variant = name.partition(":")
    return cycle, variant or "default"


def points(spec: SweepSpec) -> list[dict[str, Any]]:
    keys = sorted(spec.grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(spec.grid[k] for k in keys))]


def run_one(
    base_text: str,
    params: dict[str, Any],
    scenario: str,
    seed: int,
    world: tuple[str, str, EventModel] | None = None,
    state: tuple[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One grid point on one scenario and seed (runs in a worker process). `world` is
    (cycle, event model name, event model); default: parsed from `scenario`. `state`: (file,
    its sections as `read_sections` gives them) to start the configured policy from."""
    config = parse_config(base_text)
    config = config.model_copy(update={"policy": config.policy.model_copy(update=params)})
    if world is None:
        cycle, variant = split_scenario(scenario)
        world = (cycle, variant, named_scenario(variant))
    cycle, variant, model = world
    sc = build_scenario(load_cycle(cycle), seed, model, name=variant)
    learning = learning_from_sections(state[1], policy_params(config), state[0]) if state else Learning()
    return result_row(params, scenario, seed, evaluate(config, sc, **learning.as_kwargs()))


def result_row(params: dict[str, Any], scenario: str, seed: int, result: dict[str, Any]) -> dict[str, Any]:
    """One sweep row from one evaluation's JSON (also used for recorded drives, sim/recorded.py)."""
    mine = result["results"][0]
    oracle = result["results"][-1]
    return {
        **params,
        "scenario": scenario,
        "seed": seed,
        "accelerator_energy_j": mine["accelerator_energy_j"],
        "readiness": mine["readiness"],
        "wake_cycles": mine["wake_cycles"],
        "false_wakes": mine["false_wakes"],
        "oracle_energy_j": oracle["accelerator_energy_j"],
        "timeout_readiness": result["results"][2]["readiness"],
        "timeout_energy_j": result["results"][2]["accelerator_energy_j"],
        "dominated_by": " ".join(result.get("dominated_by", [])),
        "learned_budget_s": result["calibration"]["budget_s"],
        "readiness_after_adaptation": result["calibration"]["readiness_after_adaptation"],
    }


def aggregate(rows: Iterable[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Mean energy and minimum readiness per grid point over scenarios and seeds."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, group in groups.items():
        out.append(
            {
                **dict(zip(keys, key, strict=True)),
                "accelerator_energy_j": sum(r["accelerator_energy_j"] for r in group) / len(group),
                "readiness": min(r["readiness"] for r in group),
                "runs": len(group),
            }
        )
    return out


def per_world(rows: Iterable[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Per grid point and scenario (cycle x event model): mean and worst readiness, mean energy
    and its ratio to the oracle, runs dominated by a causal baseline."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((*(row[k] for k in keys), row["scenario"]), []).append(row)
    out = []
    for key, group in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        n = len(group)
        out.append(
            {
                **dict(zip([*keys, "scenario"], key, strict=True)),
                "readiness_mean": sum(r["readiness"] for r in group) / n,
                "readiness_min": min(r["readiness"] for r in group),
                "accelerator_energy_j": sum(r["accelerator_energy_j"] for r in group) / n,
                "vs_oracle": sum(r["accelerator_energy_j"] / max(r["oracle_energy_j"], 1e-9) for r in group) / n,
                "dominated_runs": sum(1 for r in group if r.get("dominated_by")),
                "runs": n,
            }
        )
    return out


def pareto(points_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both energy (lower) and readiness (higher)."""
    front = []
    for p in points_:
        dominated = any(
            q["accelerator_energy_j"] <= p["accelerator_energy_j"]
            and q["readiness"] >= p["readiness"]
            and (q["accelerator_energy_j"], q["readiness"]) != (p["accelerator_energy_j"], p["readiness"])
            for q in points_
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["accelerator_energy_j"])


def run_sweep(
    spec: SweepSpec,
    workers: int = 1,
    dask_address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    base = base_text(spec)
    parse_config(base)  # fail before fanning out
    # Read here, shipped to the workers (a dask worker may not see this file system).
    state = (spec.state, read_sections(spec.state)) if spec.state else None
    jobs = [
        (base, p, label, seed, (cycle, name, model), state)
        for p in points(spec)
        for label, cycle, name, model in worlds(spec)
        for seed in spec.seeds
    ]
    rows: list[dict[str, Any]] = []
    if dask_address is not None:
        from dask.distributed import Client
        from dask.distributed import as_completed as dask_completed

        with Client(dask_address) as client:  # type: ignore[no-untyped-call]
            futures = [client.submit(run_one, *job, pure=False) for job in jobs]
            for fut in dask_completed(futures):  # type: ignore[no-untyped-call]
                rows.append(fut.result())
                if progress:
                    progress(len(rows), len(jobs))
    elif workers <= 1:
        for job in jobs:
            rows.append(run_one(*job))
            if progress:
                progress(len(rows), len(jobs))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending: list[Future[dict[str, Any]]] = [pool.submit(run_one, *job) for job in jobs]
            for fut in as_completed(pending):
                rows.append(fut.result())
                if progress:
                    progress(len(rows), len(jobs))
    keys = sorted(spec.grid)
    rows.sort(key=lambda r: (*(r[k] for k in keys), r["scenario"], r["seed"]))
    return rows


def write_rows(rows: list[dict[str, Any]], prefix: str | Path) -> tuple[Path, Path]:
    csv_path, json_path = Path(f"{prefix}.csv"), Path(f"{prefix}.json")
    fields = list(rows[0]) if rows else []
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return csv_path, json_path
