"""CPU cost per CAN frame of the work itself, with the wake-ups taken out.

`bench/ingest.py` measures a receiver that sleeps between frames: at 5,000 frames/s each frame
costs a wake-up (epoll or select, the scheduler, the hypervisor on a VM), which is most of the
cost and moves ±30 % from run to run here. This bench fills the receive socket first (frames
sent from this process over udp_multicast on loopback, a batch at a time, below the socket's
buffer) and then drains it, so only the per-frame work is timed:

- bare: python-can's `bus.recv(0)` (select + recvmsg + unpack) and `db.decode_message` of every
  frame, the loop `bench/ingest.py` compares against;
- CanIngest: the daemon's drain of the same socket (`_read_fd`: the backend reader, routing,
  compiled extractors, DBC range checks, the sink), with no time budget.

Both drain the same frames in alternation, `--rounds` times; CPU is `time.process_time()`.
ratio = CanIngest CPU per frame / bare CPU per frame (the median of the per-round ratios).

    python bench/drain_cost.py [--frames N] [--batch N] [--rounds N] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import can

import common
from cerebellumd.config import CanBusConfig, Config, builtin_example
from cerebellumd.daemon.ingest import CanIngest
from cerebellumd.daemon.metrics import Metrics
from cerebellumd.drivers.dbc import load_dbc

PORT = common.BENCH_PORT + 1  # not the port of a bench.ingest run at the same time


def _fill(sender: can.BusABC, frames: list[can.Message]) -> None:
    for msg in frames:
        sender.send(msg)


def _bare_drain(bus: can.BusABC, db: Any) -> tuple[int, float]:
    got = 0
    cpu0 = time.process_time()
    while (msg := bus.recv(0)) is not None:
        db.decode_message(msg.arbitration_id, msg.data)
        got += 1
    return got, time.process_time() - cpu0


async def measure(total: int, batch: int, rounds: int) -> dict[str, Any]:
    demo = Config.model_validate(tomllib.loads(builtin_example("demo.toml")))
    cfg = CanBusConfig.model_validate({**common.bench_bus_config("drain"), "options": {"port": PORT, "fd": False}})
    db = load_dbc(cfg.dbc, cfg.dbc_strict)
    wanted = {tuple(s.can.split(".", 1)): name for name, s in demo.signals.items() if s.can}
    samples = 0

    def sink(got: Sequence[tuple[str, float]], _t: float) -> None:
        nonlocal samples
        samples += len(got)

    gen = common.background_frames(db)
    messages = [can.Message(arbitration_id=arb, data=data, is_extended_id=False)
                for arb, data in (next(gen) for _ in range(batch))]
    sender = common.open_bus(common.BENCH_GROUP, PORT)
    bare_bus = common.open_bus(common.BENCH_GROUP, PORT)
    ingest = CanIngest(cfg, db, wanted, sink, Metrics(buses=["drain"]))  # type: ignore[arg-type]
    await ingest.async_start()
    loop = asyncio.get_running_loop()
    fd = ingest._fd
    assert fd is not None, "udp_multicast is read on the loop"
    loop.remove_reader(fd)  # drained by hand below, after each fill
    ingest._fresh_s = None  # every frame is queued: no "fresh frame ends the drain"
    per_round: list[dict[str, float]] = []
    try:
        for _ in range(rounds):
            bare_n = bare_cpu = ours_n = ours_cpu = 0.0
            for _ in range(max(1, total // batch)):
                # Both sockets are in the group: each fill reaches both; each is drained in turn.
                _fill(sender, messages)
                n, cpu = _bare_drain(bare_bus, db)
                bare_n, bare_cpu = bare_n + n, bare_cpu + cpu
                before = ingest.frames
                cpu0 = time.process_time()
                ingest._read_fd(math.inf)
                ours_cpu += time.process_time() - cpu0
                ours_n += ingest.frames - before
            per_round.append({"bare_us": 1e6 * bare_cpu / bare_n, "daemon_us": 1e6 * ours_cpu / ours_n,
                              "bare_frames": bare_n, "daemon_frames": ours_n})
    finally:
        await ingest.async_stop()
        bare_bus.shutdown()
        sender.shutdown()
    ratios = [r["daemon_us"] / r["bare_us"] for r in per_round]
    lost = sum(batch * max(1, total // batch) - r["daemon_frames"] for r in per_round)
    return {
        "frames_per_round": batch * max(1, total // batch),
        "rounds": rounds,
        "bare_us_per_frame_median": round(statistics.median(r["bare_us"] for r in per_round), 2),
        "daemon_us_per_frame_median": round(statistics.median(r["daemon_us"] for r in per_round), 2),
        "ratio": [round(x, 3) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "frames_not_drained": int(lost),  # the socket buffer overflowed: lower --batch
        "samples": samples,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=20_000, help="frames per round")
    p.add_argument("--batch", type=int, default=100, help="frames queued before each drain (below the socket buffer)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="CI smoke: 2 rounds of 1,000 frames")
    a = p.parse_args(argv)
    if a.quick:
        a.frames, a.rounds = 1000, 2
    r = asyncio.run(measure(a.frames, a.batch, a.rounds))
    if a.json:
        print(json.dumps(r))
    else:
        print(f"per frame, sockets pre-filled: bare {r['bare_us_per_frame_median']} µs, CanIngest "
              f"{r['daemon_us_per_frame_median']} µs; ratio median {r['ratio_median']} "
              f"(min {r['ratio_min']}, max {r['ratio_max']}, {r['rounds']} rounds)"
              + (f"; {r['frames_not_drained']} frames not drained" if r["frames_not_drained"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
