"""CPU cost per CAN frame: the daemon's CanIngest vs a bare python-can + cantools loop.

The same deterministic frame sequence is sent twice by a separate process over udp_multicast
(loopback): once to a bare receiver (``bus.recv()`` + ``db.decode_message``), once to the
daemon's ``CanIngest`` (read on the loop, compiled extractors, sink) with the demo
config's signal set. CPU is this process's CPU time (all threads) during each phase; the
sender's CPU is not counted.

frames_per_s = frames / CPU seconds, i.e. what one core could sustain on this machine.
cpu_ratio = (daemon CPU s per frame) / (bare CPU s per frame).

With --runs N > 1 the pair (bare, then CanIngest) is measured N times and the result is
{"runs": [one object per pair], "cpu_ratio": [...], "cpu_ratio_median", "cpu_ratio_min",
"cpu_ratio_max", "daemon_frames_per_s_median", "bare_frames_per_s_median"}.

    python bench/ingest.py [--frames N] [--rate FRAMES_PER_S] [--runs N] [--uvloop] [--floor] [--thread-floor]
                           [--pin] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cantools.database.can import Database

import common
from cerebellumd.config import CanBusConfig, Config, builtin_example
from cerebellumd.daemon.ingest import CanIngest
from cerebellumd.daemon.metrics import Metrics
from cerebellumd.drivers.dbc import load_dbc

IDLE_END_S = 1.0  # no frame for this long after the sender finished = phase over


def bare(frames: int, rate: float) -> tuple[int, float]:
    """Frames received and decoded, CPU seconds."""
    db = common.load_vehicle_dbc()
    bus = common.open_bus()
    got = 0

    def receive() -> None:
        nonlocal got
        while got < frames:
            msg = bus.recv(IDLE_END_S)
            if msg is None:
                break
            db.decode_message(msg.arbitration_id, msg.data)
            got += 1

    cpu = cpu_of(receive, bus, frames, rate)
    return got, cpu


def cpu_of(receive: Callable[[], None], bus: Any, frames: int, rate: float) -> float:
    """CPU seconds of this process while `receive` takes in what a sender process sends at
    `rate` (the sender's own CPU not counted); the bus is shut down after."""
    try:
        sender = common.start_sender(rate, frames / rate + 30, count=frames)
        cpu0 = time.process_time()
        try:
            receive()
            return time.process_time() - cpu0
        finally:
            common.stop_process(sender)
    finally:
        bus.shutdown()


def demo_bus() -> tuple[CanBusConfig, Database, dict[tuple[str, str], str]]:
    """The bench's bus, its DBC, and the demo config's CAN signals (DBC message, signal) -> ours."""
    demo = Config.model_validate(tomllib.loads(builtin_example("demo.toml")))
    cfg = CanBusConfig.model_validate(common.bench_bus_config("bench"))
    wanted = {(m, sig): name for name, s in demo.signals.items() if s.can for m, sig in [s.can.split(".", 1)]}
    return cfg, load_dbc(cfg.dbc, cfg.dbc_strict), wanted


async def daemon_path(frames: int, rate: float) -> tuple[int, float]:
    cfg, db, wanted = demo_bus()
    got = 0

    def sink(_samples: Sequence[tuple[str, float]], _t: float) -> None:
        nonlocal got
        got += 1

    ingest = CanIngest(cfg, db, wanted, sink, Metrics(buses=["bench"]))
    await ingest.async_start()
    try:
        sender = await asyncio.to_thread(
            lambda: common.start_sender(rate, frames / rate + 30, count=frames))
        cpu0 = time.process_time()
        try:
            last, last_change = -1, time.monotonic()
            while ingest.frames < frames:
                if ingest.frames != last:
                    last, last_change = ingest.frames, time.monotonic()
                elif time.monotonic() - last_change > IDLE_END_S:
                    break
                await asyncio.sleep(0.05)
            cpu = time.process_time() - cpu0
        finally:
            common.stop_process(sender)
    finally:
        await ingest.async_stop()
    if ingest.dropped or ingest.errors:
        print(f"CanIngest: dropped {ingest.dropped}, errors {dict(ingest.errors)}",
              file=sys.stderr)
    return ingest.frames, cpu


async def loop_floor(frames: int, rate: float) -> tuple[int, float]:
    """The asyncio floor: add_reader + recv(0) until None, nothing decoded or handed on."""
    loop = asyncio.get_running_loop()
    bus = common.open_bus()
    fd = bus.fileno()
    got = 0
    last_change = time.monotonic()

    def on_readable() -> None:
        nonlocal got, last_change
        while bus.recv(0) is not None:
            got += 1
        last_change = time.monotonic()

    loop.add_reader(fd, on_readable)
    try:
        sender = await asyncio.to_thread(lambda: common.start_sender(rate, frames / rate + 30, count=frames))
        cpu0 = time.process_time()
        try:
            while got < frames and time.monotonic() - last_change < IDLE_END_S + 1.0:
                await asyncio.sleep(0.05)
            cpu = time.process_time() - cpu0
        finally:
            common.stop_process(sender)
    finally:
        loop.remove_reader(fd)
        bus.shutdown()
    return got, cpu


def thread_floor(frames: int, rate: float) -> tuple[int, float]:
    """What a reader thread that decodes off the loop could reach at best: one blocking
    `recvmsg` per frame (no select; the kernel's SO_RCVTIMEO ends the phase), python-can's
    `unpack_message`, the same routes and compiled extractors as CanIngest, the range check, and
    the samples stored under a lock (the loop would read them at its tick). Nothing is handed to
    the loop, no NM tap, no J1939, no counters: a lower bound for that design, not a daemon."""
    import socket
    import struct
    import threading

    from can.interfaces.udp_multicast.utils import unpack_message

    cfg, db, wanted = demo_bus()
    routes = CanIngest(cfg, db, wanted, lambda _s, _t: None, Metrics(buses=["bench"]))._routes
    bus = common.open_bus()
    multicast: Any = bus._multicast
    sock: socket.socket = multicast._socket
    sock.settimeout(None)  # blocking, no poll before each read ...
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(IDLE_END_S), 0))  # ... but ends
    stamp = struct.Struct(str(multicast.received_timestamp_struct))
    size, ancillary = int(multicast.max_buffer), int(multicast.received_ancillary_buffer_size)
    store: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()
    got = 0

    def read() -> None:
        nonlocal got
        while got < frames:
            try:
                data, anc, _flags, _sender = sock.recvmsg(size, ancillary)
            except OSError:  # SO_RCVTIMEO: the sender is done
                return
            seconds, nanoseconds = stamp.unpack(anc[0][2])
            msg = unpack_message(data, replace={"timestamp": seconds + nanoseconds * 1e-9}, check=True)
            got += 1
            route = routes.get((msg.arbitration_id, msg.is_extended_id))
            if route is None or not route.wanted or route.extract is None:
                continue
            values = route.extract(msg.data)
            samples = [(w[1], float(v)) for w, v in zip(route.wanted, values, strict=True) if w[2] <= v <= w[3]]
            with lock:
                for name, value in samples:
                    store[name] = (value, msg.timestamp)

    def receive() -> None:
        reader = threading.Thread(target=read, name="thread-floor")
        reader.start()
        reader.join()

    cpu = cpu_of(receive, bus, frames, rate)
    return got, cpu


