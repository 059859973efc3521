"""deploy/grafana: provisioning files are valid, the dashboard JSON is complete (datasource,
non-empty queries on every panel), uses only contract metrics, and every query parses with
promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .test_deploy_prometheus import contract_metrics, used_metrics

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "cerebellumd.json"

# Grafana's variables, replaced by concrete values wherever a query leaves Grafana.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
                 "$instance": ".*"}


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def concrete(expr: str, subs: dict[str, str] = SUBSTITUTIONS) -> str:
    for var in sorted(subs, key=len, reverse=True):
        expr = expr.replace(var, subs[var])
    return expr


def test_dashboard_parses_and_has_panels() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "cerebellumd"
    assert len(panels(dash)) >= 20
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance"} <= names


def test_every_panel_has_datasource_and_queries() -> None:
    ids = set()
    for p in panels(load_dashboard()):
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        assert p["datasource"]["type"] == "prometheus", p["title"]
        assert p["datasource"]["uid"], p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"]["type"] == "prometheus"
            assert not re.search(r"\$(?!__rate_interval|__interval|__range|instance)\w+",
                                 t["expr"]), f"{p['title']}: unknown variable in {t['expr']}"


def test_dashboard_covers_the_contract_panels() -> None:
    exprs = " ".join(t["expr"] for p in panels(load_dashboard()) for t in p["targets"])
    kinds = {p["type"] for p in panels(load_dashboard())}
    assert {"state-timeline", "heatmap", "timeseries", "stat"} <= kinds
    for needle in ("cerebellumd_accelerator_state", "cerebellumd_domain_power_watts",
                   "cerebellumd_domain_energy_joules_total", "sum by (reason) (increase(cerebellumd_wakes_total",
                   "cerebellumd_sleeps_total", "cerebellumd_wake_latency_seconds_bucket",
                   "cerebellumd_tick_lateness_seconds_bucket", "cerebellumd_tick_overruns_total",
                   "cerebellumd_decision_seconds", "cerebellumd_can_frames_total",
                   "cerebellumd_can_errors_total", "cerebellumd_ingest_dropped_total",
                   "cerebellumd_signal_stale", "cerebellumd_demand_active",
                   "cerebellumd_holds_active", "cerebellumd_wake_validations_total",
                   "cerebellumd_mqtt_connected",
                   "sum by (reason) (increase(cerebellumd_accelerator_energy_joules_total"):
        assert needle in exprs, needle
    (heatmap,) = [p for p in panels(load_dashboard()) if p["type"] == "heatmap"]
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "cerebellumd_tick_lateness_seconds_bucket" in heatmap["targets"][0]["expr"]


def test_only_contract_metrics() -> None:
    contract = contract_metrics()
    for p in panels(load_dashboard()):
        for t in p["targets"]:
            used = used_metrics(t["expr"])
            assert used, f"{p['title']}: no cerebellumd metric in {t['expr']}"
            assert used <= contract, f"{p['title']}: not in the contract: {used - contract}"


def test_used_metrics_recognises_unknown_names() -> None:
    assert used_metrics("rate(cerebellumd_wakes_totl[1m])") - contract_metrics() == {
        "cerebellumd_wakes_totl"}


def _check_rules(tmp_path: Path, exprs: list[str]) -> subprocess.CompletedProcess[str]:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    exprs = [concrete(t["expr"]) for p in panels(load_dashboard()) for t in p["targets"]]
    proc = _check_rules(tmp_path, exprs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    proc = _check_rules(tmp_path, ["sum by (le (rate(cerebellumd_wakes_total[1m]))"])
    assert proc.returncode != 0


def test_datasource_provisioning() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    (prom,) = ds["datasources"]
    assert prom["type"] == "prometheus"
    assert prom["url"].startswith("http")
    assert prom["uid"]


def test_dashboard_provisioning() -> None:
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cerebellumd.yml").read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
