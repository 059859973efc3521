"""Days in the evaluator (`cerebellumd evaluate --day`): trips, parked gaps, key cycles, garage
leases and ambient battery behaviour over 24 h, per policy and baseline."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.cli import main
from cerebellumd.config import ConfigError, parse_config
from cerebellumd.sim.day import build_day, day_schema, evaluate_day, load_day, parse_day, shipped_days

PARKED = parse_config(resources.files("cerebellumd").joinpath("examples", "parked.toml").read_text("utf-8"),
                      "parked.toml")

SMALL = """
name = "small"
duration_h = 3
[[trips]]
at = 00:30:00
cycle = "us06"
[[key_cycles]]
at = 01:00:00
on_s = 60
[[garage]]
at = 02:00:00
max_duration_s = 300
owner = "app:ota"
reason = "model update"
"""


@pytest.fixture(scope="module")
def small() -> dict:  # type: ignore[type-arg]
    name, day = parse_day(SMALL, "small.toml")
    return evaluate_day(PARKED, name, day)


def test_shipped_days_parse_and_build() -> None:
    assert {"commuter", "delivery_van"} <= set(shipped_days())
    for name in shipped_days():
        label, day = load_day(name)
        scenario = build_day(label, day, PARKED)
        parked = sum(k.duration_s for k in scenario.model.key_off)
        assert 0 < parked < day.duration_h * 3600
        assert len(scenario.model.holds) == len(day.garage)
        assert scenario.cycle.times[-1] == pytest.approx(day.duration_h * 3600)


def test_a_day_reports_energy_per_domain_parked_drain_budget_readiness_and_keep_awake(small: dict) -> None:  # type: ignore[type-arg]
    rows = {r["policy"]: r for r in small["results"]}
    assert set(rows) == {PARKED.policy.name, "ignition_on", "keyoff_timeout"}
    for r in rows.values():
        assert set(r["energy_wh"]) == {"accelerator", "gateway", "mcu"}
        assert r["energy_wh_total"] == pytest.approx(sum(r["energy_wh"].values()), abs=0.01)
        assert all(r["parked_drain_wh"][d] <= r["energy_wh"][d] + 1e-6 for d in r["energy_wh"])
        assert r["budget_min_wh"] is not None and 0 <= r["budget_min_wh"] <= PARKED.battery.capacity_wh
        # The trip and the key cycle. The garage lease's own NM request keeps the network up on a
        # silent bus: no other node heard, so no key-on (it once counted as a third).
        assert r["keyon_ready_s"]["n"] == 2
        assert r["keep_awake"]["lease"] == 1  # the garage lease, counted once
    mine, today, timeout = rows[PARKED.policy.name], rows["ignition_on"], rows["keyoff_timeout"]
    # The accelerator powered whenever the ignition is on spends more than the policy.
    assert today["energy_wh"]["accelerator"] > mine["energy_wh"]["accelerator"]
    # ... and powered 300 s past key-off drains more while parked than without the timeout.
    assert timeout["parked_drain_wh"]["accelerator"] > today["parked_drain_wh"]["accelerator"]
    assert any(kind == "lease" and "model update" in why for _, kind, why in mine["keep_awake_events"])


def test_a_garage_lease_ends_at_its_cap(small: dict) -> None:  # type: ignore[type-arg]
    run = small["_runs"][0]
    start, cap = 2 * 3600, 300
    acc = run.accelerator
    assert acc.is_active_at(start + cap - 1)  # orin_nano's 25 s exit from off, then active
    assert not acc.is_active_at(start + cap + 60)
    after = [s for a, b, s in acc.segments if a <= start + cap + 600 <= b]
    assert after == [AccelState.OFF]


def test_budget_runs_out_and_the_gateway_may_power_down() -> None:
    # A long parked night on a small budget: the configured policy powers the gateway down,
    # the baselines (today's cars) keep draining.
    text = SMALL.replace('name = "small"', 'name = "night"\nstart_budget_wh = 2.0').replace(
        "duration_h = 3", "duration_h = 6")
    name, day = parse_day(text, "night.toml")
    result = evaluate_day(PARKED, name, day)
    rows = {r["policy"]: r for r in result["results"]}
    mine = rows[PARKED.policy.name]
    assert mine["power_downs"].get("budget", 0) >= 1 and mine["gateway_powered_down_s"] > 0
    assert rows["ignition_on"]["gateway_powered_down_s"] == 0
    assert mine["energy_wh"]["gateway"] < rows["ignition_on"]["energy_wh"]["gateway"]
    assert mine["budget_min_wh"] == 0.0


def test_parked_time_is_event_driven(small: dict) -> None:  # type: ignore[type-arg]
    # 3 h, of which about 10 min driving: far fewer steps than 10 ms ticks of the parked time.
    for run in small["_runs"]:
        assert run.steps < 20_000


@pytest.mark.parametrize(("text", "line", "match"), [
    (SMALL + "\n[[trips]]\nat = 00:35:00\ncycle = \"udds\"\n", 17, "before the drive"),
    (SMALL.replace("on_s = 60", "on_s = 60\ncolour = 1"), 10, "unknown key"),
    (SMALL.replace("at = 02:00:00", "at = 00:31:00"), 11, "parked time"),
    (SMALL.replace('cycle = "us06"', 'cycle = "nope"'), 6, "not a shipped cycle"),
    (SMALL.replace("at = 01:00:00", 'at = "25 past"'), 8, "not a time of day"),
])
def test_bad_day_input_names_file_and_line(text: str, line: int, match: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_day(text, "bad.toml")
    issue = err.value.issues[0]
    assert issue.file == "bad.toml" and issue.line == line, issue
    assert match in issue.message


def test_a_day_needs_the_vehicle_power_state() -> None:
    name, day = parse_day(SMALL, "small.toml")
    demo = parse_config(resources.files("cerebellumd").joinpath("examples", "demo.toml").read_text("utf-8"), "d")
    with pytest.raises(ValueError, match=r"\[vehicle_power\]"):
        evaluate_day(demo, name, day)


def test_cli_day_json_plot_and_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    day = tmp_path / "small.toml"
    day.write_text(SMALL)
    png = tmp_path / "day.png"
    assert main(["evaluate", "--day", str(day), "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["day"] == "small" and len(out["results"]) == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["schema", "--day"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == day_schema() and schema["additionalProperties"] is False
    bad = tmp_path / "bad.toml"
    bad.write_text(SMALL.replace("on_s = 60", "on_s = 60\ncolour = 1"))
    assert main(["evaluate", "--day", str(bad)]) == 2
    assert f"{bad}:10" in capsys.readouterr().err
