"""Config validation: every error names file, line and key; `check` and `schema` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cerebellumd.config import ConfigError, builtin_example, load_config, locate, parse_config, policy_params

DEMO = builtin_example()


def broken(old: str, new: str) -> str:
    assert old in DEMO, old
    return DEMO.replace(old, new, 1)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def issues(text: str):
    with pytest.raises(ConfigError) as err:
        parse_config(text, "cfg.toml")
    return err.value.issues


def test_shipped_demo_config_is_valid() -> None:
    config = parse_config(DEMO)
    params = policy_params(config)
    assert {d.name for d in params.demands} >= {"collision", "highway_assist"}
    # collision_risk feeds a critical demand: its stale policy is wake.
    assert next(s for s in params.signals if s.name == "collision_risk").on_stale.value == "wake"


def test_typo_in_key_is_reported_with_line() -> None:
    text = broken("min_dwell_ms = 300", "min_dwel_ms = 300")
    [issue] = issues(text)
    assert issue.key == "policy.min_dwel_ms"
    assert issue.line == line_of(text, "min_dwel_ms")
    assert "unknown key" in issue.message
    assert str(issue).startswith(f"cfg.toml:{issue.line}: policy.min_dwel_ms")


def test_wrong_type_in_array_of_tables_points_at_the_right_entry() -> None:
    text = broken('deadline_ms = 500\n', 'deadline_ms = "soon"\n')
    [issue] = issues(text)
    assert issue.key == "demands[2].deadline_ms"
    assert issue.line == line_of(text, '"soon"')


def test_unknown_driver_and_interface() -> None:
    text = broken('driver = "simulated"', 'driver = "warp_drive"')
    text = text.replace('interface = "virtual"', 'interface = "nope"')
    found = {i.key: i for i in issues(text)}
    assert "unknown driver 'warp_drive'" in found["accelerator.driver"].message
    assert found["accelerator.driver"].line == line_of(text, "warp_drive")
    assert found["can[0].interface"].line == line_of(text, '"nope"')


def test_expression_that_does_not_parse_or_names_unknown_signal() -> None:
    text = broken('when = "collision_risk == 1"', 'when = "collision_risk == "')
    [issue] = issues(text)
    assert issue.key == "demands[0].when" and "does not parse" in issue.message
    text = broken('when = "collision_risk == 1"', 'when = "colision_risk == 1"')
    [issue] = issues(text)
    assert "unknown signal(s): colision_risk" in issue.message
    assert issue.line == line_of(text, "colision_risk")


def test_forbidden_expression_constructs_are_rejected() -> None:
    for expr in ("__import__('os')", "speed_kmh.real", "[x for x in y]", "lambda: 1", "speed_kmh if 1 else 2"):
        text = broken('when = "collision_risk == 1"', f'when = "{expr}"')
        [issue] = issues(text)
        assert issue.key == "demands[0].when"


def test_toml_syntax_error_has_line() -> None:
    text = broken("[policy]", "[policy")
    [issue] = issues(text)
    assert issue.line == line_of(text, "[policy") and "TOML syntax" in issue.message


def test_signal_needs_exactly_one_source() -> None:
    gear = '[signals.gear]\ncan = "VehicleDynamics.Gear"'
    text = broken(gear, gear.replace("[signals.gear]", '[signals.gear]\nmcu = "x"'))
    [issue] = issues(text)
    assert issue.key == "signals.gear"
    assert "exactly one source" in issue.message


def test_locate_handles_nested_tables_and_missing_keys() -> None:
    text = "[a]\nx = 1\n[[b]]\ny = 1\n[[b]]\ny = 2\n[c.d]\nz = 3\n"
    assert locate(text, ("a", "x")) == 2
    assert locate(text, ("b", 1, "y")) == 6
    assert locate(text, ("c", "d", "z")) == 8
    assert locate(text, ("b", 1, "missing")) == 5  # falls back to its table


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "absent.toml")
    assert "cannot read" in str(err.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cerebellumd", *args], capture_output=True, text=True, timeout=60)


def test_check_command_ok_and_broken(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(DEMO)
    result = run_cli("check", str(good))
    assert result.returncode == 0 and result.stdout.strip() == "OK"
    bad = tmp_path / "bad.toml"
    bad.write_text(broken("min_dwell_ms = 300", "min_dwell_ms = -1\nmistake = 1"))
    result = run_cli("check", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert any(f"{bad}:" in line and "policy.min_dwell_ms" in line for line in lines)
    assert any("policy.mistake" in line and "unknown key" in line for line in lines)


def test_schema_command_describes_every_field() -> None:
    result = run_cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    defs = schema["$defs"]
    assert defs["PolicyConfig"]["additionalProperties"] is False
    for model in defs.values():
        for name, prop in model.get("properties", {}).items():
            assert prop.get("description"), f"{model['title']}.{name} has no description"
    assert "class" in defs["DemandConfig"]["properties"]


def test_bad_nm_and_power_config_reports_each_issue_once() -> None:
    text = DEMO + (
        '\n[nm]\nenabled = true\nbus = "nope"\nignition_signal = "ghost"\nbattery_signal = "ghost_v"\n'
        '\n[power.rails]\nboard = "jetson_orin_nano"\n'  # rails mapped, but no rail sensor given
    )
    found = [(i.key, i.message) for i in issues(text)]
    assert len(found) == len(set(found)), found  # nothing reported twice
    keys = [k for k, _ in found]
    for key in ("nm.bus", "nm.ignition_signal", "nm.battery_signal"):
        assert keys.count(key) == 1, found
    rails = [m for k, m in found if k == "power.rail_sensors"]
    assert rails and len(rails) == len(set(rails))
    assert any("unknown bus 'nope'" in m for _, m in found)


def test_expression_python_only_warns_about_is_rejected() -> None:
    text = broken('when = "collision_risk == 1"', 'when = "collision_risk == 1and gear"')
    [issue] = issues(text)
    assert issue.key == "demands[0].when" and "does not parse" in issue.message


def test_an_invalid_escape_is_rejected_not_warned_about() -> None:
    """Python 3.11 only warns (DeprecationWarning) about `\\>` in a string literal."""
    import warnings

    text = broken('when = "collision_risk == 1"', "when = 'collision_risk == \"\\>\"'")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [issue] = issues(text)
    assert issue.key == "demands[0].when" and "invalid escape sequence" in issue.message
