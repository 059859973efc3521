"""deploy/raspberrypi: config.txt overlays as the Raspberry Pi firmware names them, udev
rules that parse (udevadm verify where available), and a systemd-networkd CAN file with keys
networkd knows."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RPI = REPO / "deploy" / "raspberrypi"

MATCH_KEYS = {"ACTION", "DEVPATH", "KERNEL", "NAME", "SYMLINK", "SUBSYSTEM", "DRIVER",
              "KERNELS", "SUBSYSTEMS", "DRIVERS", "ATTR", "ATTRS", "ENV", "TAG", "TAGS",
              "TEST", "PROGRAM", "RESULT", "CONST", "SYSCTL"}
ASSIGN_KEYS = {"NAME", "SYMLINK", "OWNER", "GROUP", "MODE", "ATTR", "SYSCTL", "ENV", "TAG",
               "RUN", "LABEL", "GOTO", "IMPORT", "OPTIONS", "SECLABEL"}
TOKEN = re.compile(r'\s*([A-Z_]+)(\{[^}]+\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(,|$)')


def parse_rule(line: str) -> list[tuple[str, str | None, str, str]]:
    out: list[tuple[str, str | None, str, str]] = []
    pos = 0
    while pos < len(line):
        m = TOKEN.match(line, pos)
        if not m:
            raise ValueError(f"cannot parse at column {pos}: {line[pos:]!r}")
        key, attr, op, value = m.group(1), m.group(2), m.group(3), m.group(4)
        if op in ("==", "!="):
            if key not in MATCH_KEYS:
                raise ValueError(f"{key} is not a match key")
        elif key not in ASSIGN_KEYS:
            raise ValueError(f"{key} cannot be assigned")
        out.append((key, attr, op, value))
        pos = m.end()
    return out


def rule_lines() -> list[str]:
    return [ln for ln in (RPI / "80-cerebellumd.rules").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def test_udev_rules_parse() -> None:
    rules = [parse_rule(ln) for ln in rule_lines()]
    assert rules
    assert any(("SYMLINK", None, "+=", "cerebellumd-mcu") in r for r in rules)
    for r in rules:
        keys = {k for k, _, op, _ in r if op == "=="}
        assert keys, "every rule needs a match"
    gpio = [r for r in rules if ("SUBSYSTEM", None, "==", "gpio") in r]
    assert gpio and ("MODE", None, "=", "0660") in gpio[0]
    can = [r for r in rules if ("SUBSYSTEM", None, "==", "net") in r]
    assert {v for r in can for k, _, op, v in r if k == "NAME" and op == "="} == {"can0", "can1"}


@pytest.mark.parametrize("bad", [
    'SUBSYSTEM=="tty", SYMLINK+="x" GROUP="y"',      # missing comma
    'SUBSYSTEM="tty", SYMLINK+="x"',                 # assignment to a match-only key
    'SUBSYSTEM=="tty", FOO="x"',                     # unknown key
])
def test_udev_parser_rejects_broken_rules(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_rule(bad)


@pytest.mark.skipif(shutil.which("udevadm") is None, reason="udevadm not installed")
def test_udevadm_verify(tmp_path: Path) -> None:
    probe = subprocess.run(["udevadm", "verify", "--help"], capture_output=True, text=True,
                           timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip("this udevadm has no `verify` (systemd < 254)")
    proc = subprocess.run(["udevadm", "verify", str(RPI / "80-cerebellumd.rules")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_can_network_file() -> None:
    # systemd-analyze verify does not check .network files and networkd has no offline
    # check: parse it and compare with the keys systemd.network(5) documents.
    cp = configparser.ConfigParser(strict=True, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((RPI / "80-can0.network").read_text())
    assert cp["Match"]["Name"] == "can0"
    known_can = {"BitRate", "SamplePoint", "TimeQuantaNSec", "DataBitRate", "DataSamplePoint",
                 "FDMode", "FDNonISO", "RestartSec", "Termination", "TripleSampling",
                 "BusErrorReporting", "ListenOnly", "Loopback", "OneShot",
                 "PresumeAck", "ClassicDataLengthCode"}
    assert set(cp["CAN"]) <= known_can
    assert re.fullmatch(r"\d+[KM]?", cp["CAN"]["BitRate"])
    assert re.fullmatch(r"\d+(ms|s)", cp["CAN"]["RestartSec"])
    assert cp["Link"]["RequiredForOnline"] == "no"


def test_can_network_keys_are_documented_by_this_systemd() -> None:
    man = shutil.which("man")
    if man is None:
        pytest.skip("man not installed")
    proc = subprocess.run([man, "systemd.network"], capture_output=True, text=True, timeout=30,
                          check=False)
    if proc.returncode != 0:
        pytest.skip("systemd.network(5) not installed")
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((RPI / "80-can0.network").read_text())
    for section in cp.sections():
        for key in cp[section]:
            assert re.search(rf"^\s+{key}=", proc.stdout, re.M), f"[{section}] {key}"


def test_config_txt_overlays() -> None:
    lines = [ln.strip() for ln in (RPI / "config.txt.snippet").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    for ln in lines:
        assert ln == "[all]" or re.fullmatch(r"(dtoverlay|dtparam)=[\w,=.-]+", ln), ln
    assert "dtoverlay=mcp2515-can0,oscillator=16000000,interrupt=25" in lines
    assert "dtparam=i2c_arm=on" in lines
    assert "dtparam=spi=on" in lines
    # The firmware's i2c-sensor overlay has no ina219/ina226/ina3221 parameter (only ina238):
    # an active line claiming otherwise would silently do nothing.
    assert not any(re.search(r"i2c-sensor,ina(219|226|3221)", ln) for ln in lines)


def test_readme_steps() -> None:
    readme = (RPI / "README.md").read_text()
    for needle in ("config.txt.snippet", "80-cerebellumd.rules", "80-can0.network",
                   "new_device", "systemctl enable --now cerebellumd", "/dev/cerebellumd-mcu"):
        assert needle in readme, needle
