"""The scrape output of a running daemon: every metric of the contract (docs/contracts.md)
with its exact type and labels, and `promtool check metrics` with no findings."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from . import contracts
from .helpers import free_port

#: docs/contracts.md; the demo has no broker, so no `cerebellumd_mqtt_connected` (by design).
CONTRACT = {name: spec for name, spec in contracts.metrics().items() if name != "cerebellumd_mqtt_connected"}


def scrape_running_demo() -> str:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cerebellumd", "demo", "--speedup", "20", "--duration", "2000", "--no-live",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                time.sleep(0.2)  # not up yet: poll again
                continue
            # Reasons label wakes and sleeps only once they happen: wait for one of each.
            if 'cerebellumd_wakes_total{reason="demand' in text and "cerebellumd_sleeps_total{" in text:
                return text
            time.sleep(0.2)  # no wake and sleep yet: poll again
        raise AssertionError("the demo did not wake and sleep within 60 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def scrape() -> str:
    return scrape_running_demo()


@pytest.mark.timeout(120)
def test_every_contract_metric_with_its_type_and_labels(scrape: str) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    for name, (kind, labels) in CONTRACT.items():
        assert name in families, f"{name} missing"
        family = families[name]
        assert family.type == kind, (name, family.type)
        assert family.documentation, f"{name} has no HELP"
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        assert samples, f"{name} has no series"
        for sample in samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
    domains = {s.labels["domain"] for s in families["cerebellumd_domain_energy_joules"].samples}
    assert {"accelerator", "gateway", "mcu"} <= domains
    # the accelerator's energy again, split by the reason behind the target (no state file: both since start)
    accel = next(s.value for s in families["cerebellumd_domain_energy_joules"].samples
                 if s.name.endswith("_total") and s.labels["domain"] == "accelerator")
    by_reason = {s.labels["reason"]: s.value for s in families["cerebellumd_accelerator_energy_joules"].samples
                 if s.name.endswith("_total")}
    assert sum(by_reason.values()) == pytest.approx(accel, rel=0.01), by_reason
    assert any(reason.startswith("demand:") for reason in by_reason), by_reason  # the demo woke for a demand
    states = {s.labels["state"]: s.value for s in families["cerebellumd_accelerator_state"].samples}
    assert sum(states.values()) == 1.0


@pytest.mark.timeout(120)
def test_promtool_check_metrics_has_no_findings(scrape: str) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr)
