"""`cerebellumd evaluate --state / --save-state`: a drive evaluated as a car that has driven
before (the calibration and learned table a daemon persists), drives chained through the
daemon's own state file, and a real daemon starting from a state learned by the evaluator."""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from cerebellumd.cli import main
from cerebellumd.config import builtin_example
from cerebellumd.config.state_file import Totals, read_totals, write_atomic
from tests.test_calibration_daemon import part, start

from .helpers import until

TIGHT = str(resources.files("cerebellumd").joinpath("examples", "events", "tight.toml"))


def evaluate(capsys: pytest.CaptureFixture[str], *extra: str, seed: int = 1) -> dict[str, Any]:
    assert main(["evaluate", "--scenario", "udds", "--events", TIGHT, "--seed", str(seed), "--json", *extra]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def readiness(result: dict[str, Any]) -> float:
    return float(result["results"][0]["readiness"])


def test_a_drive_starts_from_what_an_earlier_drive_learned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "car.json"
    first = evaluate(capsys, "--save-state", str(state), seed=1001)
    assert first["calibration"]["learned"], "the tight world teaches a first drive"
    saved = read_totals(state)
    assert saved is not None
    assert saved.sections["calibration"]["budget_s"] == pytest.approx(first["calibration"]["budget_s"], abs=1e-6)
    assert saved.sections["learned_anticipation"] is None  # learning is off in the demo config
    assert (saved.joules, saved.wakes, saved.sleeps) == ({}, 0, 0)  # a new file: the daemon counts from zero

    cold = evaluate(capsys)
    warm = evaluate(capsys, "--state", str(state))
    assert cold["calibration"]["adapted_at_s"] > 0  # the first drive learns on the way
    assert warm["calibration"]["adapted_at_s"] == 0.0  # a restored lesson holds from the start
    assert warm["calibration"]["events_after_adaptation"] == warm["events"]
    # This seed's first surprise finds a cold policy asleep; the restored budget has ruled sleep out.
    assert readiness(warm) > readiness(cold)
    assert warm["calibration"]["late_wakes"] == first["calibration"]["late_wakes"]  # and none more


def test_saving_into_a_daemons_state_file_keeps_its_totals_and_sections(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.json"
    daemon_wrote = Totals(joules={"accelerator": 1234.5}, wakes=7, sleeps=6, wakes_by_reason={"demand:collision": 7.0},
                          sections={"budget": {"used_wh": 3.0}, "calibration": {"budget_s": None}})
    write_atomic(state, daemon_wrote.to_json("gateway"))
    result = evaluate(capsys, "--state", str(state), "--save-state", str(state))
    kept = read_totals(state)
    assert kept is not None
    assert (kept.joules, kept.wakes, kept.sleeps, kept.wakes_by_reason) == (
        {"accelerator": 1234.5}, 7, 6, {"demand:collision": 7.0})
    assert kept.sections["budget"] == {"used_wh": 3.0}
    assert kept.sections["calibration"]["budget_s"] == pytest.approx(result["calibration"]["budget_s"], abs=1e-6)


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such state file"),
    ("not json", "not a state file a daemon wrote"),
    (json.dumps({"schema": 99}), "schema"),
    (Totals(sections={"calibration": {"budget_s": -1}}).to_json("g"), "'calibration' does not read back"),
    (Totals(sections={"calibration": "x"}).to_json("g"), "'calibration' does not read back"),
    (Totals(sections={"entry_risk": {"challenges": 1, "unannounced": 3}}).to_json("g"),
     "'entry_risk' does not read back"),
])
def test_a_state_file_that_does_not_read_back_is_an_error_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, says: str) -> None:
    state = tmp_path / "bad.json"
    if content is not None:
        state.write_text(content, "utf-8")
    assert main(["evaluate", "--scenario", "udds", "--seed", "1", "--json", "--state", str(state)]) == 2
    err = capsys.readouterr().err
    assert str(state) in err and says in err


def test_saving_never_replaces_a_file_that_is_not_a_state_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("not a state file\n", "utf-8")
    assert main(["evaluate", "--scenario", "udds", "--seed", "1", "--json", "--save-state", str(precious)]) == 2
    assert str(precious) in capsys.readouterr().err
    assert precious.read_text("utf-8") == "not a state file\n"


