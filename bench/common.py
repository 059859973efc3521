"""Shared helpers for the benchmarks: percentiles, the project's DBC, cyclictest, and a CAN frame
sender that runs in its own process over python-can's udp_multicast (loopback).

Also a tiny CLI for that sender process (``python bench/common.py send ...``): it is started by
the benches with :func:`start_sender`, never by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# python-can's UdpMulticastBus.DEFAULT_GROUP_IPv4 is 239.74.163.2 (port 43113); the benches use
# a neighbouring group so a concurrently running demo or test on the default group does not
# mix its frames into the measurement.
BENCH_GROUP = "239.74.163.7"
# Per process: two benches running at once on a shared machine (a CI smoke run next to a
# measurement) would otherwise count each other's frames. The sender gets the port via --port.
BENCH_PORT = 44000 + os.getpid() % 1000
CRITICAL_MESSAGE = "AdasStatus"
CRITICAL_SIGNAL = "CollisionRisk"  # the demo config's `collision` critical demand
SENDER_CPU_ENV = "CEREBELLUMD_BENCH_SENDER_CPU"
#: The CPUs this process had before `pin`: cyclictest, the neutral reference, runs on all of them.
_UNPINNED_CPUS: set[int] | None = None


def pin(receiver_cpu: int = 0) -> str:
    """Keep this process on `receiver_cpu` and the senders it starts on another core, as on a
    gateway, where frames come from a CAN controller and not from a process sharing the core.
    (On this 2-vCPU VM it did not narrow the run-to-run spread: docs/PERFORMANCE.md.) Returns a
    description."""
    global _UNPINNED_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return f"not pinned: only CPU {cpus} available"
    receiver = receiver_cpu if receiver_cpu in cpus else cpus[0]
    sender = next(c for c in cpus if c != receiver)
    _UNPINNED_CPUS = set(cpus)
    os.sched_setaffinity(0, {receiver})
    os.environ[SENDER_CPU_ENV] = str(sender)
    return f"receiver on CPU {receiver}, sender on CPU {sender}"


# -- statistics --------------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_us(samples_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p99/max in microseconds of samples given in seconds (None when empty)."""
    if not samples_s:
        return {"p50_us": None, "p99_us": None, "max_us": None}
    s = sorted(samples_s)
    return {"p50_us": round(percentile(s, 50) * 1e6, 1),
            "p99_us": round(percentile(s, 99) * 1e6, 1),
            "max_us": round(s[-1] * 1e6, 1)}


# -- DBC ----------------------------------------------------------------------------------------

def vehicle_dbc_text() -> str:
    return resources.files("cerebellumd").joinpath("data/vehicle.dbc").read_text("utf-8")


def load_vehicle_dbc() -> Any:
    import cantools

    return cantools.database.load_string(vehicle_dbc_text(), database_format="dbc")


# -- cyclictest -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CyclictestResult:
    p50_us: float | None
    p99_us: float | None
    max_us: float | None
    cycles: int
    note: str = ""


def cyclictest_command(interval_us: int, seconds: float, hist_max_us: int,
                       fifo_priority: int = 0) -> list[str] | None:
    exe = shutil.which("cyclictest")
    if exe is None:
        return None
    # Same scheduling class as the ticker under test: SCHED_OTHER unless the bench runs FIFO.
    sched = (["--policy=fifo", "-p", str(fifo_priority)] if fifo_priority > 0
             else ["--policy=other", "-p", "0"])
    return [exe, "-q", "-t", "1", "-i", str(interval_us), "-D", f"{max(1, round(seconds))}",
            "-h", str(hist_max_us), *sched]


