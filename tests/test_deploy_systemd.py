"""deploy/systemd: the unit passes `systemd-analyze verify` (verbatim, in a temporary root that
has the binaries it names) and its offline security exposure stays at or below 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "cerebellumd.service"
SYSUSERS = REPO / "deploy" / "systemd" / "cerebellumd.sysusers"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _unit_settings(text: str) -> dict[str, list[str]]:
    """key -> values of the [Service]/[Unit]/[Install] settings (repeated keys accumulate)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _fake_root(tmp_path: Path, unit_text: str) -> Path:
    """An alternate root holding the host's unit files (for the targets the unit names), the
    unit under /etc/systemd/system and stand-ins for the two binaries it executes (the real
    /usr/bin/cerebellumd is a package artefact; verify only checks it is executable)."""
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    for name in ("cerebellumd", "kill"):
        stub = root / "usr" / "bin" / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    host_units = Path("/usr/lib/systemd/system")
    if not host_units.is_dir():
        pytest.skip("no host unit directory /usr/lib/systemd/system to verify against")
    shutil.copytree(host_units, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    etc = root / "etc" / "systemd" / "system"
    etc.mkdir(parents=True)
    (etc / "cerebellumd.service").write_text(unit_text)
    return root


def _verify(tmp_path: Path, unit_text: str) -> subprocess.CompletedProcess[str]:
    root = _fake_root(tmp_path, unit_text)
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", "cerebellumd.service"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)


def test_unit_has_the_required_settings() -> None:
    s = _unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["WatchdogSec"] and s["WatchdogSec"][0] not in ("0", "infinity")
    assert s["ExecStart"] == ["/usr/bin/cerebellumd run --config /etc/cerebellumd/cerebellumd.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert "StartLimitBurst" in s and "StartLimitIntervalSec" in s
    assert s.get("User") == ["cerebellumd"] or s.get("DynamicUser") == ["yes"]
    assert s["StateDirectory"] == ["cerebellumd"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "DevicePolicy": "closed"}.items():
        assert s[key] == [value], key
    families = set(s["RestrictAddressFamilies"][0].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_CAN", "AF_NETLINK"}
    devices = {v.split()[0] for v in s["DeviceAllow"]}
    assert {"char-ttyACM", "char-ttyUSB", "char-gpiochip"} <= devices
    # privileges: at most the ones the brief allows
    allowed = {"CAP_SYS_NICE", "CAP_IPC_LOCK", "CAP_NET_ADMIN"}
    assert set(" ".join(s["CapabilityBoundingSet"]).split()) <= allowed
    assert set(" ".join(s.get("AmbientCapabilities", [])).split()) <= allowed
    assert s["SystemCallFilter"][0] == "@system-service"


def test_sysusers_creates_the_service_user() -> None:
    lines = [ln.split() for ln in SYSUSERS.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0][:2] == ["u", "cerebellumd"]
    assert ["m", "cerebellumd", "gpio"] in lines


@needs_analyze
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    proc = _verify(tmp_path, UNIT.read_text())
    assert proc.returncode == 0, proc.stderr
    # verify reports unknown keys and bad values as warnings with rc 0: any line about our
    # unit is a defect.
    complaints = [ln for ln in proc.stderr.splitlines() if "cerebellumd" in ln]
    assert complaints == [], "\n".join(complaints)


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo'd key and a bad value are reported."""
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict").replace(
        "Type=notify", "Type=notifyy")
    proc = _verify(tmp_path, broken)
    assert "ProtectSytem" in proc.stderr
    assert "notifyy" in proc.stderr


def _exposure(unit: Path, cwd: Path) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=cwd, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1))


@needs_analyze
def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    exposure = _exposure(UNIT, tmp_path)
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE


@needs_analyze
def test_security_exposure_reacts_to_weaker_hardening(tmp_path: Path) -> None:
    weak = tmp_path / "cerebellumd.service"
    text = UNIT.read_text()
    for line in ("ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "NoNewPrivileges=yes", "MemoryDenyWriteExecute=yes", "CapabilityBoundingSet="):
        text = text.replace(line + "\n", "")
    weak.write_text(text)
    assert _exposure(weak, tmp_path) > _exposure(UNIT, tmp_path) + 0.5