def test_state_goes_with_one_drive_not_a_day(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--day", "commuter", "--state", str(tmp_path / "s.json")]) == 2
    assert "not --day" in capsys.readouterr().err


async def test_a_daemon_starts_from_the_state_the_evaluator_learned(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.json"
    assert await asyncio.to_thread(main, ["evaluate", "--scenario", "udds", "--events", TIGHT, "--seed", "1001",
                                          "--json", "--save-state", str(state)]) == 0
    learned = json.loads(capsys.readouterr().out)["calibration"]["budget_s"]
    assert learned < 1.0
    rig = await start(tmp_path, state)
    try:
        assert part(rig.daemon).restored
        await until(lambda: rig.metric("cerebellumd_unannounced_budget_seconds") == pytest.approx(learned, abs=1e-6),
                    5, "the budget learned offline exported before any wake")
    finally:
        await rig.close()


def test_a_sweep_starts_every_run_from_the_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cerebellumd.sim.sweep import load_sweep, run_sweep

    evaluate(capsys, "--save-state", str(tmp_path / "car.json"), seed=1001)
    # release_ms 1000 is the demo's own value: the grid point is the demo config.
    common = f'scenarios = ["udds"]\nevents = ["{TIGHT}"]\nseeds = [1]\n[grid]\nrelease_ms = [1000]\n'
    (tmp_path / "cold.toml").write_text(common, "utf-8")
    (tmp_path / "warm.toml").write_text('state = "car.json"\n' + common, "utf-8")  # relative to the sweep file
    cold = run_sweep(load_sweep(tmp_path / "cold.toml"), workers=2)
    warm = run_sweep(load_sweep(tmp_path / "warm.toml"), workers=2)
    assert warm[0]["readiness"] > cold[0]["readiness"]
    assert warm[0]["readiness"] == readiness(evaluate(capsys, "--state", str(tmp_path / "car.json")))


def test_a_sweep_with_a_bad_state_file_fails_before_it_fans_out(tmp_path: Path) -> None:
    from cerebellumd.sim.sweep import load_sweep

    (tmp_path / "car.json").write_text(Totals(sections={"calibration": {"budget_s": "x"}}).to_json("g"), "utf-8")
    (tmp_path / "s.toml").write_text('state = "car.json"\nscenarios = ["udds"]\n', "utf-8")
    with pytest.raises(ValueError, match=r"car\.json: section 'calibration' does not read back"):
        load_sweep(tmp_path / "s.toml")



def test_the_worlds_table_script_reports_cold_and_warm_per_cell(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "worlds_table.py"
    rows_file = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(script), "--worlds", "tight", "--cycles", "udds", "--seeds", "1",
                           "--teach", "1", "--workers", "1", "--json", str(rows_file)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| tight | udds |")]
    assert len(lines) == 1
    (row,) = json.loads(rows_file.read_text("utf-8"))
    assert row["taught"]  # seed 1001 teaches (test_a_drive_starts_from_what_an_earlier_drive_learned)
    assert row["warm"]["readiness"] > row["cold"]["readiness"]
    assert f"{row['cold']['readiness']:.3f} / {row['cold']['readiness']:.3f}" in lines[0]


def test_a_mid_entry_lesson_stays_with_its_drive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Default world, UDDS seed 1008: a surprise arrives while the accelerator enters sleep and
    comes late although its 1.5 s deadline is the configured budget. With entry risk (the
    default) that teaches no budget at all; with it off, the drive tightens. Either way the state
    file carries the late wake, not a budget."""
    unspaced = tmp_path / "unspaced.toml"
    text = builtin_example("demo.toml")
    unspaced.write_text(text.replace('deepest_state = "off"\n', 'deepest_state = "off"\nmid_entry_late_share = 0\n', 1))
    for policy, tightens in ((None, False), (str(unspaced), True)):
        state = tmp_path / f"car-{tightens}.json"
        args = ["--policy", policy] if policy else []
        assert main(["evaluate", "--scenario", "udds", "--seed", "1008", "--json", "--save-state", str(state),
                     *args]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["calibration"]["late_wakes"] == 1
        assert result["calibration"]["learned"] is tightens
        if tightens:
            assert result["calibration"]["budget_s"] > 1.3  # what it allowed was about the configured 1.5 s
        else:
            assert result["calibration"]["budget_s"] == 1.5
        saved = read_totals(state)
        assert saved is not None
        assert saved.sections["calibration"]["budget_s"] is None
        assert saved.sections["calibration"]["late_wakes"] == 1


def test_a_learned_anticipation_table_chains_through_the_state_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cerebellumd.config import builtin_example, load_config, policy_params
    from cerebellumd.sim.learning_state import read_learning

    config_file = tmp_path / "learning.toml"
    config_file.write_text(builtin_example() + "\n[policy.learned_anticipation]\n"
                           "features = { speed_kmh = [1, 10, 20, 40, 60, 80, 100, 130], gear = [] }\n", "utf-8")
    state = tmp_path / "car.json"
    evaluate(capsys, "--policy", str(config_file), "--save-state", str(state), seed=1001)
    params = policy_params(load_config(str(config_file)))
    learned = read_learning(state, params).learned
    assert learned is not None and learned.table  # the drive's contexts, restorable
    exposure = sum(c.exposure_s for c in learned.table.values())
    # Chained: the second drive (the same cycle, as long) starts from that table and adds its own
    # exposure, about as much again; without the restore it would hold only its own.
    evaluate(capsys, "--policy", str(config_file), "--state", str(state), "--save-state", str(state))
    again = read_learning(state, params).learned
    assert again is not None and sum(c.exposure_s for c in again.table.values()) > 1.9 * exposure


def test_entry_risk_counts_chain_through_the_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "car.json"
    evaluate(capsys, "--save-state", str(state), seed=1001)
    saved = read_totals(state)
    assert saved is not None
    first = saved.sections["entry_risk"]
    assert first["challenges"] > 0 and 0 < first["unannounced"] <= first["challenges"]
    evaluate(capsys, "--state", str(state), "--save-state", str(state), seed=1002)
    saved = read_totals(state)
    assert saved is not None
    second = saved.sections["entry_risk"]
    # The second drive counted on from the first's counts (far from the 200 kept).
    assert second["challenges"] > first["challenges"] and second["unannounced"] > first["unannounced"]
