"""deploy/prometheus: the scrape config and alert rules pass promtool, the alert unit tests
(alerts_test.yml) pass, and every metric the rules use is in the telemetry contract."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from . import contracts

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / "deploy" / "prometheus"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")

EXPECTED_ALERTS = {
    "CerebellumdDown", "CerebellumdAcceleratorStuckActive", "CerebellumdWakeStorm",
    "CerebellumdTickOverruns", "CerebellumdSignalStale", "CerebellumdMqttDisconnected",
    "CerebellumdAcceleratorEnergyBudget", "CerebellumdIngestDrops", "CerebellumdCanBusDisconnected",
}
def contract_metrics() -> set[str]:
    """The sample names of docs/contracts.md's metrics (counters with `_total`)."""
    return {f"{name}_total" if kind == "counter" else name for name, (kind, _) in contracts.metrics().items()}


def used_metrics(expr: str) -> set[str]:
    names = set(re.findall(r"\bcerebellumd_[a-z_]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def _promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, check=False)


def test_contract_list_parsed() -> None:
    assert {"cerebellumd_wakes_total", "cerebellumd_accelerator_state", "cerebellumd_tick_overruns_total",
            "cerebellumd_mqtt_connected"} <= contract_metrics()


def test_check_config() -> None:
    proc = _promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "cerebellumd"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9108"]
    assert cfg["rule_files"] == ["alerts.yml"]


def test_check_rules() -> None:
    proc = _promtool("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in proc.stdout


def test_alerts_present_and_use_contract_metrics() -> None:
    rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
             for r in g["rules"]]
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    contract = contract_metrics()
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"]
        unknown = used_metrics(rule["expr"]) - contract
        assert not unknown, f"{rule['alert']}: not in the contract: {unknown}"


def test_every_alert_has_a_unit_test_that_fires_and_one_that_does_not() -> None:
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for t in tests:
        for case in t["alert_rule_test"]:
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fires == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


def test_promtool_test_rules() -> None:
    proc = _promtool("test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_test_rules_detects_a_wrong_threshold(tmp_path: Path) -> None:
    """The unit tests can fail: raise the wake-storm threshold and they must."""
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    text = (PROM / "alerts.yml").read_text()
    assert "* 3600 > 120" in text
    (tmp_path / "alerts.yml").write_text(text.replace("* 3600 > 120", "* 3600 > 1000"))
    proc = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "CerebellumdWakeStorm" in proc.stdout + proc.stderr