def parse_cyclictest_histogram(text: str, hist_max_us: int) -> CyclictestResult:
    """p50/p99 from the ``-h`` histogram (1 us buckets), max from '# Max Latencies'.

    Overflows (> hist_max_us) rank above every bucket; a percentile that lands among them is
    reported as the measured maximum (an upper bound) and flagged in ``note``.
    """
    buckets: list[tuple[int, int]] = []
    overflows = 0
    max_us: float | None = None
    for line in text.splitlines():
        m = re.fullmatch(r"(\d+)\s+(\d+)", line.strip())
        if m:
            count = int(m.group(2))
            if count:
                buckets.append((int(m.group(1)), count))
        elif line.startswith("# Max Latencies:"):
            max_us = float(line.split(":", 1)[1].split()[0])
        elif line.startswith("# Histogram Overflows:"):
            overflows = int(line.split(":", 1)[1].split()[0])
    total = sum(c for _, c in buckets) + overflows
    if total == 0:
        return CyclictestResult(None, None, max_us, 0, "cyclictest produced no samples")
    note = ""

    def pct(q: float) -> float | None:
        nonlocal note
        rank = max(1, math.ceil(q / 100 * total))
        seen = 0
        for us, count in buckets:
            seen += count
            if seen >= rank:
                return float(us)
        note = f"percentile above histogram range ({hist_max_us} us): reported the max"
        return max_us

    return CyclictestResult(pct(50), pct(99), max_us, total, note)


async def run_cyclictest(interval_us: int, seconds: float, hist_max_us: int,
                         fifo_priority: int = 0) -> CyclictestResult:
    cmd = cyclictest_command(interval_us, seconds, hist_max_us, fifo_priority)
    if cmd is None:
        print("cyclictest not found (install rt-tests): reporting nulls", file=sys.stderr)
        return CyclictestResult(None, None, None, 0, "cyclictest missing")
    cpus = _UNPINNED_CPUS
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip()
        print(f"cyclictest failed (rc={proc.returncode}): {msg}", file=sys.stderr)
        return CyclictestResult(None, None, None, 0, f"cyclictest failed: {msg}")
    return parse_cyclictest_histogram(out.decode(), hist_max_us)


# -- frame sender (separate process) ------------------------------------------------------------

def background_frames(db: Any) -> Iterator[tuple[int, bytes]]:
    """An endless, plausible mix of the DBC's messages with rolling counters; CollisionRisk stays
    0 so background traffic never raises the critical demand by itself."""
    dyn = db.get_message_by_name("VehicleDynamics")
    adas = db.get_message_by_name("AdasStatus")
    body = db.get_message_by_name("BodyStatus")
    therm = db.get_message_by_name("AcceleratorThermal")
    k = 0
    while True:
        c = k % 16
        yield dyn.frame_id, dyn.encode({"VehicleSpeed": 50 + (k % 500) / 10, "LongAccel": 0.1,
                                        "Gear": 3, "DynCounter": c})
        if k % 2 == 0:
            yield adas.frame_id, critical_payload(db, False, c)
        if k % 5 == 0:
            yield body.frame_id, body.encode({"BatteryVoltage": 13.8, "Ignition": 1,
                                              "AmbientTemp": 20})
            yield therm.frame_id, therm.encode({"AcceleratorTemp": 45, "RailOn": 1})
        k += 1


def critical_payload(db: Any, active: bool, counter: int = 0) -> bytes:
    adas = db.get_message_by_name(CRITICAL_MESSAGE)
    data: bytes = adas.encode({
        "HighwayAssistAvailable": 0, "HighwayAssistEngaged": 0, "UrbanPerceptionReq": 0,
        "ParkAssistReq": 0, CRITICAL_SIGNAL: int(active), "ParkSearch": 0,
        "TrafficDensity": 10, "ObstacleDistance": 80.0, "AdasCounter": counter})
    return data


def open_bus(group: str = BENCH_GROUP, port: int = BENCH_PORT) -> Any:
    import can

    return can.Bus(interface="udp_multicast", channel=group, port=port, fd=False)


def bench_bus_config(name: str) -> dict[str, Any]:
    """A ``[[can]]`` entry (CanBusConfig fields) for the benches' udp_multicast bus."""
    return {"name": name, "interface": "udp_multicast", "channel": BENCH_GROUP,
            "options": {"port": BENCH_PORT, "fd": False},
            # udp_multicast has no kernel filtering; CanIngest would filter in Python anyway.
            "filters": False}


