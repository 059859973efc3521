"""`cerebellumd evaluate` and `cerebellumd sweep` (registered into the CLI by cli.py).

Scenario names: `--scenario CYCLE[:VARIANT]`, e.g. `udds` (= `udds:default`) or
`us06:surprise_heavy`; `--cycle PATH` takes any CSV and `--variant` picks the event model.
The JSON reports them apart: "cycle" is the drive cycle, "scenario" the event-model variant.
`--events FILE.toml` gives the event model as a file instead of a variant (its name, default the
file's stem, is reported as "scenario"); it combines with `--scenario CYCLE` or `--cycle PATH`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, builtin_example, load_config, parse_config
from ..extras import installed

if TYPE_CHECKING:
    from rich.table import Table

    from .events import EventModel

# numpy (the evaluator), rich (tables), matplotlib (--plot) and dask (--dask) come with extras:
# they are imported when a command runs, never by `cerebellumd run` building its parser. Nor are
# the drive cycles and event models (pydantic models and the shipped event files, about 0.5 MB
# of `run`'s resident memory, docs/PERFORMANCE.md): the commands import them when they run.


class _ShippedVariants:
    """The shipped event-model names, as argparse `choices`: read when argparse first checks or
    prints them (a `sim` command's arguments, its --help), not when the parser is built."""

    def _names(self) -> list[str]:
        from .events_config import NAMED_MODELS

        return sorted(NAMED_MODELS)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


def register(subparsers: Any) -> None:
    ev = subparsers.add_parser("evaluate", help="fast-forward the policies over a scenario or a recorded drive")
    ev.add_argument("--policy", "--config", dest="policy", metavar="FILE",
                    help="config file (default: the shipped demo)")
    where = ev.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--scenario",
        metavar="CYCLE[:VARIANT]",
        help="shipped cycle and event-model variant (one of --variant's; default: default)",
    )
    where.add_argument("--cycle", metavar="PATH", help="drive cycle CSV (time_s,speed_kmh)")
    where.add_argument("--log", metavar="LOG", help="a recorded CAN log (any python-can format); needs --dbc, --labels")
    ev.add_argument("--dbc", metavar="FILE", help="with --log: the DBC of the recorded bus")
    ev.add_argument(
        "--labels", metavar="FILE.toml", help="with --log: the events ([[labels]]; see `cerebellumd schema --labels`)"
    )
    ev.add_argument("--j1939", default="auto", choices=("auto", "on", "off"),
                    help="with --log: match J1939 messages by PGN, as replay does (default auto)")
    where.add_argument(
        "--day", metavar="FILE.toml",
        help="a day scenario: a shipped one (commuter, delivery_van) or a file (see `cerebellumd schema --day`); "
        "default policy: the shipped examples/parked.toml",
    )
    ev.add_argument(
        # The metavar keeps argparse from listing the choices when the argument is added.
        "--variant", default=None, choices=_ShippedVariants(), metavar="VARIANT",
        help="event-model variant with --cycle: %(choices)s"
    )
    ev.add_argument(
        "--events",
        metavar="FILE.toml",
        help="event model file (see `cerebellumd schema --events`) instead of a shipped variant",
    )
    ev.add_argument("--seed", type=int, default=1)
    ev.add_argument("--json", action="store_true", help="print the JSON object only")
    ev.add_argument(
        "--plot", metavar="FILE.png", help="timeline of every policy and the energy/readiness plane (PNG)"
    )
    ev.add_argument("--profile", metavar="NAME", help="accelerator profile (overrides the config)")
    ev.add_argument(
        "--breakdown", action="store_true",
        help="where the configured policy's accelerator energy went, by reason and state, beside the oracle's "
        "(a day has no oracle); with --json: a `breakdown` key",
    )
    ev.add_argument(
        "--state", metavar="FILE",
        help="start the configured policy from what a daemon learned: its state file (daemon.state_file), "
        "calibration and learned anticipation; default: a first drive, nothing learned",
    )
    ev.add_argument(
        "--save-state", metavar="FILE",
        help="write what the configured policy learned by the end of the drive into this state file (kept: "
        "the file's other contents), for the next --state or for a daemon to start from",
    )
    ev.add_argument(
        "--resume-failure-probability",
        metavar="P",
        type=float,
        default=0.0,
        help="chance that a resume fails and costs the profile's escalation retry (default 0; "
        "drawn per resume from the seed; the oracle never fails)",
    )
    ev.set_defaults(func=cmd_evaluate)

    sw = subparsers.add_parser("sweep", help="grid of policy parameters over scenarios, in parallel")
    sw.add_argument("file", metavar="FILE", help="sweep TOML ([grid], scenarios, seeds)")
    sw.add_argument("--workers", type=int, default=1)
    sw.add_argument("--dask", metavar="ADDR", help="dask.distributed scheduler address")
    sw.add_argument("--out", metavar="PREFIX", default="sweep", help="writes PREFIX.csv and PREFIX.json")
    sw.add_argument(
        "--events",
        metavar="FILE.toml",
        action="append",
        help="event model file(s) for every scenario (repeatable; replaces the sweep file's `events`)",
    )
    sw.add_argument("--log", metavar="LOG", help="sweep the grid on a recorded drive instead of the file's scenarios")
    sw.add_argument("--dbc", metavar="FILE", help="with --log: the DBC of the recorded bus")
    sw.add_argument("--labels", metavar="FILE.toml", help="with --log: the events of the recording")
    sw.add_argument("--j1939", default="auto", choices=("auto", "on", "off"), help="with --log: as in replay")
    sw.set_defaults(func=cmd_sweep)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if not installed(("sim", "evaluate"), *([("plot", "evaluate --plot")] if args.plot else [])):
        return 2
    from rich.console import Console

    from .cycles import CycleError, load_cycle
    from .evaluate import EvaluationError, run_evaluation
    from .events import build_scenario

    if args.day:
        if args.state or args.save_state:
            print("error: --state and --save-state go with one drive (--scenario, --cycle or --log), not --day",
                  file=sys.stderr)
            return 2
        return _evaluate_day(args)
    if args.log is not None:
        return _evaluate_recording(args)
    if args.dbc or args.labels:
        print("error: --dbc and --labels go with --log", file=sys.stderr)
        return 2
    try:
        config = load_config(args.policy) if args.policy else parse_config(builtin_example(), "demo.toml")
        cycle_name, variant, model = scenario_args(args.scenario, args.cycle, args.variant, args.events)
        scenario = build_scenario(load_cycle(cycle_name), args.seed, model, name=variant)
        evaluation = run_evaluation(
            config, scenario, profile=args.profile, resume_failure_probability=args.resume_failure_probability,
            **_learning(args, config),
        )
        _save_learning(args, config, evaluation)
    except (ConfigError, CycleError, EvaluationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # unwrapped: file:line stays greppable
        return 2
    result = evaluation.result
    if args.plot:
        from .plot import plot

        plot(evaluation.runs, scenario, args.plot, result)
    shares = _breakdowns(evaluation.runs) if args.breakdown else {}
    if args.json:
        sys.stdout.write(json.dumps(_with_breakdown(result, shares)) + "\n")
        return 0
    console = Console()
    console.print(result_table(result))
    if shares:
        console.print(breakdown_table(shares, evaluation.runs[0].name))
    return 0


def _breakdowns(runs: Any) -> dict[str, Any]:
    """The configured policy's shares (sim/breakdown.py), and the oracle's where it ran (not in a day)."""
    from .breakdown import breakdown

    mine = runs[0]
    out = {mine.name: breakdown(mine.accelerator.charges, mine.reasons)}
    oracle = next((r for r in runs if r.name == "oracle"), None)
    if oracle is not None:
        out["oracle"] = breakdown(oracle.accelerator.charges, oracle.reasons, "oracle")
    return out


def _with_breakdown(result: dict[str, Any], shares: dict[str, Any]) -> dict[str, Any]:
    if not shares:
        return result
    return {**result, "breakdown": {name: [s.as_dict() for s in rows] for name, rows in shares.items()}}


def breakdown_table(shares: dict[str, Any], mine: str) -> Table:
    """One row per reason, most energy first: its joules, their share, and the time in each state."""
    from rich.table import Table

    from .breakdown import by_reason

    def rows(runs: Any) -> list[tuple[str, float, str]]:
        """(reason, joules, time by state), most joules first."""
        joules = by_reason(runs)
        states: dict[str, list[str]] = {reason: [] for reason in joules}
        for x in sorted(runs, key=lambda x: -x.seconds):
            if x.seconds:
                states[x.reason].append(f"{x.state} {x.seconds:,.1f} s")
        return sorted(((r, j, ", ".join(states[r])) for r, j in joules.items()), key=lambda row: -row[1])

    total = sum(x.energy_j for x in shares[mine])
    title = f"where {mine}'s {total:,.0f} J went"
    if "oracle" in shares:
        bound = sum(x.energy_j for x in shares["oracle"])
        title += f"; the oracle (the lower bound) used {bound:,.0f} J, {total - bound:,.0f} J less"
    table = Table(title=title)
    table.add_column("reason", no_wrap=True)
    table.add_column("J", justify="right")
    table.add_column("% of J", justify="right")
    table.add_column("time by state")
    for reason, joules, states in rows(shares[mine]):
        table.add_row(reason, f"{joules:,.0f}", f"{100 * joules / total:.1f}" if total else "-", states)
    for reason, joules, states in rows(shares.get("oracle", [])):
        table.add_row(f"[dim]{reason}[/dim]", f"[dim]{joules:,.0f}[/dim]", "", f"[dim]{states}[/dim]")
    return table


def _evaluate_recording(args: argparse.Namespace) -> int:
    """`evaluate --log LOG --dbc DBC --labels LABELS.toml`: the policies on a recorded drive."""
    from rich.console import Console

    from .evaluate import EvaluationError
    from .recorded import RecordedError, evaluate_recording
    from .replay import ReplayError, load_replay_dbc

    missing = [flag for flag, value in (("--dbc", args.dbc), ("--labels", args.labels)) if not value]
    if missing or args.variant or args.events:
        print("error: --log needs --dbc and --labels (and takes no --variant or --events)", file=sys.stderr)
        return 2
    try:
        if args.policy:
            config = load_config(args.policy)
            if not _dbc_gate(args.policy, config, load_replay_dbc(args.dbc)):
                print(f"error: a configured CAN signal is not in {args.dbc}", file=sys.stderr)
                return 2
        else:
            config = parse_config(builtin_example(), "demo.toml")
        run = evaluate_recording(
            config, args.log, args.dbc, args.labels, seed=args.seed, profile=args.profile, j1939=args.j1939,
            resume_failure_probability=args.resume_failure_probability, **_learning(args, config),
        )
        _save_learning(args, config, run.evaluation)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 2
    except (RecordedError, ReplayError, EvaluationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run.result
    if args.plot:
        from .plot import plot

        plot(run.evaluation.runs, run.scenario, args.plot, result)
    shares = _breakdowns(run.evaluation.runs) if args.breakdown else {}
    if args.json:
        sys.stdout.write(json.dumps(_with_breakdown(result, shares)) + "\n")
        return 0
    console = Console()
    console.print(result_table(result))
    if shares:
        console.print(breakdown_table(shares, run.evaluation.runs[0].name))
    for label in result["labels"]:
        console.print(f"label {label['name']}: {label['events']} events (when {label['when']}, "
                      f"deadline {label['deadline_ms']} ms, at least {label['min_duration_ms']} ms)")
    if result["never_fed"]:
        console.print(f"never fed by this recording: {', '.join(result['never_fed'])}")
    return 0


def _learning(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """`--state`: what to start the configured policy from, as keyword arguments (none: nothing)."""
    if not args.state:
        return {}
    from ..config import policy_params
    from .learning_state import read_learning

    return read_learning(args.state, policy_params(config)).as_kwargs()


def _save_learning(args: argparse.Namespace, config: Any, evaluation: Any) -> None:
    """`--save-state`: what the configured policy (the first run) learned by the end."""
    if not args.save_state:
        return
    from ..config import policy_params
    from .learning_state import save_learning

    final = evaluation.runs[0].final_state
    save_learning(args.save_state, config, policy_params(config), final, evaluation.result["duration_s"])


def _dbc_gate(path: str, config: Any, db: Any) -> bool:
    """Every `can = "Message.Signal"` against the recording's DBC (as `replay` checks it):
    errors and warnings with file and line on stderr; False if a signal does not resolve."""
    from pathlib import Path

    from ..config.dbc_check import dbc_issues

    result = dbc_issues(config, dict.fromkeys((b.name for b in config.can), db), Path(path).read_text("utf-8"), path)
    for issue in result.warnings:
        print(f"{issue} (warning)", file=sys.stderr)
    for issue in result.errors:
        print(f"error: {issue}", file=sys.stderr)
    return result.ok


def _evaluate_day(args: argparse.Namespace) -> int:
    from importlib import resources

    from rich.console import Console

    from .cycles import CycleError
    from .day import evaluate_day, load_day
    from .evaluate import EvaluationError

    try:
        if args.policy:
            config = load_config(args.policy)
        else:
            text = resources.files("cerebellumd").joinpath("examples", "parked.toml").read_text("utf-8")
            config = parse_config(text, "builtin:parked.toml")
        name, day = load_day(args.day)
        result = evaluate_day(config, name, day, profile=args.profile)
    except (ConfigError, CycleError, EvaluationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        from .day_plot import plot_day

        plot_day(result, args.plot)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    shares = _breakdowns(result["_runs"]) if args.breakdown else {}
    if args.json:
        sys.stdout.write(json.dumps(_with_breakdown(public, shares)) + "\n")
        return 0
    console = Console()
    if not console.is_terminal:  # piped: do not wrap the wide table at 80 columns
        console = Console(width=200)
    console.print(day_table(public))
    if shares:
        console.print(breakdown_table(shares, result["_runs"][0].name))
    return 0


def day_table(result: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(title=f"day {result['day']} ({result['duration_s'] / 3600:.0f} h, {result['trips']} trips, "
                        f"{result['parked_s'] / 3600:.1f} h parked, {result['events']} events)")
    domains = list(result["results"][0]["energy_wh"])
    cols = ["policy", "24 h Wh", *(f"{d} Wh" for d in domains), "parked Wh", *(f"parked {d}" for d in domains),
            "budget min Wh", "power-downs", "key-on ready s (mean/max)", "keep-awake", "readiness"]
    for col in cols:
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in result["results"]:
        ready = r["keyon_ready_s"]
        table.add_row(
            r["policy"], f"{r['energy_wh_total']:.1f}", *(f"{r['energy_wh'][d]:.1f}" for d in domains),
            f"{r['parked_drain_wh_total']:.1f}", *(f"{r['parked_drain_wh'][d]:.2f}" for d in domains),
            "-" if r["budget_min_wh"] is None else f"{r['budget_min_wh']:.2f}",
            ", ".join(f"{k} {v}" for k, v in r["power_downs"].items()) or "0",
            "-" if ready["mean"] is None else f"{ready['mean']:.2f} / {ready['max']:.2f}",
            ", ".join(f"{k} {v}" for k, v in r["keep_awake"].items() if v) or "0",
            f"{r['readiness']:.3f}",
        )
    return table


def scenario_args(
    scenario: str | None, cycle: str | None, variant: str | None, events: str | None
) -> tuple[str, str, EventModel]:
    """(cycle, scenario name, event model) from `--scenario`/`--cycle`, `--variant`, `--events`."""
    from .events_config import load_event_file, named_scenario

    if scenario:
        cycle_name, _, named = scenario.partition(":")
        if variant is not None:
            raise ValueError("--variant goes with --cycle; with --scenario write CYCLE:VARIANT")
    else:
        cycle_name, named = str(cycle), variant or ""
    if events is not None:
        if named:
            raise ValueError(f"both a variant ({named!r}) and --events {events}: give one event model")
        name, model = load_event_file(events)
        return cycle_name, name, model
    named = named or "default"
    return cycle_name, named, named_scenario(named)


def result_table(result: dict[str, Any]) -> Table:
    from rich.table import Table

    rows = {r["policy"]: r for r in result["results"]}
    always_on = rows.get("always_on", {}).get("accelerator_energy_j") or 1.0
    oracle = rows.get("oracle", {}).get("accelerator_energy_j") or 1.0
    table = Table(
        title=f"{result['cycle']}:{result['scenario']} seed {result['seed']} "
        f"({result['duration_s']:.0f} s, {result['events']} events)"
    )
    for col in (
        "policy",
        "accel J",
        "total J",
        "readiness",
        "missed",
        "wakes",
        "false",
        "wake ms",
        "÷ always_on",
        "÷ oracle",
    ):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in result["results"]:
        e = r["accelerator_energy_j"]
        table.add_row(
            r["policy"],
            f"{e:.0f}",
            f"{r['total_energy_j']:.0f}",
            f"{r['readiness']:.3f}",
            str(r["missed_events"]),
            str(r["wake_cycles"]),
            str(r["false_wakes"]),
            f"{r['mean_wake_latency_ms']:.0f}",
            f"{e / always_on:.2f}",
            f"{e / oracle:.2f}",
        )
    return table


def cmd_sweep(args: argparse.Namespace) -> int:
    if not installed(("sim", "sweep"), *([("dask", "sweep --dask")] if args.dask else [])):
        return 2
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .sweep import aggregate, base_text, check_events, load_sweep, pareto, per_world, run_sweep, write_rows

    console = Console()
    try:
        spec = load_sweep(args.file)
        if args.events:
            spec = spec.model_copy(update={"events": list(args.events)})
            check_events(spec)
    except (OSError, ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.log is not None and (not args.dbc or not args.labels or args.dask or args.events or spec.state):
        print("error: sweep --log needs --dbc and --labels (and takes no --dask, --events or `state`)",
              file=sys.stderr)
        return 2
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if args.log is not None:
            # The sweep file's grid and policy on the recording (its scenarios and seeds are not used).
            from .recorded import RecordedError, sweep_recording
            from .sweep import points

            base = base_text(spec)
            try:
                rows = sweep_recording(base, points(spec), args.log, args.dbc, args.labels, workers=args.workers,
                                       j1939=args.j1939, progress=advance)
            except (RecordedError, ConfigError, ValueError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        else:
            rows = run_sweep(spec, workers=args.workers, dask_address=args.dask, progress=advance)
    keys = sorted(spec.grid)
    front = pareto(aggregate(rows, keys))
    table = Table(title="Pareto front: mean accelerator energy vs worst readiness")
    for col in (*keys, "accel J (mean)", "readiness (min)", "runs"):
        table.add_column(col, justify="right")
    for p in front:
        table.add_row(
            *(str(p[k]) for k in keys), f"{p['accelerator_energy_j']:.0f}", f"{p['readiness']:.3f}", str(p["runs"])
        )
    console.print(table)
    worlds = Table(title="Per scenario: readiness mean / worst, energy, vs oracle, runs dominated by a causal baseline")
    for col in (*keys, "scenario", "ready mean", "ready min", "accel J", "÷ oracle", "dominated", "runs"):
        worlds.add_column(col, justify="right")
    for w in per_world(rows, keys):
        worlds.add_row(
            *(str(w[k]) for k in keys), w["scenario"], f"{w['readiness_mean']:.3f}", f"{w['readiness_min']:.3f}",
            f"{w['accelerator_energy_j']:.0f}", f"{w['vs_oracle']:.2f}", str(w["dominated_runs"]), str(w["runs"]),
        )
    console.print(worlds)
    csv_path, json_path = write_rows(rows, args.out)
    console.print(f"{len(rows)} rows written to {csv_path} and {json_path}")
    return 0
