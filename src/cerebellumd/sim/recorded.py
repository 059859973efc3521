"""Recorded drives: `cerebellumd evaluate --log LOG --dbc DBC --policy CFG --labels LABELS.toml`.

The evaluator's engine (`sim/evaluate.py`: the same pure `CerebellumFirst.step`, the baselines,
the oracle, the `SimAccelerator`, the metrics and the JSON) on a real recorded timeline instead
of the virtual vehicle:

- Signals: the log's frames decoded with the DBC as `replay` decodes them (`FrameDecoder`:
  exact IDs, J1939 by PGN with transport-protocol reassembly), into the config's `[signals]`
  whose `can = "Message.Signal"` the DBC has. Each decoded frame is a delivery at its timestamp
  (seconds from the log's first frame), delivered to the policy at the first 10 ms tick at or
  after it, as the virtual vehicle's frames are. A configured signal the log never carries is
  never fed (stale) and listed in `never_fed`; so is one with a SOME/IP or MCU source.
- Events (the ground truth): each `[[labels]]` entry of the labels file has a `when` in the
  demand expression language over the config's signal names. Its values are the decoded
  samples, each held until the next sample of the same signal (no staleness: the label says
  what the car did, not what a receiver could trust). An event is each maximal interval of the
  log in which `when` is true (unknown counts as false) lasting at least `min_duration_ms`,
  from the frame that made it true to the frame that made it false (or the log's last frame);
  its deadline is the label's `deadline_ms`.
- The JSON: the evaluate JSON (docs/contracts.md) with `cycle` the log's file name, `scenario`
  the labels file's name (default its stem) and `seed` the resume-failure seed;
  `readiness_by_kind` is per label name. Extras: `log`, `dbc`, `labels` (each label's events),
  `recording` (frame counts), `never_fed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can
import numpy as np
from cantools.database.can import Database, Message

from ..config import Config
from ..policies.calibration import Calibration
from ..policies.entry_risk import EntryRisk
from ..policies.learned import Learned
from .cycles import DriveCycle
from .evaluate import DEFAULT_TICK_MS, Evaluation, PolicyRun, run_evaluation
from .events import ChallengeEvent, EventKind, EventModel, Scenario
from .labels import CompiledLabel, load_labels
from .replay import FrameDecoder, load_replay_dbc


class RecordedError(ValueError):
    """A recording that cannot be evaluated; the message names the file and why."""


# -- the recording ----------------------------------------------------------------------------


@dataclass
class Recording:
    """The decoded frames of the messages that matter, on the log's clock (s from its first frame)."""

    log: str
    dbc: str
    db: Database
    duration_s: float
    counts: dict[str, int]
    #: message -> (times, signal -> values): every decoded frame of the messages asked for.
    traces: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = field(default_factory=dict)

    def samples(self, message: str, signal: str) -> tuple[np.ndarray, np.ndarray]:
        times, values = self.traces.get(message, (np.zeros(0), {}))
        return times, values.get(signal, np.zeros(0))


def _reader(log: Path) -> can.io.generic.MessageReader:
    if not log.is_file():
        raise RecordedError(f"{log}: no such file")
    try:
        return can.LogReader(str(log))
    except ValueError as exc:  # python-can: "No read support for unknown log format"
        from can.io import player

        formats = ", ".join(sorted(getattr(player, "MESSAGE_READERS", {}) or [".asc", ".blf", ".csv", ".log", ".trc"]))
        raise RecordedError(f"{log}: {exc}; python-can reads {formats}") from None
    except Exception as exc:
        raise RecordedError(f"{log}: cannot read: {exc}") from None


