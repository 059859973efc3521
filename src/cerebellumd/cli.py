"""The `cerebellumd` command line. The only module that wires `daemon` and `sim` together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, builtin_example, load_config, parse_config
from .extras import installed


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _dbc_gate(path: str, config: Config, replay_dbc: object = None) -> bool:
    """Every `can = "Message.Signal"` against its bus's DBC (or, for replay, the log's DBC):
    warnings and errors on stderr; False if a signal does not resolve."""
    from .config.dbc_check import check_text, dbc_issues

    text = Path(path).read_text("utf-8")
    if replay_dbc is None:
        result = check_text(config, text, path)
    else:
        result = dbc_issues(config, dict.fromkeys((b.name for b in config.can), replay_dbc), text, path)  # type: ignore[arg-type]
    for issue in result.warnings:
        print(f"{issue} (warning)", file=sys.stderr)
    for issue in result.errors:
        print(issue, file=sys.stderr)
    return result.ok


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    if not _dbc_gate(args.file, config):
        return 1
    if args.here and not _host_gate(args.file, config):
        return 1
    print("OK")
    return 0


def _host_gate(path: str, config: Config) -> bool:
    """`check --here`: the config on this machine (daemon/preflight.py); issues on stderr with
    file and line; False if any is an error."""
    from .config import ConfigIssue, _dotted, locate
    from .daemon.preflight import check_host

    text = Path(path).read_text("utf-8")
    issues = check_host(config, path)
    for issue in issues:
        line = ConfigIssue(path, locate(text, issue.loc) if issue.loc else None, _dotted(issue.loc), issue.message)
        print(f"{line} (warning)" if issue.severity == "warning" else line, file=sys.stderr)
    return not any(issue.severity == "error" for issue in issues)


def _cmd_schema(args: argparse.Namespace) -> int:
    if args.labels:
        from .sim.labels import labels_schema

        print(json.dumps(labels_schema(), indent=2))
        return 0
    if args.day:
        from .sim.day import day_schema

        print(json.dumps(day_schema(), indent=2))
        return 0
    if args.events:
        from .sim.events_config import event_schema

        print(json.dumps(event_schema(), indent=2))
        return 0
    print(json.dumps(Config.model_json_schema(by_alias=True), indent=2))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .daemon.status import MqttTarget, StatusError, read_status, render_table, render_text

    try:
        mqtt = None
        if args.mqtt:
            mqtt = MqttTarget.parse(args.mqtt, node=args.node, prefix=args.prefix,
                                    username=args.username, password=args.password)
        status = read_status(args.url, mqtt, args.wait)
    except StatusError as exc:
        print(f"cerebellumd status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status))
        return 0
    try:
        from rich.console import Console
    except ModuleNotFoundError as exc:  # rich is optional (extra "sim"): plain lines without it
        if exc.name != "rich":
            raise
        print(render_text(status))
    else:
        Console().print(render_table(status))
    return 0


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, reload_cb: object = None) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if reload_cb is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_cb)  # type: ignore[arg-type]


async def _async_run(config: Config, config_path: str | None, speedup: float = 1.0) -> int:
    from .daemon.clock import Clock
    from .daemon.realtime import after_startup
    from .daemon.runtime import Daemon

    daemon = await Daemon.async_create(config, config_path=config_path, clock=Clock(scale=speedup))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reload_tasks: set[asyncio.Task[bool]] = set()

    def settle(_: object = None) -> None:  # garbage collected, gc.freeze, malloc_trim
        after_startup(daemon.config.realtime)

    def reload() -> None:
        task = loop.create_task(daemon.async_reload())
        reload_tasks.add(task)
        task.add_done_callback(reload_tasks.discard)
        task.add_done_callback(settle)

    _install_signal_handlers(loop, stop, reload)
    await daemon.async_run(stop, started=settle)
    # Steps that failed on the way out were logged and did not keep the safe state from being
    # commanded; only a safe state that could not be commanded makes the stop a failure.
    return 0 if daemon.assembly.safe_state_reached else 1


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    if any(bus.interface == "udp_multicast" for bus in config.can) and not installed(("multicast", "run")):
        return 2  # python-can's udp_multicast needs msgpack
    if not _dbc_gate(args.config, config):
        print("cerebellumd run: refusing to start: a configured CAN signal is not in its DBC", file=sys.stderr)
        return 1
    from .daemon.assembly import StartError
    from .daemon.realtime import apply_realtime, install_event_loop_policy_if

    install_event_loop_policy_if(config.realtime.uvloop)
    apply_realtime(config.realtime)
    try:
        return asyncio.run(_async_run(config, args.config, args.speedup))
    except StartError as exc:  # what failed and why, in one line rather than a traceback
        print(f"cerebellumd run: cannot start: {exc}", file=sys.stderr)
        return 1


async def _async_demo(args: argparse.Namespace, config: Config) -> int:
    import can
    from rich.console import Console
    from rich.live import Live

    from .daemon.clock import Clock
    from .daemon.live import render
    from .daemon.runtime import Daemon
    from .drivers.dbc import load_dbc
    from .sim.cycles import load_cycle
    from .sim.events import build_scenario
    from .sim.plant import async_drive
    from .sim.vehicle import VirtualVehicle

    prometheus = config.prometheus.model_copy(update={"port": args.port, "address": args.address})
    config = config.model_copy(update={"prometheus": prometheus})
    cycle = await asyncio.to_thread(load_cycle, args.cycle)
    scenario = build_scenario(cycle, args.seed)
    bus_cfg = config.can[0]
    db = await asyncio.to_thread(load_dbc, bus_cfg.dbc, bus_cfg.dbc_strict)
    vehicle = VirtualVehicle(scenario, db)
    clock = Clock(scale=args.speedup)
    daemon = await Daemon.async_create(config, clock=clock)
    stop = asyncio.Event()
    _install_signal_handlers(asyncio.get_running_loop(), stop)
    duration = args.duration if args.duration is not None else cycle.duration_s
    plant_bus = await asyncio.to_thread(
        can.Bus, interface=bus_cfg.interface, channel=bus_cfg.channel, **bus_cfg.options)
    console = Console(stderr=False)
    # The vehicle starts first, as a car's ECUs do: the daemon then finds traffic on the bus
    # instead of declaring every signal stale while the plant is still getting up.
    start = clock.now()
    plant = asyncio.create_task(async_drive(vehicle, plant_bus, clock.now, stop, start=start, until=duration))
    await daemon.async_start()
    print(f"cerebellumd demo: {cycle.name} seed {args.seed} at speed-up {args.speedup:g}; "
          f"metrics on http://{config.prometheus.address}:{daemon.port}/metrics", flush=True)
    live_enabled = not args.no_live and console.is_terminal
    try:
        if live_enabled:
            title = f"cerebellumd demo — {cycle.name}"
            with Live(render(daemon.snapshot(), title, start=start), console=console, refresh_per_second=4) as live:
                while not stop.is_set() and not plant.done():
                    live.update(render(daemon.snapshot(), title, start=start))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.25)
        else:
            await asyncio.wait({plant, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        await asyncio.gather(plant, return_exceptions=True)
        snap = daemon.snapshot()
        await daemon.async_stop()
        await asyncio.to_thread(plant_bus.shutdown)
    summary = {
        "cycle": cycle.name, "seed": args.seed, "speedup": args.speedup,
        "plant_seconds": round(snap.time - start, 1), "events": len(scenario.events),
        "wakes": snap.wakes, "sleeps": snap.sleeps, "frames": snap.frames,
        "joules": {k: round(v, 1) for k, v in snap.joules.items()},
    }
    print(json.dumps(summary), flush=True)
    return 0


#: Wall-clock jitter the demo tolerates (a busy 2-core machine stalls for up to ~100 ms).
DEMO_WALL_JITTER_S = 0.1


def fit_to_speedup(config: Config, speedup: float) -> Config:
    """At speed-up S, wall-clock jitter lasts S times longer in plant time: a 100 ms stall at
    50x is 5 s of plant time. Signal ages and bus silence below that cannot be honoured, so
    they are raised to it (and said so) instead of producing stale-signal wakes."""
    floor_ms = int(speedup * DEMO_WALL_JITTER_S * 1000)
    if all(s.max_age_ms >= floor_ms for s in config.signals.values()):
        return config
    logging.getLogger("cerebellumd.demo").info(
        "speed-up %g: signal max_age_ms raised to at least %d ms of plant time", speedup, floor_ms)
    signals = {n: s.model_copy(update={"max_age_ms": max(s.max_age_ms, floor_ms)}) for n, s in config.signals.items()}
    buses = [b.model_copy(update={"silence_timeout_ms": max(b.silence_timeout_ms, 2 * floor_ms)}) for b in config.can]
    return config.model_copy(update={"signals": signals, "can": buses})


def _cmd_demo(args: argparse.Namespace) -> int:
    if not installed(("sim", "demo")):  # the virtual vehicle is numpy
        return 2
    try:
        text = Path(args.config).read_text("utf-8") if args.config else builtin_example()
        config = parse_config(text, args.config or "builtin:demo.toml")
    except (OSError, ConfigError) as exc:
        print(exc, file=sys.stderr)
        return 1
    from .daemon.assembly import StartError

    try:
        return asyncio.run(_async_demo(args, fit_to_speedup(config, args.speedup)))
    except StartError as exc:
        print(f"cerebellumd demo: cannot start: {exc}", file=sys.stderr)
        return 1


def _cmd_sim(args: argparse.Namespace) -> int:
    """The plant as its own process over real transports, for HIL against `run` (docs/hil.md)."""
    if not installed(("sim", "sim")):  # the virtual vehicle is numpy
        return 2
    from pydantic import ValidationError

    from .sim.hil import async_run_sim, load_sim_config

    try:
        config = load_sim_config(args.config)
    except (OSError, ValueError, ValidationError) as exc:  # tomllib and pydantic errors are ValueErrors
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 1
    overrides = {k: v for k, v in (("cycle", args.cycle), ("seed", args.seed), ("speedup", args.speedup),
                                   ("duration_s", args.duration)) if v is not None}
    config = config.model_copy(update={"plant": config.plant.model_copy(update=overrides)})

    async def main() -> int:
        stop = asyncio.Event()
        _install_signal_handlers(asyncio.get_running_loop(), stop)
        await async_run_sim(config, stop, out=lambda line: print(line, flush=True))
        return 0

    return asyncio.run(main())


def _cmd_replay(args: argparse.Namespace) -> int:
    """A recorded CAN log through decoding and the policy, in fast-forward."""
    from .sim.replay import ReplayError, format_replay, load_replay_dbc, replay

    config = None
    try:
        if args.config:
            config = load_config(args.config)
            if not _dbc_gate(args.config, config, load_replay_dbc(args.dbc)):
                print(f"cerebellumd replay: refusing: a configured CAN signal is not in {args.dbc}", file=sys.stderr)
                return 1
        result = replay(args.log, args.dbc, config, plot=args.plot, j1939=args.j1939)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    except ReplayError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(format_replay(result))
    return 0


def _cmd_discover(args: argparse.Namespace) -> int:
    """Which signals a recording carries, and which look like speed, gear, ignition, ..."""
    from .discover import DiscoverError, discover, render, suggest_config

    try:
        result = discover(args.log, args.dbc)
    except DiscoverError as exc:
        print(f"cerebellumd discover: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # piped into a file or a doc: do not wrap at 80 columns
            console = Console(width=150)
        console.print(*render(result, top=args.top))
    if args.suggest:
        Path(args.suggest).write_text(suggest_config(result, args.dbc), encoding="utf-8")
        print(f"wrote {args.suggest}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `evaluate --log` must not read as an abbreviation of the global `--log-level`.
    parser = argparse.ArgumentParser(prog="cerebellumd", description=__doc__, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"cerebellumd {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="human", choices=["human", "json"])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run everything on embedded defaults, no hardware")
    demo.add_argument("--duration", type=float, default=None, help="plant seconds to run (default: the whole cycle)")
    demo.add_argument("--speedup", type=float, default=1.0, help="time runs this many times faster")
    demo.add_argument("--cycle", default="udds", help="shipped cycle name or CSV path")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--config", default=None, help="config file (default: the shipped examples/demo.toml)")
    demo.add_argument("--port", type=int, default=9108, help="metrics port (0 = any free port)")
    demo.add_argument("--address", default="127.0.0.1", help="metrics bind address")
    demo.add_argument("--no-live", action="store_true", help="no live terminal view")
    demo.set_defaults(func=_cmd_demo)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True)
    run.add_argument("--speedup", type=float, default=1.0,
                     help="policy time runs this many times faster (HIL against `sim --speedup`; default 1)")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    check.add_argument("--here", action="store_true",
                       help="also check it against this machine: CAN interfaces, serial ports, addresses and "
                            "ports, directories, the MQTT broker, hwmon sensors (run it on the target)")
    check.set_defaults(func=_cmd_check)

    schema = sub.add_parser("schema", help="print the JSON Schema of the config")
    schema.add_argument("--events", action="store_true", help="the schema of an event file (evaluate --events)")
    schema.add_argument("--labels", action="store_true", help="the schema of a labels file (evaluate --log --labels)")
    schema.add_argument("--day", action="store_true", help="the schema of a day file (evaluate --day)")
    schema.set_defaults(func=_cmd_schema)

    status = sub.add_parser("status", help="show a running daemon's state (metrics endpoint or MQTT)")
    status.add_argument("--url", default="http://127.0.0.1:9108/metrics", help="the daemon's metrics URL")
    status.add_argument("--mqtt", metavar="HOST:PORT", default=None, help="read the retained MQTT state instead")
    status.add_argument("--node", default="gateway", help="[daemon] node of the daemon (MQTT)")
    status.add_argument("--prefix", default="cerebellumd", help="[mqtt] prefix (MQTT)")
    status.add_argument("--username", default=None, help="MQTT username (a viewer is enough)")
    status.add_argument("--password", default=None, help="MQTT password")
    status.add_argument("--wait", type=float, default=5.0, help="seconds to wait for an answer")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_cmd_status)

    sim = sub.add_parser("sim", help="the plant as its own process over real transports (HIL against run)")
    sim.add_argument("--config", required=True, help="sim config TOML (see examples/hil-sim.toml)")
    sim.add_argument("--cycle", default=None, help="shipped cycle name or CSV path (overrides the config)")
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument("--speedup", type=float, default=None, help="plant time runs this many times faster")
    sim.add_argument("--duration", type=float, default=None, help="plant seconds to run")
    sim.set_defaults(func=_cmd_sim)

    replay = sub.add_parser("replay", help="feed a recorded CAN log through decoding and the policy")
    replay.add_argument("log", help="candump .log, .asc, .blf, .trc, ... (anything can.LogReader reads)")
    replay.add_argument("--dbc", required=True, help="DBC of the log's bus")
    replay.add_argument("--config", default=None, help="daemon config (its signals and policy); none: decode only")
    replay.add_argument("--json", action="store_true", help="print one JSON object")
    replay.add_argument("--plot", default=None, metavar="FILE.png",
                        help="draw the configured signals, demands and accelerator state (needs --config)")
    replay.add_argument("--j1939", default="auto", choices=["auto", "on", "off"],
                        help="J1939 matching by PGN and transport reassembly: auto = the DBC's J1939 messages, "
                        "on = every extended message, off = exact IDs")
    replay.set_defaults(func=_cmd_replay)

    disc = sub.add_parser("discover", help="statistics of a recording and the signals that look like speed, gear, ...")
    disc.add_argument("log", help="candump .log, .asc, .blf, .trc, ... (anything can.LogReader reads)")
    disc.add_argument("--dbc", required=True, help="DBC of the log's bus")
    disc.add_argument("--json", action="store_true", help="print one JSON object")
    disc.add_argument("--suggest", default=None, metavar="FILE.toml",
                      help="write a starting config for the roles found")
    disc.add_argument("--top", type=int, default=25, help="rows of the most-active-signals table")
    disc.set_defaults(func=_cmd_discover)

    from .sim import commands as sim_commands  # argparse only: the evaluator is imported when it runs

    sim_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
