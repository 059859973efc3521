"""Tick jitter of the real Ticker at 10 ms under CAN ingest load, next to cyclictest.

The Ticker runs in this process on the asyncio loop while a separate process sends CAN frames
over python-can udp_multicast (loopback) at --load frames/s; this process ingests and decodes
them with the project's DBC through the daemon's CanIngest (or, if that is unavailable, a
minimal add_reader + recv(0) + cantools reader). cyclictest runs at the same time with the same
interval, duration and scheduling class, as the kernel's reference for this machine.

Lateness = time.monotonic() in the tick callback - the tick's absolute deadline.

    python bench/tick_jitter.py [--seconds S] [--load FRAMES_PER_S] [--runs N] [--json] [--quick]
        [--fifo PRIO] [--uvloop] [--mlockall] [--gc-freeze] [--switch-interval-us US] [--pin]

With --runs N > 1 the measurement is repeated N times (a fresh sender and cyclictest each time)
and the result is {"runs": [one object per run], "ratio_p99": [...], "ratio_p99_median",
"ratio_p99_min", "ratio_p99_max"}: on a shared machine one run's ratio says little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from cerebellumd.daemon.ticker import Ticker, TickInfo


class FrameCounter:
    def __init__(self) -> None:
        self.frames = 0
        self.samples = 0
        self.errors = 0


async def start_daemon_ingest(counter: FrameCounter) -> Callable[[], Any] | None:
    """The daemon's own ingest path; None if it cannot be used here."""
    try:
        from cerebellumd.config import CanBusConfig
        from cerebellumd.daemon.ingest import CanIngest
        from cerebellumd.daemon.metrics import Metrics
        from cerebellumd.drivers.dbc import load_dbc
    except ImportError as exc:
        print(f"daemon ingest unavailable ({exc}); using the bench's own reader",
              file=sys.stderr)
        return None
    cfg = CanBusConfig.model_validate(common.bench_bus_config("bench"))
    db = load_dbc("builtin:vehicle.dbc")
    wanted = {(m.name, s.name): f"{m.name}.{s.name}" for m in db.messages for s in m.signals}

    def sink(samples: Sequence[tuple[str, float]], _t: float) -> None:
        counter.frames += 1
        counter.samples += len(samples)

    ingest = CanIngest(cfg, db, wanted, sink, Metrics(buses=["bench"]))
    await ingest.async_start()

    def stop() -> Any:
        counter.errors = sum(ingest.errors.values()) + ingest.dropped
        return ingest.async_stop()

    return stop


async def start_own_ingest(counter: FrameCounter) -> Callable[[], Any]:
    """Fallback: add_reader on the bus socket, drain with recv(0), decode with a cached Message."""
    loop = asyncio.get_running_loop()
    db = common.load_vehicle_dbc()
    by_id = {m.frame_id: m for m in db.messages}
    bus = common.open_bus()

    def on_readable() -> None:
        while True:
            try:
                msg = bus.recv(0)
            except Exception:  # malformed datagram: count and keep draining
                counter.errors += 1
                continue
            if msg is None:
                return
            m = by_id.get(msg.arbitration_id)
            if m is None:
                counter.errors += 1
                continue
            try:
                counter.samples += len(m.decode(msg.data, decode_choices=False))
                counter.frames += 1
            except Exception:
                counter.errors += 1

    loop.add_reader(bus.fileno(), on_readable)

    async def stop() -> None:
        loop.remove_reader(bus.fileno())
        bus.shutdown()

    return stop


async def measure(seconds: float, load: float, period_s: float, hist_max_us: int,
                  own_ingest: bool, fifo: int = 0) -> dict[str, Any]:
    counter = FrameCounter()
    sender = common.start_sender(load, seconds + 2.0) if load > 0 else None
    try:
        stop_ingest = None if own_ingest else await start_daemon_ingest(counter)
        ingest_path = "CanIngest"
        if stop_ingest is None:
            stop_ingest = await start_own_ingest(counter)
            ingest_path = "own add_reader reader"

        lateness: list[float] = []
        done = asyncio.Event()
        end = time.monotonic() + seconds

        def on_tick(info: TickInfo) -> None:
            lateness.append(info.lateness_s)
            if info.now >= end:
                done.set()

        ticker = Ticker(period_s, on_tick, name="bench")
        ct_task = asyncio.create_task(
            common.run_cyclictest(round(period_s * 1e6), seconds, hist_max_us, fifo))
        ticker.start()
        try:
            await done.wait()
        finally:
            ticker.stop()
        ct = await ct_task
        result = stop_ingest()
        if asyncio.iscoroutine(result):
            await result
    finally:
        if sender is not None:
            common.stop_process(sender)

    s = common.summary_us(lateness)
    ratio = (s["p99_us"] / ct.p99_us
             if s["p99_us"] is not None and ct.p99_us else None)
    print(f"ticker backend={ticker.backend} ingest={ingest_path} frames={counter.frames} "
          f"({counter.frames / seconds:.0f}/s) samples={counter.samples} "
          f"ingest_errors+drops={counter.errors} cyclictest_cycles={ct.cycles} {ct.note}",
          file=sys.stderr)
    return {
        "period_ms": period_s * 1e3,
        "ticks": len(lateness),
        "p50_us": s["p50_us"],
        "p99_us": s["p99_us"],
        "max_us": s["max_us"],
        "overruns": ticker.overruns,
        "load_frames_per_s": load,
        "cyclictest_p50_us": ct.p50_us,
        "cyclictest_p99_us": ct.p99_us,
        "cyclictest_max_us": ct.max_us,
        "ratio_p99": round(ratio, 2) if ratio is not None else None,
    }


