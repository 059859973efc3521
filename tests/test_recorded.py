"""`cerebellumd evaluate --log LOG --dbc DBC --labels LABELS.toml`: the evaluator on recorded
drives. The corpus (two Toyota RAV4 recordings, CSS Electronics' J1939 demo) is evaluated with
its shipped config and labels; the label events are checked against an independent scan of the
log (cantools decoding, Python evaluating the `when`), and bad input gets file and line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import can
import cantools
import pytest

from cerebellumd.config import ConfigError, builtin_example, load_config, parse_config
from cerebellumd.sim.recorded import RecordedError, evaluate_recording

from . import contracts

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Case:
    folder: Path
    log: str
    dbc: str
    j1939: bool = False

    @property
    def paths(self) -> tuple[Path, Path, Path, Path]:
        f = self.folder
        return f / self.log, f / self.dbc, f / "evaluate.toml", f / "labels.toml"


CORPUS = {
    "rav4_2019": Case(DATA / "corpus" / "toyota_rav4_2019_verifiedcan", "drive.log", "toyota_nodsu_pt_generated.dbc"),
    "rav4_2018": Case(DATA / "corpus" / "toyota_rav4_2018_comma2k19", "drive.log", "toyota_new_mc_pt_generated.dbc"),
    "j1939_demo": Case(DATA / "j1939", "css_j1939_demo.log.gz", "CSS-Electronics-SAE-J1939-DEMO.dbc", j1939=True),
}


def _evaluate(case: Case) -> dict[str, Any]:
    log, dbc, cfg, labels = case.paths
    return evaluate_recording(load_config(cfg), log, dbc, labels).result


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    return {name: _evaluate(case) for name, case in CORPUS.items()}


# -- the corpus -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_gives_the_evaluate_json(results: dict[str, dict[str, Any]], name: str) -> None:
    case, result = CORPUS[name], results[name]
    keys = contracts.evaluation_keys()
    assert tuple(result)[: len(keys)] == keys
    assert [r["policy"] for r in result["results"]] == ["cerebellum_first", *contracts.evaluation_policies()[1:]]
    assert result["cycle"] == case.log
    labels = tomllib.loads(case.paths[3].read_text())
    assert result["scenario"] == labels["name"]
    assert result["events"] == sum(label["events"] for label in result["labels"])
    assert result["never_fed"] == []
    frames = sum(1 for _ in can.LogReader(str(case.paths[0])))
    assert result["recording"]["frames"] == frames
    names = {label["name"] for label in labels["labels"]}
    for row in [*result["results"], *result["causal_baselines"]]:
        assert set(contracts.evaluation_row_keys()) <= set(row)
        assert 0.0 <= row["readiness"] <= 1.0
        assert row["missed_events"] == round(result["events"] * (1 - row["readiness"]))
        assert set(row["readiness_by_kind"]) <= names
        assert all(0.0 <= v <= 1.0 for v in row["readiness_by_kind"].values())
    by = {r["policy"]: r for r in result["results"]}
    # The bounds hold on a real timeline too: nothing is readier than always_on, and nothing
    # spends less than the oracle while as ready.
    assert by["always_on"]["readiness"] == 1.0
    assert by["oracle"]["readiness"] == 1.0
    assert by["oracle"]["accelerator_energy_j"] <= by["always_on"]["accelerator_energy_j"]
    assert isinstance(result["dominated_by"], list)


def _when(expression: str, env: dict[str, float]) -> bool:
    try:
        return bool(eval(expression, {"__builtins__": {}}, dict(env)))  # the test oracle: Python over our own files
    except NameError:  # a signal not seen yet: unknown, so the label does not hold
        return False


def _scan(case: Case, refs: dict[str, str], label: dict[str, Any]) -> list[tuple[float, float]]:
    """The label's events straight from the log: cantools decodes each frame (J1939 by PGN),
    each signal's value is held, `when` is evaluated by Python after each timestamp."""
    log, dbc, _, _ = case.paths
    db = cantools.database.load_file(str(dbc), strict=False)
    wanted = {n: refs[n].split(".") for n in refs if n in label["when"]}
    by_key: dict[int, Any] = {}
    for m in db.messages:
        by_key[(m.frame_id >> 8) & 0x3FFFF if case.j1939 else m.frame_id] = m
    samples: list[tuple[float, str, float]] = []
    t0: float | None = None
    end = 0.0
    for msg in can.LogReader(str(log)):
        t0 = msg.timestamp if t0 is None else t0
        end = msg.timestamp - t0
        key = (msg.arbitration_id >> 8) & 0x3FFFF if case.j1939 and msg.is_extended_id else msg.arbitration_id
        message = by_key.get(key)
        if message is None or (message.is_extended_frame != msg.is_extended_id):
            continue
        if not any(message.name == mname for mname, _ in wanted.values()):
            continue
        try:
            decoded = message.decode(bytes(msg.data), decode_choices=False)
        except Exception:
            continue
        for ours, (mname, sname) in wanted.items():
            if mname == message.name:
                samples.append((msg.timestamp - t0, ours, float(decoded[sname])))
    env: dict[str, float] = {}
    out: list[tuple[float, float]] = []
    since: float | None = None
    i = 0
    while i < len(samples):
        t = samples[i][0]
        while i < len(samples) and samples[i][0] == t:
            env[samples[i][1]] = samples[i][2]
            i += 1
        holds = _when(label["when"], env)
        if holds and since is None:
            since = t
        elif not holds and since is not None:
            out.append((since, t))
            since = None
    if since is not None:
        out.append((since, end))
    return [(a, b) for a, b in out if b - a >= label.get("min_duration_ms", 0) / 1000 - 1e-9]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_label_events_match_a_direct_cantools_scan(results: dict[str, dict[str, Any]], name: str) -> None:
    case = CORPUS[name]
    config = tomllib.loads(case.paths[2].read_text())
    refs = {n: s["can"] for n, s in config["signals"].items()}
    labels = tomllib.loads(case.paths[3].read_text())["labels"]
    got = {label["name"]: label for label in results[name]["labels"]}
    assert [label["name"] for label in labels] == list(got)
    found = 0
    for label in labels:
        expected = _scan(case, refs, label)
        mine = got[label["name"]]["intervals"]
        assert len(mine) == len(expected), label["name"]
        for (a, b), (x, y) in zip(mine, expected, strict=True):
            assert math.isclose(a, x, abs_tol=1e-3) and math.isclose(b, y, abs_tol=1e-3), (label["name"], a, b, x, y)
        found += len(expected)
    assert found > 0  # every recording's labels find something


