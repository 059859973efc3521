"""Memory and start-up of `cerebellumd run` on the demo config, fed by `cerebellumd sim`.

Two real processes: `cerebellumd sim` (the plant, the virtual vehicle at speed-up 1) sends the
vehicle's frames over python-can's udp_multicast on a private port; `cerebellumd run` decides on
them with the shipped demo config, its virtual bus replaced by that udp_multicast bus.

- start_to_ready_s: from just before the daemon's spawn to its systemd READY=1, received on a
  NOTIFY_SOCKET this bench owns (the daemon sends it once its tickers are started).
- start_to_first_tick_s: to the first metrics scrape that shows a decision tick (scraped every
  5 ms from READY on: an upper bound by one scrape).
- rss_mb: median VmRSS of the daemon process alone (/proc/PID/status), sampled every 100 ms
  after a warm-up; rss_max_mb the largest sample; sim_rss_mb the plant's, for reference.
- pss_mb, uss_mb: at the end of the sampling, from /proc/PID/smaps_rollup: the proportional set
  (shared pages divided among the processes that map them) and the unique set (pages only this
  process maps: what stopping it frees). RSS counts shared libraries (libpython, libcrypto,
  pydantic-core) whole, which other Python processes on the gateway share.
- floor_rss_mb: the baseline of the same run. `bench/library_floor.py` does the daemon's job
  with the base install's libraries and none of cerebellumd's code (cantools DBC, one pydantic
  model, the same python-can bus read on an asyncio loop with `decode_message`, a
  prometheus-client counter over HTTP, sdnotify), fed by the same plant and sampled the same way
  after the daemon has stopped. rss_over_floor_mb is what cerebellumd adds to it.
- import_ms: `python -X importtime` of what `run` imports (the CLI, its parser, the daemon
  runtime): self time summed per top-level package, the largest ones, plus the total.
- Bytecode, as installed: every process runs with a private PYTHONPYCACHEPREFIX that one start
  of the daemon (to READY=1, then SIGTERM) fills first. Without it, from a source tree with
  PYTHONDONTWRITEBYTECODE set (as here and in CI), the daemon would compile its own modules at
  every start: about 0.1 s more to READY and RSS left behind by the compiler, which an installed
  daemon (pip byte-compiles at install) does not have. "bytecode_warmup_s" is that first start.
- --optimize N: the daemon (and its bytecode) at PYTHONOPTIMIZE=N, as a deployment that sets it
  (N = 2 drops docstrings and asserts; docs/PERFORMANCE.md).

    python bench/startup_memory.py [--warmup S] [--seconds S] [--optimize N] [--json] [--quick]

Measures whatever `cerebellumd` PYTHONPATH points at: run it with PYTHONPATH=<tree>/src to
compare two trees on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

GROUP = "239.74.163.8"  # not the default group: a concurrent HIL run does not mix in
TOP_IMPORTS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_config(udp_port: int, metrics_port: int) -> str:
    from cerebellumd.config import builtin_example

    text = builtin_example()
    can_block = (
        '[[can]]\nname = "vehicle"\ninterface = "udp_multicast"\n'
        f'channel = "{GROUP}"\ndbc = "builtin:vehicle.dbc"\n'
        f"silence_timeout_ms = 1000\n[can.options]\nport = {udp_port}\n\n"
    )
    text, n = re.subn(r"\[\[can\]\].*?(?=# -- signals)", can_block, text, flags=re.S)
    if n != 1:
        raise RuntimeError("the demo config has no [[can]] block to replace")
    return text.replace("port = 9108", f"port = {metrics_port}")


def sim_config(udp_port: int) -> str:
    return ('[plant]\ncycle = "udds"\nseed = 1\nspeedup = 1.0\n\n'
            f'[can]\ninterface = "udp_multicast"\nchannel = "{GROUP}"\noptions = {{ port = {udp_port} }}\n'
            'dbc = "builtin:vehicle.dbc"\n')


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def smaps_rollup_kb(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup's kB fields (Linux 4.14+): Pss, Private_Clean, Private_Dirty, ..."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) == 2 and fields[1] == "kB":
            out[key] = int(fields[0])
    return out


def scrape(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                key = name.split("{", 1)[0]
                out[key] = out.get(key, 0.0) + float(value)
    return out


def import_times(env: dict[str, str]) -> dict[str, Any]:
    """Self import time per top-level package of what `cerebellumd run` imports."""
    code = ("import cerebellumd.cli as c; c.build_parser(); import cerebellumd.daemon.runtime")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                          capture_output=True, text=True, check=True, env=env)
    per_top: dict[str, int] = defaultdict(int)
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            per_top[m.group(4).partition(".")[0]] += int(m.group(1))
    top = sorted(per_top.items(), key=lambda kv: -kv[1])[:TOP_IMPORTS]
    return {"import_ms_total": round(sum(per_top.values()) / 1000, 1),
            "import_ms": {k: round(v / 1000, 1) for k, v in top},
            "imported_modules": sum(1 for line in proc.stderr.splitlines() if line.startswith("import time:")) - 1}


def sample_rss(proc: subprocess.Popen[bytes], sim: subprocess.Popen[bytes], warmup_s: float,
               seconds: float) -> tuple[list[int], list[int]]:
    """VmRSS samples (kB) of `proc` and of the plant, every 100 ms for `seconds` after `warmup_s`."""
    time.sleep(warmup_s)  # steady state: imports, first decodes and the HTTP server are done
    samples: list[int] = []
    sim_samples: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(rss_kb(proc.pid))
        sim_samples.append(rss_kb(sim.pid))
        time.sleep(0.1)  # the sampling interval
    return samples, sim_samples


def library_floor(*, cli_env: dict[str, str], notify: socket.socket, udp_port: int,
                  sim: subprocess.Popen[bytes], procs: list[subprocess.Popen[bytes]],
                  warmup_s: float, seconds: float) -> dict[str, Any]:
    """The baseline of the same run: `bench/library_floor.py` (the base install's libraries
    doing the job without cerebellumd's code), fed by the same plant, sampled the same way."""
    dbc = resources.files("cerebellumd") / "data" / "vehicle.dbc"
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("library_floor.py")), str(dbc), "udp_multicast",
            GROUP, str(udp_port), str(port)]
    stop(start_ready(argv, cli_env, notify, procs))  # the first start byte-compiles it into the private cache
    floor = start_ready(argv, cli_env, notify, procs)
    samples, _ = sample_rss(floor, sim, warmup_s, seconds)
    frames = scrape(port).get("floor_frames_total", 0)
    if floor.poll() is not None or frames == 0:
        raise RuntimeError("the library floor decoded no frame from the plant: not a fed run")
    return {"floor_rss_mb": round(statistics.median(samples) / 1024, 1), "floor_frames": int(frames)}