def measure(frames: int, rate: float, uvloop: bool = False, floor: bool = False,
            threaded: bool = False) -> dict[str, Any]:
    bare_n, bare_cpu = bare(frames, rate)
    if uvloop:  # the daemon's [realtime] uvloop = true
        import uvloop as uv

        d_n, d_cpu = uv.run(daemon_path(frames, rate))
    else:
        d_n, d_cpu = asyncio.run(daemon_path(frames, rate))
    print(f"bare: {bare_n} frames, {bare_cpu:.3f} CPU s; CanIngest: {d_n} frames, "
          f"{d_cpu:.3f} CPU s (sent {frames} at {rate:.0f}/s)", file=sys.stderr)
    bare_per = bare_cpu / bare_n if bare_n else float("nan")

    def against_bare(n: int, cpu: float) -> tuple[int | None, float | None]:
        """Frames per CPU-second, and CPU per frame over the bare loop's (None where undefined)."""
        return (round(n / cpu) if n and cpu > 0 else None,
                round((cpu / n) / bare_per, 2) if n and bare_per > 0 else None)

    result: dict[str, Any] = {"frames": frames, "bare_frames_per_s": round(1 / bare_per) if bare_per > 0 else None}
    result["daemon_frames_per_s"], result["cpu_ratio"] = against_bare(d_n, d_cpu)
    if floor:
        # The design the daemon follows (reads on the loop), doing nothing with the frames: its
        # CPU per frame against the bare loop's is the least a cpu_ratio on this loop can be.
        result["floor_frames_per_s"], result["floor_cpu_ratio"] = against_bare(*asyncio.run(loop_floor(frames, rate)))
    if threaded:
        result["thread_floor_frames_per_s"], result["thread_floor_cpu_ratio"] = against_bare(
            *thread_floor(frames, rate))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=50_000)
    p.add_argument("--rate", type=float, default=5000.0, help="sender frames per second")
    p.add_argument("--runs", type=int, default=1, help="repeat the pair; report each, the median and spread")
    p.add_argument("--uvloop", action="store_true", help="run CanIngest on uvloop (the daemon's [realtime] uvloop)")
    p.add_argument("--floor", action="store_true", help="also measure a bare asyncio add_reader + recv(0) reader that "
                                                        "decodes nothing (floor_frames_per_s, floor_cpu_ratio: "
                                                        "the least cpu_ratio a reader on the loop can have)")
    p.add_argument("--thread-floor", action="store_true",
                   help="also measure a reader thread that decodes off the loop with a blocking recvmsg and hands "
                        "nothing to it (thread_floor_frames_per_s, thread_floor_cpu_ratio): a lower bound")
    p.add_argument("--pin", action="store_true", help="receiver on CPU 0, sender on another core")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="CI smoke: 5,000 frames")
    a = p.parse_args(argv)
    if a.quick:
        a.frames = 5000
    if a.pin:
        print(common.pin(), file=sys.stderr)
    runs = [measure(a.frames, a.rate, a.uvloop, a.floor, a.thread_floor) for _ in range(max(1, a.runs))]
    if len(runs) > 1:
        ratios = [x["cpu_ratio"] for x in runs]
        known = [x for x in ratios if x is not None]

        def median_of(key: str) -> float | None:
            values = [x[key] for x in runs if x[key] is not None]
            return round(statistics.median(values)) if values else None

        summary = {"runs": runs, "cpu_ratio": ratios,
                   "cpu_ratio_median": round(statistics.median(known), 2) if known else None,
                   "cpu_ratio_min": min(known) if known else None, "cpu_ratio_max": max(known) if known else None,
                   "daemon_frames_per_s_median": median_of("daemon_frames_per_s"),
                   "bare_frames_per_s_median": median_of("bare_frames_per_s")}
        floors = [x["floor_cpu_ratio"] for x in runs if x.get("floor_cpu_ratio") is not None]
        if floors:
            summary["floor_cpu_ratio"] = floors
            summary["floor_cpu_ratio_median"] = round(statistics.median(floors), 2)
        print(json.dumps(summary) if a.json else
              f"cpu_ratio per run {ratios}: median {summary['cpu_ratio_median']} (min {summary['cpu_ratio_min']}, "
              f"max {summary['cpu_ratio_max']}); CanIngest {summary['daemon_frames_per_s_median']} frames/CPU-s, "
              f"bare {summary['bare_frames_per_s_median']} (medians)"
              + (f"; asyncio floor cpu_ratio {summary['floor_cpu_ratio']}: median {summary['floor_cpu_ratio_median']}"
                 if floors else ""))
        return 0
    r = runs[0]
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['frames']} frames: CanIngest {r['daemon_frames_per_s']} frames/CPU-s, "
              f"bare {r['bare_frames_per_s']} frames/CPU-s, CPU ratio {r['cpu_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
