"""Soak: the HIL pair for M minutes and what it cost.

A plant process sends ~5000 frames/s over udp_multicast (bench/common.py's sender), firing the
critical demand now and then; `cerebellumd run` decides on them with a simulated accelerator,
a state file, MQTT (a real mosquitto on a free port, when installed) and Prometheus. Every few
seconds the soak scrapes the metrics endpoint and publishes an operator command over MQTT.

    python bench/soak.py --minutes 30 --json
    python bench/soak.py --quick --json     # CI smoke: 6 s after a 2 s warm-up

`--minutes` may be fractional.

Prints one JSON object: minutes, frames, dropped, overruns, rss_start_mb, rss_end_mb,
decisions, errors (+ details). `errors` = CAN errors other than silence + actuation failures
+ failed scrapes + daemon log records at level error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cerebellumd.config import builtin_example
from common import BENCH_GROUP, start_sender, stop_process

SCRAPE_EVERY_S = 5.0
FIRE_EVERY_S = 20.0
WARMUP_S = 10.0


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """Totals per metric name (labels summed) and per name{labels} for the few we need."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def config_text(udp_port: int, metrics_port: int, mqtt_port: int | None, state_file: Path) -> str:
    text = builtin_example()
    can_block = (
        '[[can]]\nname = "vehicle"\ninterface = "udp_multicast"\n'
        f'channel = "{BENCH_GROUP}"\ndbc = "builtin:vehicle.dbc"\nfilters = false\n'
        f"silence_timeout_ms = 1000\nqueue_size = 4096\n[can.options]\nport = {udp_port}\nfd = false\n\n"
    )
    text = re.sub(r"\[\[can\]\].*?(?=# -- signals)", can_block, text, flags=re.S)
    text = text.replace('node = "demo"', 'node = "soak"')
    persist = f'state_file = "{state_file}"\npersist_interval_s = 5'
    text = text.replace('safe_state = "sleep"', f'safe_state = "sleep"\n{persist}')
    text = text.replace("port = 9108", f"port = {metrics_port}")
    if mqtt_port is not None:
        text += (f"\n[mqtt]\nenabled = true\nport = {mqtt_port}\npublish_interval_ms = 500\n"
                 "command_rate_per_minute = 120\n")
    return text


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout} s")
        time.sleep(0.1)


def rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def run(minutes: float, rate: float, *, warmup_s: float = WARMUP_S,
        scrape_every_s: float = SCRAPE_EVERY_S, fire_every_s: float = FIRE_EVERY_S) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="cerebellumd-soak-"))
    procs: list[subprocess.Popen[Any]] = []
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    mqtt_port = free_port() if mosquitto else None
    if mosquitto and mqtt_port:
        conf = root / "mosquitto.conf"
        conf.write_text(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        procs.append(subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", mqtt_port)) == 0, 10, "mosquitto")
    udp_port = 43200 + os.getpid() % 500  # our own port: no other bench's frames mix in
    metrics_port = free_port()
    config = root / "cerebellumd.toml"
    config.write_text(config_text(udp_port, metrics_port, mqtt_port, root / "energy.json"))
    config.chmod(0o600)
    log_path = root / "daemon.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "cerebellumd", "--log-format", "json", "run",
                                   "--config", str(config)], stdout=subprocess.DEVNULL, stderr=log)
    procs.append(daemon)
    scrape_errors = 0
    commands = 0
    sender = None
    try:
        def up() -> bool:
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited: {log_path.read_text()[-2000:]}")
            try:
                scrape(metrics_port)
            except OSError:
                return False
            return True

        wait_for(up, 30, "daemon metrics")
        seconds = minutes * 60
        sender = start_sender(rate, seconds + warmup_s + 30, interactive=True, port=udp_port)
        procs.append(sender)
        t_start = time.monotonic()
        next_fire = t_start + fire_every_s
        seq = 0
        rss_start: float | None = None
        start_metrics: dict[str, float] = {}
        end = t_start + warmup_s + seconds
        while time.monotonic() < end:
            # The soak's own pacing (a benchmark, not a test); never past the end of the run.
            time.sleep(max(0.0, min(scrape_every_s, end - time.monotonic())))
            now = time.monotonic()
            try:
                metrics = scrape(metrics_port)
            except OSError:
                scrape_errors += 1
                continue
            if rss_start is None and now - t_start >= warmup_s:
                rss_start, start_metrics = rss_mb(daemon.pid), metrics
            if now >= next_fire and sender.stdin is not None:
                seq += 1
                sender.stdin.write(f"fire {seq}\n")
                sender.stdin.flush()
                time.sleep(0.5)
                sender.stdin.write(f"clear {seq}\n")
                sender.stdin.flush()
                next_fire += fire_every_s
            if mqtt_port is not None:
                body = json.dumps({"command": "hold" if commands % 2 == 0 else "release", "owner": "soak",
                                   "reason": "soak", "ttl_s": 3, "id": f"soak-{commands}"})
                subprocess.run(["mosquitto_pub", "-p", str(mqtt_port), "-q", "1", "-t", "cerebellumd/soak/set",
                                "-m", body], check=False, timeout=10, capture_output=True)
                commands += 1
        final = scrape(metrics_port)
        rss_end = rss_mb(daemon.pid)
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(30)
    finally:
        for p in reversed(procs):
            stop_process(p)
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    log_errors = [r["msg"] for r in records if r.get("level") in ("error", "critical")]

    def delta(name: str) -> float:
        return final.get(name, 0.0) - start_metrics.get(name, 0.0)

    can_errors = sum(v for k, v in final.items()
                     if k.startswith("cerebellumd_can_errors_total{") and "kind=silent" not in k)
    actuation = final.get("cerebellumd_actuation_failures_total", 0.0)
    return {
        "minutes": minutes,
        "rate": rate,
        "frames": int(final.get("cerebellumd_can_frames_total", 0)),
        "dropped": int(final.get("cerebellumd_ingest_dropped_total", 0)),
        "overruns": int(final.get("cerebellumd_tick_overruns_total{loop=decision}", 0)),
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_end,
        "decisions": int(final.get("cerebellumd_decision_seconds_count", 0)),
        "errors": int(can_errors + actuation + scrape_errors + len(log_errors)),
        "details": {
            "frames_per_s_after_warmup": round(delta("cerebellumd_can_frames_total") / (minutes * 60), 1),
            "can_errors": can_errors, "actuation_failures": actuation, "scrape_errors": scrape_errors,
            "log_errors": log_errors[:10], "wakes": final.get("cerebellumd_wakes_total", 0.0),
            "critical_fired": seq, "mqtt": mqtt_port is not None, "mqtt_commands_sent": commands,
            "mqtt_commands": {k: v for k, v in final.items() if k.startswith("cerebellumd_commands_total{")},
            "mqtt_connected_end": final.get("cerebellumd_mqtt_connected"),
            "state_file_writes": final.get("cerebellumd_state_file_writes_total"),
            "exit_code": rc,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=5000.0, help="plant frames per second")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: 0.1 minutes after a 2 s warm-up, scraping every second, "
                             "firing the critical demand every 3 s")
    args = parser.parse_args(argv)
    if args.quick:
        result = run(0.1, args.rate, warmup_s=2.0, scrape_every_s=1.0, fire_every_s=3.0)
    else:
        result = run(args.minutes, args.rate)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if result["details"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
