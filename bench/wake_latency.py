"""Wake latency: from another process sending the CAN frame that makes a critical demand true
to the accelerator driver receiving the wake command, through the real daemon.

The daemon (cerebellumd.daemon.runtime.Daemon) runs in this process with the demo
configuration, its CAN bus switched to udp_multicast on loopback and a probe driver that stamps
``time.monotonic()`` when ``async_set_state(ACTIVE)`` is called. A sender process keeps the
background traffic going (so no signal goes stale) and, on request, sends AdasStatus with
CollisionRisk=1 (the demo's `collision` critical demand), stamping ``time.monotonic()`` just
before ``bus.send``. CLOCK_MONOTONIC is system-wide, so the two stamps compare directly.

Each sample waits for the daemon to put the accelerator back to rest first, then fires at a
random phase of the 10 ms tick. The policy is tuned for the bench (short release and dwell,
no wake cap) so samples come quickly; the path measured is the daemon's fast path.

    python bench/wake_latency.py [--samples N] [--load FRAMES_PER_S] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from cerebellumd.accel import AccelState
from cerebellumd.config import Config, builtin_example
from cerebellumd.daemon.runtime import Daemon

RESTING = frozenset({AccelState.IDLE, AccelState.SLEEP, AccelState.OFF})
WAIT_S = 10.0
LOST_AFTER_S = 2.0  # no wake this long after the critical frame: the frame was lost


class ProbeDriver:
    """Accelerator driver that obeys instantly and stamps every wake command."""

    kind: ClassVar[str] = "bench-probe"

    def __init__(self) -> None:
        self.state = AccelState.IDLE
        self.armed = False
        self.woke_at: float | None = None
        self.changed = asyncio.Event()

    async def async_open(self) -> None:
        return None

    async def async_set_state(self, target: AccelState) -> None:
        self.request_now(target)

    def request_now(self, target: AccelState) -> None:
        """EagerAccelerator: the actuator may command a wake synchronously from the decision."""
        if target is AccelState.ACTIVE and self.armed and self.woke_at is None:
            self.woke_at = time.monotonic()
        self.state = target
        self.changed.set()

    async def async_read_state(self) -> AccelState:
        return self.state

    async def async_close(self) -> None:
        return None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        """Wake on each driver command, and poll every ms too: the actuator's task ends (busy
        turns False) after the last command without a driver call."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.001)


class AsyncOnlyProbeDriver(ProbeDriver):
    """The same probe without the synchronous fast path (--no-eager): every command goes
    through the actuator's drive task and async_set_state, as for drivers without it."""

    request_now = None  # type: ignore[assignment]  # not an EagerAccelerator

    async def async_set_state(self, target: AccelState) -> None:
        ProbeDriver.request_now(self, target)


def bench_config() -> Config:
    data = tomllib.loads(builtin_example("demo.toml"))
    data["can"] = [{**data["can"][0], **common.bench_bus_config(data["can"][0]["name"])}]
    data["prometheus"] = {"enabled": False}
    data["mqtt"] = {"enabled": False}
    # Fast turnaround between samples; none of these affect the critical fast path.
    data["policy"].update(release_ms=20, min_dwell_ms=0, max_wake_cycles_per_hour=1_000_000,
                          deepest_state="idle")
    return Config.model_validate(data)


async def read_sent(proc: asyncio.subprocess.Process, seq: int) -> float:
    assert proc.stdout is not None
    while True:
        line = (await proc.stdout.readline()).decode()
        if not line:
            raise RuntimeError("frame sender exited")
        parts = line.split()
        if len(parts) == 3 and parts[0] == "sent" and int(parts[1]) == seq:
            return float(parts[2])


async def measure(samples: int, load: float, eager: bool = True) -> dict[str, Any]:
    probe = ProbeDriver() if eager else AsyncOnlyProbeDriver()
    daemon = Daemon(bench_config(), driver=probe)
    sender = await common.start_sender_async(load)
    assert sender.stdin is not None
    latencies: list[float] = []
    lost = 0
    await daemon.async_start()
    try:
        # Wait for traffic so no signal is stale (a stale collision_risk wakes by design).
        ingest = daemon.ingests[0]
        async with asyncio.timeout(WAIT_S):
            while ingest.frames < 10:
                await asyncio.sleep(0.05)
        for seq in range(samples):
            await probe.wait_for(lambda: probe.state in RESTING and not daemon.actuator.busy)
            await asyncio.sleep(random.uniform(0.0, 0.01))  # random phase against the tick
            probe.woke_at, probe.armed = None, True
            sender.stdin.write(f"fire {seq}\n".encode())
            await sender.stdin.drain()
            sent_at = await read_sent(sender, seq)
            try:
                await probe.wait_for(lambda: probe.woke_at is not None, LOST_AFTER_S)
            except TimeoutError:
                # udp_multicast does not guarantee delivery: on a loaded machine the kernel
                # drops datagrams when a socket buffer is full. Counted, not waited for: one
                # lost frame must not end the run.
                lost += 1
            probe.armed = False
            if probe.woke_at is not None:
                latencies.append(probe.woke_at - sent_at)
            # Background frames carry CollisionRisk=0; clear explicitly as well.
            sender.stdin.write(f"clear {seq}\n".encode())
            await sender.stdin.drain()
            await read_sent(sender, seq)
    finally:
        await daemon.async_stop()
        sender.stdin.close()
        try:
            await asyncio.wait_for(sender.wait(), 5)
        except TimeoutError:
            sender.kill()
            await sender.wait()
    s = common.summary_us(latencies)
    print(f"path: sender bus.send -> udp_multicast -> CanIngest -> Daemon fast path -> "
          f"Actuator -> driver.request_now / async_set_state(ACTIVE); frames ingested "
          f"{ingest.frames}, dropped by the ingest queue {ingest.dropped}; lost wakes {lost}",
          file=sys.stderr)
    return {"samples": len(latencies), "transport": "udp_multicast", "lost": lost, **s}



def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--load", type=float, default=1000.0,
                   help="background CAN frames per second (>= 100: keeps signals fresh)")
    p.add_argument("--no-eager", action="store_true",
                   help="probe driver without request_now (the drive-task path of other drivers)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="CI smoke: 20 samples")
    a = p.parse_args(argv)
    if a.quick:
        a.samples = 20
    if a.load < 100:
        p.error("--load must be >= 100 so the ADAS signals stay fresh")
    r = asyncio.run(measure(a.samples, a.load, eager=not a.no_eager))
    if a.json:
        print(json.dumps(r))
    else:
        print(f"wake latency over {r['transport']} ({r['samples']} samples, {r['lost']} lost): "
              f"p50 {r['p50_us']} us, p99 {r['p99_us']} us, max {r['max_us']} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