def read_recording(
    log: str | Path, dbc: str | Path, wanted: Mapping[str, Collection[str]], *, j1939: str = "auto"
) -> Recording:
    """Decode `log` with `dbc`; keep every decoded value of `wanted` (message -> signals).
    A log with no frames, or none of the DBC, is a `RecordedError` naming both files."""
    db = load_replay_dbc(dbc)
    decoder = FrameDecoder(db, j1939)
    path = Path(log)
    times: dict[str, list[float]] = {m: [] for m in wanted}
    values: dict[str, dict[str, list[float]]] = {m: {s: [] for s in sigs} for m, sigs in wanted.items()}
    ids: dict[int, int] = {}
    frames = 0
    first = last = 0.0
    reader = _reader(path)
    try:
        for msg in reader:
            t = float(msg.timestamp)
            if frames == 0:
                first = t
            frames += 1
            last = t
            ids[msg.arbitration_id] = ids.get(msg.arbitration_id, 0) + 1
            for message, decoded, at in decoder.feed(msg):
                if message.name not in times:
                    continue
                row = values[message.name]
                got = [decoded.get(s) for s in row]
                if any(not isinstance(v, int | float) for v in got):
                    continue  # a multiplexed frame without this signal: no sample of it
                times[message.name].append(at - first)
                for s, v in zip(row, got, strict=True):
                    row[s].append(float(v))  # type: ignore[arg-type]
    except RecordedError:
        raise
    except Exception as exc:  # a malformed line deep in a text log
        raise RecordedError(f"{path}: not a readable {path.suffix or 'log'} recording: {exc}") from None
    finally:
        stop = getattr(reader, "stop", None)
        if callable(stop):
            stop()
    decoder.close()
    counts = dict(decoder.counts) | {"frames": frames}
    if frames == 0:
        raise RecordedError(f"{path}: the recording has no frames")
    if counts.get("decoded", 0) + counts.get("tp_decoded", 0) == 0:
        busiest = ", ".join(f"0x{i:X}" for i, _ in sorted(ids.items(), key=lambda kv: -kv[1])[:5])
        raise RecordedError(
            f"{path}: none of its {frames} frames is a message of {dbc} (the recording's most frequent IDs: "
            f"{busiest}; the DBC has {len(db.messages)} messages): is it the DBC of this bus?"
        )
    rec = Recording(str(log), str(dbc), db, last - first, counts)
    for m in wanted:
        arrays = {s: np.asarray(v, dtype=float) for s, v in values[m].items()}
        rec.traces[m] = (np.asarray(times[m], dtype=float), arrays)
    return rec


