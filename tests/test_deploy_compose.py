"""deploy/compose: docker-compose.yml parses, every bind-mounted file or directory exists in
the repository (except the generated password file, documented), and the services use the
provisioning files of deploy/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "deploy" / "compose"
# Created by the user before the first start, never committed.
GENERATED = {"./mosquitto.passwd": "../mosquitto/make-passwd.sh ./mosquitto.passwd"}


def load() -> dict:  # type: ignore[type-arg]
    data = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def bind_mounts(data: dict) -> list[tuple[str, str, str]]:  # type: ignore[type-arg]
    out = []
    named = set(data.get("volumes") or {})
    for name, svc in data["services"].items():
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            if src in named:
                continue
            out.append((name, src, dst))
    return out


def test_parses_and_has_the_services() -> None:
    data = load()
    assert set(data["services"]) == {"prometheus", "grafana", "mosquitto"}
    for svc in data["services"].values():
        assert ":" in svc["image"] and not svc["image"].endswith(":latest"), "pin image tags"


def test_every_mounted_path_exists() -> None:
    mounts = bind_mounts(load())
    assert len(mounts) >= 8
    for service, src, _dst in mounts:
        if src in GENERATED:
            continue
        assert (COMPOSE / src).resolve().exists(), f"{service}: {src} does not exist"


def test_generated_files_are_documented_and_ignored() -> None:
    text = (COMPOSE / "docker-compose.yml").read_text()
    ignored = (COMPOSE / ".gitignore").read_text().split()
    for src, how in GENERATED.items():
        assert how in text
        assert src.removeprefix("./") in ignored


def test_mounts_wire_the_provisioning() -> None:
    dst_by_src = {src: dst for _svc, src, dst in bind_mounts(load())}
    assert dst_by_src["../prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert dst_by_src["../prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    assert dst_by_src["../grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert dst_by_src["../grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    # the dashboard provider reads the directory the dashboards are mounted at
    provider = yaml.safe_load((COMPOSE.parent / "grafana" / "provisioning" / "dashboards" /
                               "cerebellumd.yml").read_text())["providers"][0]
    assert dst_by_src["../grafana/dashboards"] == provider["options"]["path"]
    # mosquitto.conf's password_file/acl_file are where the compose file mounts them
    conf = (COMPOSE.parent / "mosquitto" / "mosquitto.conf").read_text().split("\n")
    settings = dict(ln.split(" ", 1) for ln in conf if ln and not ln.startswith("#") and " " in ln)
    assert dst_by_src["../mosquitto/acl"] == settings["acl_file"]
    assert dst_by_src["./mosquitto.passwd"] == settings["password_file"]
    # Prometheus loads alerts.yml relative to its config file
    assert yaml.safe_load((COMPOSE.parent / "prometheus" / "prometheus.yml").read_text())[
        "rule_files"] == ["alerts.yml"]


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30,
                      check=False).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    proc = subprocess.run([docker, "compose", "-f", str(COMPOSE / "docker-compose.yml"),
                           "config", "--quiet"], capture_output=True, text=True, timeout=60,
                          env={"GRAFANA_ADMIN_PASSWORD": "x", "PATH": "/usr/bin:/bin"},
                          check=False)
    assert proc.returncode == 0, proc.stderr
