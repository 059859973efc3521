"""End to end: the real `cerebellumd demo` scraped by a real Prometheus, and every query of
the shipped Grafana dashboard run through Prometheus' HTTP API. Each must parse and (except
the MQTT-only ones, see MQTT_ONLY) return data: a dashboard panel that says "No data" on the
demo is a bug in the dashboard or in the exporter."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import test_deploy_grafana as _grafana
from .helpers import free_port

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "cerebellumd.json"

# Grafana's variables as Grafana would expand them for a 1 s scrape interval over the last
# minute; the windows hold enough scrapes for rate()/increase().
LIVE_SUBSTITUTIONS = {"$__rate_interval": "20s", "$__interval": "5s", "$__range": "1m",
                      "$instance": ".*"}
# Queries over metrics that only mean something with an MQTT broker: they must parse, but the
# demo runs without MQTT, so they need not return data.
MQTT_ONLY = {"cerebellumd_mqtt_connected": "the demo runs without an MQTT broker"}
SCRAPES_BEFORE_QUERYING = 15
SPEEDUP = 20
# `--duration` is in plant seconds: 2400 s at 20x keeps the demo running for up to 120 s of
# wall time, longer than the test needs; the test stops it when done.
PLANT_SECONDS = 2400

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(150),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed"),
]






def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_for(predicate: Any, deadline_s: float, what: str, procs: list[subprocess.Popen[bytes]]) -> Any:
    """Poll predicate() until it returns a truthy value; fail early if a process died."""
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.args[0]} exited with {p.returncode} while waiting for {what}")
        try:
            value = predicate()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(0.2)  # poll interval of a deadline loop, not a wait for an outcome
    pytest.fail(f"timed out waiting for {what} (last error: {last_error})")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def demo_command(port: int) -> list[str]:
    exe = shutil.which("cerebellumd")
    base = [exe] if exe else [sys.executable, "-m", "cerebellumd"]
    return [*base, "demo", "--duration", str(PLANT_SECONDS), "--speedup", str(SPEEDUP),
            "--port", str(port), "--no-live"]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A running demo and a Prometheus scraping it every second; yields the Prometheus URL."""
    metrics_port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: cerebellumd\n    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        demo_log = (tmp_path / "demo.log").open("wb")
        logs.append(demo_log)
        demo = subprocess.Popen(demo_command(metrics_port), stdout=demo_log,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
        procs.append(demo)
        prom_log = (tmp_path / "prometheus.log").open("wb")
        logs.append(prom_log)
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=prom_log, stderr=subprocess.STDOUT, cwd=tmp_path)
        procs.append(prom)
        url = f"http://127.0.0.1:{prom_port}"
        try:
            wait_for(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200,
                     30, "Prometheus ready", procs)
            wait_for(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).status == 200,
                30, "the demo's metrics endpoint", procs)
        except BaseException:
            for log in logs:
                log.flush()
            print((tmp_path / "demo.log").read_text(errors="replace")[-3000:])
            raise
        yield url, demo
    finally:
        for p in reversed(procs):
            stop(p)
        for log in logs:
            log.close()


def query(url: str, expr: str) -> dict[str, Any]:
    q = urllib.parse.urlencode({"query": expr})
    try:
        body: dict[str, Any] = http_json(f"{url}/api/v1/query?{q}")
    except urllib.error.HTTPError as exc:  # 400 = parse error, with a JSON body
        body = json.loads(exc.read())
    return body


def test_every_dashboard_query_returns_data(stack: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, demo = stack

    def scrapes() -> bool:
        r = query(url, 'count_over_time(up{job="cerebellumd"}[1m])')["data"]["result"]
        return bool(r) and float(r[0]["value"][1]) >= SCRAPES_BEFORE_QUERYING

    wait_for(scrapes, 60, f"{SCRAPES_BEFORE_QUERYING} scrapes", [demo])
    up = query(url, 'up{job="cerebellumd"}')["data"]["result"]
    assert [float(s["value"][1]) for s in up] == [1.0], "the demo target is not up"

    dash = _grafana.load_dashboard()
    failures: list[str] = []
    checked = exempt = 0
    for panel in _grafana.panels(dash):
        for target in panel["targets"]:
            expr = _grafana.concrete(target["expr"], LIVE_SUBSTITUTIONS)
            body = query(url, expr)
            if body.get("status") != "success":
                failures.append(f"{panel['title']}: {expr}: {body.get('error')}")
                continue
            used = _grafana.used_metrics(expr)
            if used and used <= MQTT_ONLY.keys():
                exempt += 1  # parses; data optional (reason in MQTT_ONLY)
                continue
            checked += 1
            if not body["data"]["result"]:
                failures.append(f"{panel['title']}: no data for {expr}")
    assert demo.poll() is None, "the demo ended before all queries ran"
    assert not failures, "\n".join(failures)
    assert checked >= 25
    assert exempt >= 1