class RecordedDrive:
    """A recording as the evaluator's `SignalSource`: the DBC's messages, the recorded frames."""

    def __init__(self, recording: Recording, scenario: Scenario) -> None:
        self._recording = recording
        self._scenario = scenario
        self._messages: dict[str, Message] = {m.name: m for m in recording.db.messages}

    @property
    def scenario(self) -> Scenario:
        return self._scenario

    def message_periods(self) -> dict[str, float]:
        """Every DBC message (the evaluator asks only whether a message exists); the period is
        the median gap between its recorded frames, 0 when fewer than two were recorded."""
        out: dict[str, float] = {}
        for name in self._messages:
            times = self._recording.traces.get(name, (np.zeros(0), {}))[0]
            out[name] = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
        return out

    def frame_times(self, name: str) -> np.ndarray:
        """When the message was recorded (s on the scenario's clock); empty if never."""
        return self.trace(name)[0]

    def trace(self, name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if name in self._recording.traces:
            return self._recording.traces[name]
        message = self._messages[name]
        return np.zeros(0), {s.name: np.zeros(0) for s in message.signals}


# -- events from labels -----------------------------------------------------------------------


def label_intervals(label: CompiledLabel, recording: Recording, refs: Mapping[str, tuple[str, str]]) -> list[
        tuple[float, float]]:
    """Every maximal interval where `label.when` holds (each signal's samples held until the
    next), at least `min_duration_ms` long. `refs`: signal name -> (message, DBC signal)."""
    names = sorted(label.expression.names)
    stream: list[tuple[float, int, float]] = []
    for k, name in enumerate(names):
        if name not in refs:
            continue  # no CAN source: always unknown
        times, values = recording.samples(*refs[name])
        stream += zip(times.tolist(), [k] * len(times), values.tolist(), strict=True)
    stream.sort(key=lambda e: e[0])  # stable: same-time samples keep their order
    env: dict[str, float] = {}
    out: list[tuple[float, float]] = []
    since: float | None = None
    i = 0
    while i < len(stream):
        t = stream[i][0]
        while i < len(stream) and stream[i][0] == t:
            env[names[stream[i][1]]] = stream[i][2]
            i += 1
        holds = label.expression(env) is True
        if holds and since is None:
            since = t
        elif not holds and since is not None:
            out.append((since, t))
            since = None
    if since is not None:
        out.append((since, recording.duration_s))
    floor_s = label.spec.min_duration_ms / 1000
    return [(a, b) for a, b in out if b - a >= floor_s - 1e-9]


# -- the evaluation ---------------------------------------------------------------------------


@dataclass
class RecordedEvaluation:
    evaluation: Evaluation
    scenario: Scenario
    recording: Recording

    @property
    def result(self) -> dict[str, Any]:
        return self.evaluation.result


def can_refs(config: Config, db: Database) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """(signal -> (message, DBC signal) for the config's CAN signals; problems) against `db`."""
    messages = {m.name: m for m in db.messages}
    refs: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for name, sig in config.signals.items():
        if sig.can is None:
            continue
        message, signal = sig.can.split(".", 1)
        if message not in messages:
            problems.append(f"signal {name!r}: message {message!r} is not in the DBC")
        elif not any(s.name == signal for s in messages[message].signals):
            problems.append(f"signal {name!r}: message {message!r} has no signal {signal!r} in the DBC")
        else:
            refs[name] = (message, signal)
    return refs, problems


def _speed_trace(config: Config, recording: Recording, refs: Mapping[str, tuple[str, str]]) -> DriveCycle:
    """The log's clock as a 1 Hz 'cycle' (for plots): the signal named `speed`, held, when the
    config has one with a CAN source; zeros otherwise."""
    end = recording.duration_s
    grid = [float(k) for k in range(math.floor(end) + 1)]
    if end > grid[-1]:
        grid.append(end)
    if len(grid) < 2:
        grid = [0.0, max(end, 1e-3)]
    speeds = [0.0] * len(grid)
    if "speed" in refs:
        times, values = recording.samples(*refs["speed"])
        if len(times):
            idx = np.searchsorted(times, np.asarray(grid), side="right") - 1
            speeds = [max(float(values[i]), 0.0) if i >= 0 else 0.0 for i in idx.tolist()]
    return DriveCycle(Path(recording.log).name, tuple(grid), tuple(speeds))


def evaluate_recording(
    config: Config,
    log: str | Path,
    dbc: str | Path,
    labels: str | Path,
    *,
    seed: int = 1,
    tick_ms: int = DEFAULT_TICK_MS,
    profile: str | None = None,
    j1939: str = "auto",
    resume_failure_probability: float = 0.0,
    calibration: Calibration | None = None,
    learned: Learned | None = None,
    entry_risk: EntryRisk | None = None,
) -> RecordedEvaluation:
    """Every policy of `run_evaluation` over the recorded drive, scored on the labels' events
    (`calibration`, `learned`, `entry_risk`: what the configured policy learned before, as in
    `run_evaluation`)."""
    name, compiled = load_labels(labels, config.signals)
    db = load_replay_dbc(dbc)
    refs, problems = can_refs(config, db)
    if problems:
        raise RecordedError(f"{dbc}: " + "; ".join(problems))
    wanted: dict[str, set[str]] = {}
    for message, signal in refs.values():
        wanted.setdefault(message, set()).add(signal)
    recording = read_recording(log, dbc, {m: sorted(s) for m, s in wanted.items()}, j1939=j1939)
    intervals = {c.spec.name: label_intervals(c, recording, refs) for c in compiled}
    # Every label event is unannounced to the evaluator (kind `surprise`); its label is kept beside it.
    events = sorted(
        ((ChallengeEvent(EventKind.SURPRISE, a, b, c.spec.deadline_ms), c.spec.name)
         for c in compiled for a, b in intervals[c.spec.name]),
        key=lambda pair: (pair[0].start_s, pair[1]),
    )
    scenario = Scenario(
        name=name,
        cycle=_speed_trace(config, recording, refs),
        seed=seed,
        model=EventModel(),
        events=tuple(e for e, _ in events),
        precursors=(),
        gears=((0.0, 0),),
        maneuvers=(),
        battery_v=(),
        accel_temp_c=(),
    )
    evaluation = run_evaluation(
        config,
        scenario,
        tick_ms=tick_ms,
        profile=profile,
        vehicle=RecordedDrive(recording, scenario),
        resume_failure_probability=resume_failure_probability,
        calibration=calibration,
        learned=learned,
        entry_risk=entry_risk,
    )
    result = evaluation.result
    kinds = [label for _, label in events]
    end_s = result["duration_s"]
    for row, run in zip(result["results"], evaluation.runs, strict=True):
        row["readiness_by_kind"] = _by_label(run, scenario.events, kinds, [c.spec.name for c in compiled], end_s)
    for row, run in zip(result.get("causal_baselines", []), evaluation.baseline_runs, strict=True):
        row["readiness_by_kind"] = _by_label(run, scenario.events, kinds, [c.spec.name for c in compiled], end_s)
    fed = {m for m, (t, _) in recording.traces.items() if len(t)}
    result["log"] = str(log)
    result["dbc"] = str(dbc)
    result["labels"] = [
        {
            "name": c.spec.name,
            "when": c.spec.when,
            "deadline_ms": c.spec.deadline_ms,
            "min_duration_ms": c.spec.min_duration_ms,
            "events": len(intervals[c.spec.name]),
            "intervals": [[round(a, 3), round(b, 3)] for a, b in intervals[c.spec.name]],
        }
        for c in compiled
    ]
    result["recording"] = {
        "frames": recording.counts.get("frames", 0),
        "decoded": recording.counts.get("decoded", 0) + recording.counts.get("tp_decoded", 0),
        "decode_errors": recording.counts.get("decode_errors", 0),
        "unknown_ids": recording.counts.get("unknown_ids", 0),
        "duration_s": round(recording.duration_s, 6),
    }
    result["never_fed"] = sorted(n for n in config.signals if n not in refs or refs[n][0] not in fed)
    return RecordedEvaluation(evaluation, scenario, recording)


def _by_label(
    run: PolicyRun, events: Sequence[ChallengeEvent], kinds: Sequence[str], names: Sequence[str], end_s: float
) -> dict[str, float]:
    """Readiness per label (the evaluator's rule: active by start + deadline, capped at the end)."""
    acc = run.accelerator
    out: dict[str, float] = {}
    for label in names:
        mine = [e for e, k in zip(events, kinds, strict=True) if k == label]
        if mine:
            served = sum(acc.is_active_at(min(e.start_s + e.deadline_ms / 1000, end_s)) for e in mine)
            out[label] = round(served / len(mine), 6)
    return out


# -- sweeps over a recording ------------------------------------------------------------------


def sweep_row(base_text: str, params: dict[str, Any], log: str, dbc: str, labels: str, j1939: str = "auto") -> dict[
        str, Any]:
    """One grid point (`[policy]` overrides) evaluated on the recording: a `sweep` row whose
    `scenario` is the log's file name (runs in a worker process)."""
    from ..config import parse_config
    from .sweep import result_row

    config = parse_config(base_text)
    config = config.model_copy(update={"policy": config.policy.model_copy(update=params)})
    result = evaluate_recording(config, log, dbc, labels, j1939=j1939).result
    return result_row(params, Path(log).name, result["seed"], result)


def sweep_recording(
    base_text: str,
    grid_points: Sequence[dict[str, Any]],
    log: str,
    dbc: str,
    labels: str,
    *,
    workers: int = 1,
    j1939: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Every grid point on the recording, in a process pool when `workers` > 1."""
    rows: list[dict[str, Any]] = []
    if workers <= 1:
        for params in grid_points:
            rows.append(sweep_row(base_text, params, log, dbc, labels, j1939))
            if progress:
                progress(len(rows), len(grid_points))
        return rows
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(sweep_row, base_text, params, log, dbc, labels, j1939) for params in grid_points]
        for fut in as_completed(futures):
            rows.append(fut.result())
            if progress:
                progress(len(rows), len(grid_points))
    keys = sorted(grid_points[0]) if grid_points else []
    rows.sort(key=lambda r: tuple(r[k] for k in keys))
    return rows
