"""Event models as files: shipped worlds, `--events`, schema, errors with file and line."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from cerebellumd.cli import main
from cerebellumd.config import ConfigError
from cerebellumd.sim.events import EventModel
from cerebellumd.sim.events_config import (
    NAMED_MODELS,
    EventFile,
    event_schema,
    load_event_file,
    parse_event_file,
)
from cerebellumd.sim.sweep import load_sweep, per_world, run_sweep

EVENTS_DIR = resources.files("cerebellumd").joinpath("examples", "events")


def _shipped(name: str) -> str:
    return str(EVENTS_DIR.joinpath(f"{name}.toml"))


def test_shipped_worlds_are_files_with_the_variants_numbers() -> None:
    assert set(NAMED_MODELS) >= {"default", "surprise_heavy", "no_precursors", "tight"}
    assert NAMED_MODELS["default"] == EventModel()
    assert NAMED_MODELS["surprise_heavy"] == EventModel(surprise_rate_per_h=60.0)
    assert NAMED_MODELS["no_precursors"] == EventModel(precursor_missing_probability=1.0, false_precursor_rate_per_h=0)
    assert NAMED_MODELS["tight"] == EventModel(surprise_rate_per_h=30.0, surprise_deadline_ms=800)
    for name in NAMED_MODELS:
        assert load_event_file(_shipped(name)) == (name, NAMED_MODELS[name])


def test_todays_field_names_are_the_contract() -> None:
    fields = set(EventFile.model_fields)
    assert fields >= {
        "highway_min_speed_kmh", "urban_min_stop_s", "urban_deadline_ms", "surprise_rate_per_h",
        "surprise_deadline_ms", "precursor_missing_probability", "false_precursor_rate_per_h", "precursor_lead_s",
    }
    schema = event_schema()
    assert schema["additionalProperties"] is False
    assert all(prop.get("description") for prop in schema["properties"].values())


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("surprise_rate_per_h = 30\n# comment\nsurprize_deadline_ms = 800\n", 3, "surprize_deadline_ms"),
        ("description = 'x'\nsurprise_rate_per_h = -1\n", 2, "surprise_rate_per_h"),
        ("name = 'w'\n\nprecursor_lead_s = [15.0, 3.0]\n", 3, "precursor_lead_s"),
    ],
)
def test_bad_event_file_names_file_line_and_key(tmp_path: Path, text: str, line: int, key: str) -> None:
    f = tmp_path / "world.toml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_event_file(f)
    issue = err.value.issues[0]
    assert (issue.file, issue.line, issue.key) == (str(f), line, key)
    assert f"{f}:{line}: {key}" in str(err.value)


def test_toml_syntax_error_has_a_line() -> None:
    with pytest.raises(ConfigError, match=r"w.toml:2: TOML syntax"):
        parse_event_file("a = 1\nb = = 2\n", "w.toml")


def test_name_defaults_to_the_stem_and_can_be_set(tmp_path: Path) -> None:
    f = tmp_path / "my_world.toml"
    f.write_text("surprise_rate_per_h = 5\n", encoding="utf-8")
    assert load_event_file(f) == ("my_world", EventModel(surprise_rate_per_h=5))
    f.write_text("name = 'quiet'\nsurprise_rate_per_h = 5\n", encoding="utf-8")
    assert load_event_file(f)[0] == "quiet"


def _evaluate(capsys: pytest.CaptureFixture[str], *args: str) -> dict:  # type: ignore[type-arg]
    assert main(["evaluate", "--json", *args]) == 0
    out: dict = json.loads(capsys.readouterr().out)  # type: ignore[type-arg]
    return out


def test_events_file_equals_the_named_variant(capsys: pytest.CaptureFixture[str]) -> None:
    by_file = _evaluate(capsys, "--scenario", "us06", "--seed", "3", "--events", _shipped("surprise_heavy"))
    by_name = _evaluate(capsys, "--scenario", "us06:surprise_heavy", "--seed", "3")
    assert by_file == by_name
    assert by_file["scenario"] == "surprise_heavy" and by_file["cycle"] == "us06" and by_file["seed"] == 3


def test_events_file_changes_the_world_and_combines_with_cycle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = tmp_path / "calm.toml"
    world.write_text("surprise_rate_per_h = 0\nprecursor_missing_probability = 1.0\n", encoding="utf-8")
    calm = _evaluate(capsys, "--scenario", "us06", "--events", str(world))
    default = _evaluate(capsys, "--scenario", "us06")
    assert calm["scenario"] == "calm" and calm["events"] < default["events"]
    cycle = tmp_path / "c.csv"
    cycle.write_text("time_s,speed_kmh\n" + "".join(f"{t},{min(t, 50)}\n" for t in range(120)), encoding="utf-8")
    via_cycle = _evaluate(capsys, "--cycle", str(cycle), "--events", _shipped("tight"))
    assert via_cycle["cycle"] == "c" and via_cycle["scenario"] == "tight"


def test_events_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("surprise_rate_per_h = 30\nsurprise_dedline_ms = 800\n", encoding="utf-8")
    assert main(["evaluate", "--scenario", "udds", "--events", str(bad)]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "bad.toml:2" in err and "surprise_dedline_ms" in err
    assert main(["evaluate", "--scenario", "udds:tight", "--events", _shipped("tight")]) == 2
    assert "give one event model" in capsys.readouterr().err.replace("\n", " ")


def test_schema_events_prints_the_event_file_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "--events"]) == 0
    assert json.loads(capsys.readouterr().out) == event_schema()


def test_sweep_crosses_cycles_with_event_files(tmp_path: Path) -> None:
    world = tmp_path / "calm.toml"
    world.write_text("surprise_rate_per_h = 0\n", encoding="utf-8")
    f = tmp_path / "sweep.toml"
    f.write_text('scenarios = ["us06"]\nevents = ["tight", "calm.toml"]\nseeds = [1]\n', encoding="utf-8")
    rows = run_sweep(load_sweep(f))
    assert sorted(r["scenario"] for r in rows) == ["us06:calm", "us06:tight"]
    table = {w["scenario"]: w for w in per_world(rows, [])}
    assert set(table) == {"us06:calm", "us06:tight"}
    for w in table.values():
        assert w["runs"] == 1 and w["readiness_min"] <= w["readiness_mean"] and w["vs_oracle"] >= 1.0
    bad = tmp_path / "bad.toml"
    bad.write_text('scenarios = ["us06:tight"]\nevents = ["calm.toml"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="us06:tight"):
        load_sweep(bad)
