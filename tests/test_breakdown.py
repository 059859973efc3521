"""`evaluate --breakdown` (sim/breakdown.py): the accelerator's energy split by the reason behind
each target, on hand-made logs, on random ones (hypothesis), and on real evaluations: the
shares add up to the energy the evaluator reports, and the reasons are the policy's."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cerebellumd.accel import AccelState
from cerebellumd.cli import main
from cerebellumd.config import builtin_example, parse_config
from cerebellumd.sim.breakdown import Share, breakdown, by_reason
from cerebellumd.sim.cycles import load_cycle
from cerebellumd.sim.evaluate import results_by_policy, run_evaluation
from cerebellumd.sim.events import build_scenario

from .test_days import SMALL
from .test_decision_path import SCHEDULE, _config, _scenario
from .test_recorded import CORPUS

pytestmark = pytest.mark.timeout(120)
ACT, IDL, SLP, WAK = AccelState.ACTIVE, AccelState.IDLE, AccelState.SLEEP, AccelState.WAKING


def test_spans_are_split_pro_rata_where_the_reason_changes() -> None:
    charges = [(0.0, 10.0, ACT, 150.0),   # 2 s before the first decision, then demand until 10
               (10.0, 10.0, WAK, 8.0),    # an instant transition at 10: the reason in force then
               (10.0, 30.0, IDL, 100.0)]  # rest:idle from 10, rest:sleep's decision at 25 s
    reasons = [(2.0, "demand"), (10.0, "rest:idle"), (25.0, "rest:sleep")]
    shares = {(s.reason, s.state): s for s in breakdown(charges, reasons)}
    assert shares[("start", "active")] == Share("start", "active", 2.0, 30.0)
    assert shares[("demand", "active")] == Share("demand", "active", 8.0, 120.0)
    assert shares[("rest:idle", "waking")] == Share("rest:idle", "waking", 0.0, 8.0)
    assert shares[("rest:idle", "idle")] == Share("rest:idle", "idle", 15.0, 75.0)
    assert shares[("rest:sleep", "idle")] == Share("rest:sleep", "idle", 5.0, 25.0)
    assert len(shares) == 5
    assert by_reason(list(shares.values())) == {"start": 30.0, "demand": 120.0, "rest:idle": 83.0,
                                                 "rest:sleep": 25.0}
    assert [s.reason for s in breakdown(charges, [])] == ["start", "start", "start"]  # nothing decided


spans = st.lists(st.tuples(st.floats(0, 50), st.sampled_from([ACT, IDL, SLP, WAK]), st.floats(0, 100)), max_size=30)
changes = st.lists(st.tuples(st.floats(0.01, 20), st.sampled_from(["a", "b", "c"])), max_size=30)


@settings(max_examples=200, deadline=None)
@given(spans, changes)
def test_the_shares_keep_every_joule_and_every_second(raw: list[tuple[float, AccelState, float]],
                                                      steps: list[tuple[float, str]]) -> None:
    charges, t = [], 0.0
    for length, state, joules in raw:  # back to back, as the accelerator charges them
        charges.append((t, t + length, state, joules))
        t += length
    reasons, when = [], 0.0
    for gap, reason in steps:
        when += gap
        if not reasons or reasons[-1][1] != reason:
            reasons.append((when, reason))
    shares = breakdown(charges, reasons)
    assert sum(s.energy_j for s in shares) == pytest.approx(sum(c[3] for c in charges), abs=1e-6)
    assert sum(s.seconds for s in shares) == pytest.approx(t, abs=1e-6)
    per_state: dict[str, float] = defaultdict(float)
    for s in shares:
        per_state[s.state] += s.energy_j
    for state in {c[2] for c in charges}:
        assert per_state[state.value] == pytest.approx(sum(c[3] for c in charges if c[2] is state), abs=1e-6)


def test_an_evaluation_s_breakdown_adds_up_to_its_reported_energy() -> None:
    config = parse_config(builtin_example(), "demo.toml")
    ev = run_evaluation(config, build_scenario(load_cycle("udds"), 3), causal_baselines=False)
    reported = results_by_policy(ev.result)
    for run in ev.runs:
        shares = breakdown(run.accelerator.charges, run.reasons, "oracle" if run.name == "oracle" else "start")
        assert sum(s.energy_j for s in shares) == pytest.approx(reported[run.name]["accelerator_energy_j"], abs=0.01)
        assert sum(s.seconds for s in shares) == pytest.approx(ev.result["duration_s"], abs=0.01)
    mine = by_reason(breakdown(ev.runs[0].accelerator.charges, ev.runs[0].reasons))
    # the demo's reasons, as the daemon's decisions name them
    assert {"rest:sleep", "anticipate:standing", "demand:urban_perception", "release"} <= set(mine)
    assert all(joules >= 0 for joules in mine.values())
    oracle = next(r for r in ev.runs if r.name == "oracle")
    assert oracle.reasons == [] and {s.reason for s in breakdown(oracle.accelerator.charges, [], "oracle")} == {
        "oracle"}


def test_the_decision_path_s_clamp_is_named_where_it_overrides_the_policy() -> None:
    ev = run_evaluation(_config(), _scenario(SCHEDULE), causal_baselines=False)
    run = ev.runs[0]
    shares = breakdown(run.accelerator.charges, run.reasons)
    # parked after the key-off at 100 s: the accelerator is off because the path says so (the
    # policy's own minimum dwell may hold it there a moment longer once the clamp ends)
    off = [s for s in shares if s.state == "off"]
    clamped = sum(s.seconds for s in off if s.reason.startswith("path:") or s.reason == "paused")
    assert clamped > 60 and clamped >= 0.95 * sum(s.seconds for s in off), off


def test_evaluate_breakdown_json_and_table() -> None:
    base = [sys.executable, "-m", "cerebellumd", "evaluate", "--scenario", "us06", "--seed", "2", "--breakdown"]
    out = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=100, check=True)
    result = json.loads(out.stdout)
    energies = {r["policy"]: r["accelerator_energy_j"] for r in result["results"]}
    assert set(result["breakdown"]) == {"cerebellum_first", "oracle"}
    for name, rows in result["breakdown"].items():
        assert sum(row["energy_j"] for row in rows) == pytest.approx(energies[name], abs=0.05)
        assert set(rows[0]) == {"reason", "state", "seconds", "energy_j"}
    table = subprocess.run(base, capture_output=True, text=True, timeout=100, check=True,
                           env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"}).stdout
    assert "where cerebellum_first's" in table and "demand:highway_assist" in table
    plain = subprocess.run([*base[:-1], "--json"], capture_output=True, text=True, timeout=100, check=True)
    assert "breakdown" not in json.loads(plain.stdout)  # the contract's JSON without the flag


def test_a_recorded_drive_and_a_day_break_down_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log, dbc, cfg, labels = CORPUS["rav4_2019"].paths
    assert main(["evaluate", "--log", str(log), "--dbc", str(dbc), "--config", str(cfg), "--labels", str(labels),
                 "--json", "--breakdown"]) == 0
    recorded = json.loads(capsys.readouterr().out)
    energies = {r["policy"]: r["accelerator_energy_j"] for r in recorded["results"]}
    assert set(recorded["breakdown"]) == {next(iter(energies)), "oracle"}
    for name, rows in recorded["breakdown"].items():
        assert sum(row["energy_j"] for row in rows) == pytest.approx(energies[name], abs=0.05)

    day = tmp_path / "small.toml"
    day.write_text(SMALL)
    assert main(["evaluate", "--day", str(day), "--json", "--breakdown"]) == 0
    out = json.loads(capsys.readouterr().out)
    mine = out["results"][0]
    assert list(out["breakdown"]) == [mine["policy"]]  # a day has no oracle
    rows = out["breakdown"][mine["policy"]]
    assert sum(row["energy_j"] for row in rows) / 3600 == pytest.approx(mine["energy_wh"]["accelerator"], abs=2e-3)
    # parked with the key off: the decision path's clamp holds the accelerator off
    assert any(row["reason"].startswith("path:") and row["state"] == "off" and row["seconds"] > 0 for row in rows)