def start_ready(argv: list[str], env: dict[str, str], notify: socket.socket,
                procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Start a process that tells READY=1 on `notify` (kept in `procs`, stopped at the end) and wait for it."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(proc)
    wait_ready(notify, proc)
    return proc


def wait_ready(notify: socket.socket, daemon: subprocess.Popen[bytes]) -> None:
    notify.settimeout(30)
    while b"READY=1" not in notify.recv(4096):
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited: {daemon.stderr.read().decode()[-2000:] if daemon.stderr else ''}")


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def measure(warmup_s: float, seconds: float, optimize: int = 0) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="cerebellumd-startup-"))
    # Bytecode as an installed daemon has it: a private cache, filled by a first start below.
    base_env = {**os.environ, "PYTHONPYCACHEPREFIX": str(root / "pycache"), "PYTHONOPTIMIZE": str(optimize)}
    base_env.pop("PYTHONDONTWRITEBYTECODE", None)
    base_env.pop("WATCHDOG_USEC", None)
    if optimize == 0:
        base_env.pop("PYTHONOPTIMIZE")
    udp_port, metrics_port = 46000 + os.getpid() % 1000, free_port()
    config = root / "daemon.toml"
    config.write_text(daemon_config(udp_port, metrics_port))
    config.chmod(0o600)
    (root / "sim.toml").write_text(sim_config(udp_port))
    notify_path = str(root / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    cli = [sys.executable, "-m", "cerebellumd", "--log-level", "warning"]
    procs: list[subprocess.Popen[bytes]] = []
    env = {**base_env, "NOTIFY_SOCKET": notify_path}
    try:
        # The plant starts first (its own environment: it is not measured), so its start-up is
        # over by the time the measured daemon starts.
        sim = subprocess.Popen([*cli, "sim", "--config", str(root / "sim.toml")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(sim)
        run = [*cli, "run", "--config", str(config)]
        t0 = time.monotonic()
        stop(start_ready(run, env, notify, procs))  # every module `run` imports up to READY=1 is now byte-compiled
        bytecode_warmup = time.monotonic() - t0
        t0 = time.monotonic()
        daemon = start_ready(run, env, notify, procs)
        ready = time.monotonic() - t0
        deadline = time.monotonic() + 10
        first_tick = None
        while first_tick is None:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no tick: {daemon.stderr.read().decode()[-2000:] if daemon.stderr else ''}")
            with contextlib.suppress(OSError):
                if scrape(metrics_port).get("cerebellumd_decision_seconds_count", 0) > 0:
                    first_tick = time.monotonic() - t0
            if first_tick is None:
                time.sleep(0.005)  # the scrape interval
        samples, sim_samples = sample_rss(daemon, sim, warmup_s, seconds)
        rollup = smaps_rollup_kb(daemon.pid)
        final = scrape(metrics_port)
        if daemon.poll() is not None:
            raise RuntimeError("the daemon exited during the measurement")
        stop(daemon)
        floor = library_floor(cli_env=env, notify=notify, udp_port=udp_port, sim=sim, procs=procs,
                              warmup_s=warmup_s, seconds=seconds)
    finally:
        for p in reversed(procs):
            stop(p)
        notify.close()
    frames = int(final.get("cerebellumd_can_frames_total", 0))
    if frames == 0:
        raise RuntimeError("the daemon decoded no frame from the plant: not a fed run")
    return {
        "rss_mb": round(statistics.median(samples) / 1024, 1),
        "rss_max_mb": round(max(samples) / 1024, 1),
        "rss_samples": len(samples),
        "pss_mb": round(rollup["Pss"] / 1024, 1),
        "uss_mb": round((rollup["Private_Clean"] + rollup["Private_Dirty"]) / 1024, 1),
        "sim_rss_mb": round(statistics.median(sim_samples) / 1024, 1),
        **floor,
        "rss_over_floor_mb": round(statistics.median(samples) / 1024 - floor["floor_rss_mb"], 1),
        "start_to_ready_s": round(ready, 3),
        "start_to_first_tick_s": round(first_tick, 3),
        "frames": frames,
        "optimize": optimize,
        "bytecode_warmup_s": round(bytecode_warmup, 3),
        **import_times(base_env),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after the first tick before sampling")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds of RSS sampling")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="CI smoke: 1 s warm-up, 2 s of samples")
    p.add_argument("--optimize", type=int, default=0, choices=(0, 1, 2),
                   help="run the daemon at PYTHONOPTIMIZE=N (2: without docstrings and asserts)")
    a = p.parse_args(argv)
    if a.quick:
        a.warmup, a.seconds = 1.0, 2.0
    r = measure(a.warmup, a.seconds, a.optimize)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"run (PYTHONOPTIMIZE={r['optimize']}): steady RSS {r['rss_mb']} MiB (max {r['rss_max_mb']}, "
              f"{r['rss_samples']} samples; PSS {r['pss_mb']}, USS {r['uss_mb']} MiB; "
              f"plant {r['sim_rss_mb']} MiB), READY after {r['start_to_ready_s']} s, first tick after "
              f"{r['start_to_first_tick_s']} s, {r['frames']} frames decoded")
        print(f"library floor (same libraries, no cerebellumd code): {r['floor_rss_mb']} MiB; "
              f"cerebellumd adds {r['rss_over_floor_mb']} MiB")
        print(f"imports: {r['import_ms_total']} ms over {r['imported_modules']} modules; "
              + ", ".join(f"{k} {v}" for k, v in r["import_ms"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
