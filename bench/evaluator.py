"""Evaluator speed: simulated seconds per wall second, per policy, on UDDS at a 10 ms tick.

    python bench/evaluator.py [--json] [--seed N] [--quick]

The shared precomputation (vehicle traces, change points) is reported separately: it is paid
once per scenario whatever the number of policies.
"""

from __future__ import annotations

import argparse
import json
import time

from cerebellumd.accel import AccelState
from cerebellumd.config import builtin_example, parse_config, policy_params
from cerebellumd.policies.baselines import AlwaysOn, Timeout
from cerebellumd.policies.cerebellum import CerebellumFirst
from cerebellumd.profiles import load_profile
from cerebellumd.sim import evaluate as ev
from cerebellumd.sim.cycles import load_cycle
from cerebellumd.sim.events import build_scenario
from cerebellumd.sim.vehicle import VirtualVehicle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    # Accepted for a uniform CI smoke command line (tests/test_bench_smoke.py): one UDDS pass
    # already takes only a few seconds, so quick changes nothing.
    parser.add_argument("--quick", action="store_true", help="CI smoke (same run: it is short)")
    args = parser.parse_args()
    config = parse_config(builtin_example())
    params = policy_params(config)
    model = load_profile(config.accelerator.profile)
    scenario = build_scenario(load_cycle("udds"), args.seed)
    t0 = time.perf_counter()
    timeline = ev._Timeline(config, params, VirtualVehicle(scenario), 0.01)
    setup_s = time.perf_counter() - t0
    core = CerebellumFirst(params, model)
    timeout = Timeout(params, model, config.policy.timeout_idle_s, AccelState(config.policy.timeout_state))

    def timer(state: ev.PolicyState, now: float) -> float | None:
        return ev.policy_timer(core, state, now)

    def timeout_timer(state: ev.PolicyState, now: float) -> float | None:
        end = state.last_demand_end
        return ev.policy_timer(core, state, now, [end + timeout.idle_timeout_s] if end is not None else [])

    out: dict[str, object] = {
        "cycle": "udds",
        "duration_s": scenario.duration_s,
        "tick_ms": 10,
        "setup_s": round(setup_s, 3),
        "policies": {},
    }
    policies = out["policies"]
    assert isinstance(policies, dict)
    for policy, tmr in ((core, timer), (AlwaysOn(params, model), timer), (timeout, timeout_timer)):
        t0 = time.perf_counter()
        run = ev._run_policy(policy, tmr, timeline, model, AccelState.IDLE, True)
        wall = time.perf_counter() - t0
        policies[policy.name] = {
            "wall_s": round(wall, 4),
            "steps": run.steps,
            "speedup": round(scenario.duration_s / wall),
        }
    t0 = time.perf_counter()
    ev._run_oracle(scenario, model, AccelState.IDLE, scenario.duration_s)
    wall = time.perf_counter() - t0
    policies["oracle"] = {"wall_s": round(wall, 4), "steps": 0, "speedup": round(scenario.duration_s / wall)}
    t0 = time.perf_counter()
    full = ev.evaluate(config, scenario)
    out["evaluate_all_s"] = round(time.perf_counter() - t0, 3)
    n_all = len(full["results"]) + len(full.get("causal_baselines", []))
    t0 = time.perf_counter()
    ev.evaluate(config, scenario, causal_baselines=False)
    out["evaluate_contract_s"] = round(time.perf_counter() - t0, 3)
    # The figure: simulated seconds per wall second per policy, setup included.
    out["per_policy_speedup_all"] = round(scenario.duration_s * n_all / out["evaluate_all_s"])
    out["per_policy_speedup_contract"] = round(scenario.duration_s * 4 / out["evaluate_contract_s"])
    out["policies_all"] = n_all
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"UDDS {scenario.duration_s:.0f} s, shared setup {setup_s:.3f} s, "
        f"evaluate: 4 contract policies {out['evaluate_contract_s']} s "
        f"({out['per_policy_speedup_contract']}x real time per policy), "
        f"with causal baselines ({n_all} policies) {out['evaluate_all_s']} s "
        f"({out['per_policy_speedup_all']}x real time per policy)"
    )
    for name, row in policies.items():
        print(f"  {name:18s} {row['wall_s']:8.4f} s  {row['steps']:6d} steps  {row['speedup']:>9}x real time")


if __name__ == "__main__":
    main()
