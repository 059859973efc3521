"""Steady-state RSS of the demo daemon, measured from outside with psutil.

Runs ``cerebellumd demo --duration D --speedup X --no-live --port 0`` and samples the RSS of
the process (and any children) every 20 ms. Steady state = the median of the samples in the
second half of the run, after imports and start-up allocations are done; the peak is reported
too.

    python bench/memory.py [--duration D] [--speedup X] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]

SAMPLE_EVERY_S = 0.02


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def measure(duration: float, speedup: float) -> dict[str, Any]:
    exe = shutil.which("cerebellumd")
    cmd = ([exe] if exe else [sys.executable, "-m", "cerebellumd.cli"]) + [
        "demo", "--duration", str(duration), "--speedup", str(speedup), "--no-live",
        "--port", "0"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(child.pid)
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    while child.poll() is None:
        try:
            samples.append((time.monotonic() - t0, tree_rss(proc)))
        except psutil.NoSuchProcess:
            break
        time.sleep(SAMPLE_EVERY_S)
    _, err = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {child.returncode}: {err.strip()[-2000:]}")
    if not samples:
        raise RuntimeError("the demo exited before any RSS sample")
    run_s = samples[-1][0]
    steady = [rss for t, rss in samples if t >= run_s / 2] or [samples[-1][1]]
    mib = 1024 * 1024
    return {"rss_mb": round(statistics.median(steady) / mib, 1),
            "peak_rss_mb": round(max(rss for _, rss in samples) / mib, 1),
            "run_s": round(run_s, 2), "rss_samples": len(samples)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0, help="plant seconds")
    p.add_argument("--speedup", type=float, default=20.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="CI smoke: 10 plant s at 20x")
    a = p.parse_args(argv)
    if a.quick:
        a.duration = 10.0
    r = measure(a.duration, a.speedup)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"demo steady-state RSS {r['rss_mb']} MiB (peak {r['peak_rss_mb']} MiB, "
              f"{r['rss_samples']} samples over {r['run_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