def test_evaluation_is_deterministic_and_the_cli_prints_the_same_json(results: dict[str, dict[str, Any]]) -> None:
    case = CORPUS["rav4_2019"]
    assert _evaluate(case) == results["rav4_2019"]
    log, dbc, cfg, labels = case.paths
    out = subprocess.run(
        [sys.executable, "-m", "cerebellumd", "evaluate", "--log", str(log), "--dbc", str(dbc), "--config", str(cfg),
         "--labels", str(labels), "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert json.loads(out.stdout) == results["rav4_2019"]


# -- a recording whose right answer is known ---------------------------------------------------

T0 = 1_700_000_000.0


@pytest.fixture
def vehicle_dbc(tmp_path: Path) -> Path:
    path = tmp_path / "vehicle.dbc"
    path.write_text(resources.files("cerebellumd").joinpath("data", "vehicle.dbc").read_text("utf-8"))
    return path


def _synthetic_log(path: Path, dbc: Path, risk: tuple[float, float], seconds: float = 30.0) -> Path:
    """The virtual vehicle's DBC: VehicleDynamics every 20 ms (50 km/h, drive), AdasStatus every
    50 ms with CollisionRisk = 1 during `risk`."""
    db = cantools.database.load_file(str(dbc))
    adas, dyn = db.get_message_by_name("AdasStatus"), db.get_message_by_name("VehicleDynamics")
    frames = []
    for k in range(round(seconds / 0.05)):
        t = k * 0.05
        on = 1 if risk[0] <= t < risk[1] else 0
        data = adas.encode({s.name: 0 for s in adas.signals} | {"CollisionRisk": on, "ObstacleDistance": 100})
        frames.append(can.Message(timestamp=T0 + t, arbitration_id=adas.frame_id, data=data, is_extended_id=False))
    for k in range(round(seconds / 0.02)):
        data = dyn.encode({"VehicleSpeed": 50, "LongAccel": 0, "Gear": 3, "DynCounter": k % 16})
        frames.append(can.Message(timestamp=T0 + k * 0.02 + 0.001, arbitration_id=dyn.frame_id, data=data,
                                  is_extended_id=False))
    frames.sort(key=lambda m: m.timestamp)
    with can.Logger(str(path)) as logger:
        for m in frames:
            logger.on_message_received(m)
    return path


def test_a_recorded_collision_is_scored_like_the_evaluator_scores_one(tmp_path: Path, vehicle_dbc: Path) -> None:
    log = _synthetic_log(tmp_path / "drive.log", vehicle_dbc, risk=(10.0, 14.0))
    labels = tmp_path / "labels.toml"
    labels.write_text(
        '[[labels]]\nname = "collision"\nwhen = "collision_risk == 1"\ndeadline_ms = 1500\n\n'
        '[[labels]]\nname = "instant"\nwhen = "collision_risk == 1"\ndeadline_ms = 10\nmin_duration_ms = 1000\n'
    )
    config = parse_config(builtin_example(), "demo.toml")
    run = evaluate_recording(config, log, vehicle_dbc, labels)
    result = run.result
    assert result["events"] == 2 and result["scenario"] == "labels" and result["cycle"] == "drive.log"
    assert [label["intervals"] for label in result["labels"]] == [[[10.0, 14.0]], [[10.0, 14.0]]]
    # BodyStatus and AcceleratorThermal are not in this log: named, never silently dropped.
    assert result["never_fed"] == ["accel_temp_c", "battery_v"]
    by = {r["policy"]: r for r in result["results"]}
    mine = by["cerebellum_first"]
    # The demo's critical `collision` demand is this label: woken for it, within 1.5 s...
    assert mine["wake_cycles"] >= 1 and mine["readiness_by_kind"]["collision"] == 1.0
    # ... but no causal policy starting idle is active 10 ms after the onset; the oracle is.
    model_wake_s = run.evaluation.runs[0].accelerator.wake_latencies[0]
    assert model_wake_s > 0.010
    assert mine["readiness_by_kind"]["instant"] == 0.0
    assert by["oracle"]["readiness_by_kind"] == {"collision": 1.0, "instant": 1.0}
    assert by["always_on"]["readiness"] == 1.0


# -- bad input ---------------------------------------------------------------------------------


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cerebellumd", "evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _rav4_args(labels: Path) -> list[str | Path]:
    log, dbc, cfg, _ = CORPUS["rav4_2019"].paths
    return ["--log", log, "--dbc", dbc, "--config", cfg, "--labels", labels]


def test_a_label_naming_an_unknown_signal_is_an_error_with_file_and_line(tmp_path: Path) -> None:
    labels = tmp_path / "labels.toml"
    labels.write_text('[[labels]]\nname = "a"\nwhen = "speed > 5"\ndeadline_ms = 500\n\n'
                      '[[labels]]\nname = "b"\nwhen = "sped > 5 and cruise == 1"\ndeadline_ms = 500\n')
    out = _cli(*_rav4_args(labels))
    assert out.returncode == 2
    assert f"{labels}:8: labels[1].when: unknown signal(s): sped" in out.stderr
    assert "speed" in out.stderr  # the config's signals are listed
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ('name = "x"\ncolour = "red"\n[[labels]]\nname = "a"\nwhen = "speed > 5"\ndeadline_ms = 500\n', 2, "colour"),
        ('[[labels]]\nname = "a"\nwhen = "speed > 5"\ndeadline_ms = 500\nmin_duration = 3\n', 5,
         "labels[0].min_duration"),
        ('[[labels]]\nname = "a"\nwhen = "speed > 5"\n', 1, "labels[0].deadline_ms"),
    ],
)
def test_unknown_keys_and_missing_ones_in_a_labels_file_name_file_and_line(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    labels = tmp_path / "labels.toml"
    labels.write_text(text)
    out = _cli(*_rav4_args(labels))
    assert out.returncode == 2
    assert f"{labels}:{line}: {key}: " in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_log_with_no_frame_of_the_dbc_says_so(tmp_path: Path) -> None:
    log = tmp_path / "other_bus.log"
    with can.Logger(str(log)) as logger:
        for k in range(50):
            logger.on_message_received(can.Message(timestamp=T0 + k * 0.01, arbitration_id=0x7AB, data=b"\x01\x02",
                                                   is_extended_id=False))
    _, dbc, cfg, labels = CORPUS["rav4_2019"].paths
    out = _cli("--log", log, "--dbc", dbc, "--config", cfg, "--labels", labels)
    assert out.returncode == 2
    assert f"{log}: none of its 50 frames is a message of {dbc}" in out.stderr
    assert "0x7AB" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(RecordedError, match="none of its 50 frames"):
        evaluate_recording(load_config(cfg), log, dbc, labels)


def test_empty_logs_unreadable_formats_and_missing_options_are_clear(tmp_path: Path) -> None:
    _, dbc, cfg, labels = CORPUS["rav4_2019"].paths
    empty = tmp_path / "empty.log"
    empty.write_text("")
    out = _cli("--log", empty, "--dbc", dbc, "--config", cfg, "--labels", labels)
    assert out.returncode == 2 and f"{empty}: the recording has no frames" in out.stderr
    odd = tmp_path / "drive.xyz"
    odd.write_text("nothing\n")
    out = _cli("--log", odd, "--dbc", dbc, "--config", cfg, "--labels", labels)
    assert out.returncode == 2 and "python-can reads" in out.stderr and ".asc" in out.stderr
    out = _cli("--log", empty, "--dbc", dbc, "--config", cfg)
    assert out.returncode == 2 and "--log needs --dbc and --labels" in out.stderr
    for o in (out,):
        assert "Traceback" not in o.stderr


def test_a_config_signal_the_dbc_lacks_is_refused_with_file_line_and_a_suggestion(tmp_path: Path) -> None:
    log, dbc, cfg, labels = CORPUS["rav4_2019"].paths
    typo = tmp_path / "typo.toml"
    text = cfg.read_text().replace('can = "SPEED.SPEED"', 'can = "SPEED.SPED"')
    typo.write_text(text)
    line = text.splitlines().index('can = "SPEED.SPED"') + 1
    out = _cli("--log", log, "--dbc", dbc, "--config", typo, "--labels", labels)
    assert out.returncode == 2
    assert f"{typo}:{line}: signals.speed.can: message 'SPEED' has no signal 'SPED'" in out.stderr
    assert "did you mean 'SPEED'" in out.stderr


def test_labels_schema_documents_every_field() -> None:
    out = subprocess.run([sys.executable, "-m", "cerebellumd", "schema", "--labels"], capture_output=True, text=True,
                         timeout=60, check=True)
    schema = json.loads(out.stdout)
    assert schema["additionalProperties"] is False and "labels" in schema["required"]
    label = schema["$defs"]["Label"]
    assert label["additionalProperties"] is False
    assert set(label["required"]) == {"name", "when", "deadline_ms"}
    for props in (schema["properties"], label["properties"]):
        assert all(p.get("description") for p in props.values())


def test_labels_load_without_a_recording(tmp_path: Path) -> None:
    from cerebellumd.sim.labels import load_labels

    labels = tmp_path / "l.toml"
    labels.write_text('[[labels]]\nname = "a"\nwhen = "x > 1"\ndeadline_ms = 5\n'
                      '[[labels]]\nname = "a"\nwhen = "x > 2"\ndeadline_ms = 5\n')
    with pytest.raises(ConfigError, match="duplicate label name 'a'"):
        load_labels(labels, {"x"})


def test_sweep_takes_a_recording(tmp_path: Path) -> None:
    log, dbc, cfg, labels = CORPUS["rav4_2019"].paths
    spec = tmp_path / "grid.toml"
    spec.write_text(f'policy = "{cfg}"\n[grid]\nrelease_ms = [2000, 10000]\nlatency_budget_ms = [800, 1500]\n')
    out = subprocess.run(
        [sys.executable, "-m", "cerebellumd", "sweep", str(spec), "--log", str(log), "--dbc", str(dbc),
         "--labels", str(labels), "--out", str(tmp_path / "rows")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert sorted((r["release_ms"], r["latency_budget_ms"]) for r in rows) == [
        (2000, 800), (2000, 1500), (10000, 800), (10000, 1500)]
    assert {r["scenario"] for r in rows} == {"drive.log"}
    # Each row is the evaluation of that grid point: the same numbers as evaluate --log on it.
    config = load_config(cfg)
    one = next(r for r in rows if (r["release_ms"], r["latency_budget_ms"]) == (2000, 800))
    tuned = config.model_copy(update={"policy": config.policy.model_copy(update={"release_ms": 2000,
                                                                                  "latency_budget_ms": 800})})
    direct = evaluate_recording(tuned, log, dbc, labels).result["results"][0]
    assert (one["readiness"], one["accelerator_energy_j"]) == (direct["readiness"], direct["accelerator_energy_j"])
    # A tighter latency budget never allows a deeper state: at least as ready.
    for release in (2000, 10000):
        tight, loose = (next(r for r in rows if (r["release_ms"], r["latency_budget_ms"]) == (release, b))
                        for b in (800, 1500))
        assert tight["readiness"] >= loose["readiness"]