def _sender_main(args: argparse.Namespace) -> int:
    """Send background frames at --rate for --seconds (0 = until stdin closes); on a stdin line
    'fire SEQ' / 'clear SEQ' send the critical frame with CollisionRisk=1 / 0 and answer
    'sent SEQ MONOTONIC' on stdout (monotonic is system-wide, so the parent can compare)."""
    import can

    # A bench running under SCHED_FIFO forks us with its policy; the load generator must be an
    # ordinary process, like the ECUs it stands for, not a real-time competitor.
    if hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    if os.environ.get(SENDER_CPU_ENV):  # --pin: the sender keeps to its own core
        os.sched_setaffinity(0, {int(os.environ[SENDER_CPU_ENV])})
    db = load_vehicle_dbc()
    bus = open_bus(args.group, args.port)
    adas_id = db.get_message_by_name(CRITICAL_MESSAGE).frame_id
    frames = background_frames(db)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    rate = float(args.rate)
    t0 = time.monotonic()
    end = t0 + args.seconds if args.seconds > 0 else math.inf
    sent = 0
    stdin_open = True
    print("ready", flush=True)
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = math.floor((now - t0) * rate) if rate > 0 else 0
            if args.count > 0:
                due = min(due, args.count)
                if sent >= args.count:
                    break
            while sent < due:  # absolute pacing: a late wake-up sends the backlog, no drift
                arb, data = next(frames)
                bus.send(can.Message(arbitration_id=arb, data=data, is_extended_id=False))
                sent += 1
            next_due = t0 + (sent + 1) / rate if rate > 0 else math.inf
            wait = max(0.0, min(next_due, end, now + 0.05) - time.monotonic())
            if stdin_open:
                ready, _, _ = select.select([sys.stdin], [], [], wait)
                if ready:
                    line = sys.stdin.readline()
                    if not line:
                        stdin_open = False
                        if args.seconds <= 0:
                            break
                        continue
                    cmd, seq = line.split()
                    payload = critical_payload(db, cmd == "fire", int(seq) % 16)
                    msg = can.Message(arbitration_id=adas_id, data=payload, is_extended_id=False)
                    stamp = time.monotonic()  # just before the send: latency includes it
                    bus.send(msg)
                    print(f"sent {seq} {stamp:.9f}", flush=True)
            else:
                time.sleep(wait)
    finally:
        bus.shutdown()
        print(f"done {sent}", file=sys.stderr, flush=True)
    return 0


def start_sender(rate: float, seconds: float, *, interactive: bool = False, count: int = 0,
                 group: str = BENCH_GROUP, port: int = BENCH_PORT) -> subprocess.Popen[str]:
    """Start the sender process and wait for its 'ready' line."""
    proc = subprocess.Popen(
        _sender_argv(rate, seconds, group, port, count),
        stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
        stdout=subprocess.PIPE, text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"frame sender failed to start: {line!r}")
    return proc


def _sender_argv(rate: float, seconds: float, group: str, port: int,
                 count: int = 0) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "send", "--rate", str(rate),
            "--seconds", str(seconds), "--group", group, "--port", str(port),
            "--count", str(count)]


async def start_sender_async(rate: float, *, group: str = BENCH_GROUP,
                             port: int = BENCH_PORT) -> asyncio.subprocess.Process:
    """Interactive sender for benches that run an event loop: runs until its stdin closes;
    'fire SEQ' / 'clear SEQ' lines send the critical frame and answer 'sent SEQ MONOTONIC'."""
    proc = await asyncio.create_subprocess_exec(
        *_sender_argv(rate, 0.0, group, port), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        raise RuntimeError(f"frame sender failed to start: {line!r}")
    return proc


def stop_process(proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send", help="CAN frame sender (used by the benches)")
    s.add_argument("--rate", type=float, default=1000.0, help="background frames per second")
    s.add_argument("--seconds", type=float, default=0.0, help="0 = until stdin closes")
    s.add_argument("--count", type=int, default=0, help="stop after this many frames (0 = no cap)")
    s.add_argument("--group", default=BENCH_GROUP)
    s.add_argument("--port", type=int, default=BENCH_PORT)
    args = p.parse_args(argv)
    return _sender_main(args)


if __name__ == "__main__":
    sys.exit(main())