def print_table(r: dict[str, Any]) -> None:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:,.1f}"

    print(f"tick jitter: period {r['period_ms']} ms, {r['ticks']} ticks, "
          f"load {r['load_frames_per_s']:.0f} frames/s, overruns {r['overruns']}")
    print(f"{'':12}{'p50 us':>10}{'p99 us':>10}{'max us':>10}")
    print(f"{'Ticker':12}{f(r['p50_us']):>10}{f(r['p99_us']):>10}{f(r['max_us']):>10}")
    print(f"{'cyclictest':12}{f(r['cyclictest_p50_us']):>10}{f(r['cyclictest_p99_us']):>10}"
          f"{f(r['cyclictest_max_us']):>10}")
    print(f"p99 ratio (Ticker / cyclictest): {f(r['ratio_p99'])}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--load", type=float, default=2000.0, help="CAN frames per second")
    p.add_argument("--period-ms", type=float, default=10.0)
    p.add_argument("--hist-max-us", type=int, default=20000,
                   help="cyclictest histogram range (larger samples count as overflows)")
    p.add_argument("--own-ingest", action="store_true",
                   help="use the bench's add_reader reader instead of the daemon's CanIngest")
    p.add_argument("--uvloop", action="store_true", help="run the loop on uvloop")
    p.add_argument("--fifo", type=int, default=0, metavar="PRIO",
                   help="run this process (and cyclictest) at SCHED_FIFO PRIO, as the daemon's "
                        "[realtime] sched_fifo_priority does; 0 = SCHED_OTHER")
    p.add_argument("--mlockall", action="store_true",
                   help="lock memory as the daemon's [realtime] mlockall does")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() start-up objects as the daemon's [realtime] gc_freeze does")
    p.add_argument("--switch-interval-us", type=float, default=0.0,
                   help="sys.setswitchinterval (GIL hand-over between the CAN reader thread and "
                        "the loop; Python's default is 5000 us); 0 = leave the default")
    p.add_argument("--runs", type=int, default=1, help="repeat the measurement; report each, the median "
                                                         "and the spread of ratio_p99")
    p.add_argument("--pin", action="store_true",
                   help="this process (the loop) on CPU 0 as the daemon's [realtime] cpu_affinity = [0] pins it, the "
                        "frame sender on another core (on a gateway the frames come from a CAN controller, not a "
                        "process sharing the core); cyclictest stays on all CPUs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="CI smoke: 3 s at 500 frames/s")
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.load = 3.0, 500.0
    if a.pin:
        print(common.pin(), file=sys.stderr)
    if a.uvloop:
        from cerebellumd.daemon.realtime import install_event_loop_policy_if

        install_event_loop_policy_if(True)
    if a.fifo or a.mlockall:
        from cerebellumd.daemon.realtime import apply_realtime

        # Before any thread exists: the scheduling policy is per thread, inherited at creation.
        class Settings:
            uvloop = False
            cpu_affinity: list[int] = []
            sched_fifo_priority = a.fifo
            mlockall = a.mlockall
            gc_freeze = False

        for msg in apply_realtime(Settings()):
            print(msg, file=sys.stderr)
    if a.gc_freeze:
        from cerebellumd.daemon.realtime import freeze_gc_after_startup

        # The daemon freezes after start-up; here the imports are the start-up.
        print(freeze_gc_after_startup(), file=sys.stderr)
    if a.switch_interval_us > 0:
        sys.setswitchinterval(a.switch_interval_us / 1e6)
    runs = [asyncio.run(measure(a.seconds, a.load, a.period_ms / 1e3, a.hist_max_us, a.own_ingest, a.fifo))
            for _ in range(max(1, a.runs))]
    if len(runs) == 1:
        if a.json:
            print(json.dumps(runs[0]))
        else:
            print_table(runs[0])
        return 0
    ratios = [r["ratio_p99"] for r in runs]
    known = [x for x in ratios if x is not None]
    summary = {"runs": runs, "ratio_p99": ratios,
               "ratio_p99_median": round(statistics.median(known), 2) if known else None,
               "ratio_p99_min": min(known) if known else None,
               "ratio_p99_max": max(known) if known else None}
    if a.json:
        print(json.dumps(summary))
    else:
        for r in runs:
            print_table(r)
            print()
        print(f"ratio_p99 per run: {ratios}; median {summary['ratio_p99_median']}, "
              f"min {summary['ratio_p99_min']}, max {summary['ratio_p99_max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
