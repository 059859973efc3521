"""End to end: `cerebellumd demo` at high speed-up, scraped over real HTTP.

The accelerator must wake for demands and sleep between them, and every domain's joules must
agree with its watts integrated over the plant time."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .helpers import free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(metrics: dict, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in metrics.items()
               if n == name and all(dict(labels).get(k) == val for k, val in match.items()))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_wakes_for_demands_sleeps_between_and_counts_joules() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cerebellumd", "demo", "--speedup", "20", "--duration", "900",
         "--no-live", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scrapes = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                metrics = scrape(port)
            except OSError:
                time.sleep(0.2)  # the endpoint is not up yet; poll again
                continue
            scrapes.append(metrics)
            if total(metrics, "cerebellumd_sleeps_total") >= 2 and total(metrics, "cerebellumd_wakes_total") >= 2:
                break
            time.sleep(0.2)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert scrapes, "metrics endpoint never answered"
    last = scrapes[-1]
    assert total(last, "cerebellumd_wakes_total") >= 2, "no wake seen over HTTP"
    assert total(last, "cerebellumd_sleeps_total") >= 2, "no sleep seen over HTTP"
    demand_wakes = sum(v for (n, labels), v in last.items()
                       if n == "cerebellumd_wakes_total" and dict(labels)["reason"].startswith("demand:"))
    assert demand_wakes >= 2, ("wakes were not caused by demands", {k: v for k, v in last.items() if "wakes" in k[0]})
    assert total(last, "cerebellumd_can_frames_total", bus="vehicle") > 100
    assert total(last, "cerebellumd_accelerator_state") == 1.0  # exactly one state is current
    # Counters never go backwards between scrapes.
    for before, after in itertools.pairwise(scrapes):
        for domain in ("accelerator", "gateway", "mcu"):
            assert total(after, "cerebellumd_domain_energy_joules_total", domain=domain) >= total(
                before, "cerebellumd_domain_energy_joules_total", domain=domain)
    # Joules = watts x time: constant domains exactly, the accelerator within its power range.
    seconds = summary["plant_seconds"]
    assert seconds > 300
    assert summary["joules"]["gateway"] == pytest.approx(3.5 * seconds, rel=0.02)
    assert summary["joules"]["mcu"] == pytest.approx(0.6 * seconds, rel=0.02)
    accel = summary["joules"]["accelerator"]
    assert 0.05 * seconds < accel < 15.0 * seconds
    # Woke for demands and slept between them: well below always-on (15 W the whole time).
    assert accel < 0.8 * 15.0 * seconds
    assert summary["wakes"] >= 2 and summary["sleeps"] >= 2
