"""The built wheel on arm64: a Debian bookworm arm64 root filesystem (debootstrap) run under
qemu-user through binfmt_misc, with the wheel installed in a venv there from the package index
(aarch64 wheels). Inside it: `check`, `schema`, `replay` of a short candump log, and a short
`run` fed by the same log replayed over udp_multicast from this (x86) process.

Building the root took 2 min 50 s here (docs/PERFORMANCE.md, "arm64 under qemu"), under the
8 minutes that would make it opt-in, so it runs by default; CEREBELLUMD_QEMU_ARM=0 skips it. The
root is cached in CEREBELLUMD_QEMU_CACHE (default /var/tmp/cerebellumd-qemu). It needs root (chroot, mounting
binfmt_misc), debootstrap, qemu-user-static and binfmt-support (.ci/run installs them) and skips
with the reason where binfmt_misc cannot be registered (an unprivileged container).
Timings of each step are printed (pytest -s) for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import can
import cantools
import pytest

from .helpers import free_port
from .test_lean_install import lean_config, poll, scrape

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CEREBELLUMD_QEMU_CACHE", "/var/tmp/cerebellumd-qemu"))
ARM_ROOT = CACHE / "bookworm-arm64"
VENV = "/opt/cerebellumd"
GROUP = "239.74.163.9"
FRAMES = 600
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
INSIDE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def _binfmt_ready() -> str | None:
    """None when aarch64 binaries run here; else why not."""
    if os.geteuid() != 0:
        return "needs root (chroot, binfmt_misc)"
    if not Path(CHROOT).exists():
        return "no chroot binary"
    for tool in ("debootstrap", "qemu-aarch64-static", "update-binfmts"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt: debootstrap qemu-user-static binfmt-support)"
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not entry.exists():
        if not Path("/proc/sys/fs/binfmt_misc/register").exists():
            mount = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"],
                                   capture_output=True, text=True)
            if mount.returncode != 0:
                return f"cannot mount binfmt_misc: {mount.stderr.strip()}"
        enable = subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True, text=True)
        if enable.returncode != 0 or not entry.exists():
            return f"cannot register qemu-aarch64 with binfmt_misc: {enable.stderr.strip()}"
    if "enabled" not in entry.read_text():
        return "qemu-aarch64 is registered but disabled"
    return None


def _chroot(*cmd: str, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHROOT, str(ARM_ROOT), *cmd], capture_output=True, text=True,
                          timeout=timeout, env=INSIDE_ENV, **kw)  # type: ignore[call-overload]


def _ensure_root(timings: dict[str, float]) -> None:
    if (ARM_ROOT / "usr/bin/python3").exists():
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / "bookworm-arm64.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    proc = subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase",
                           "--include=python3,python3-venv,python3-pip,ca-certificates",
                           "bookworm", str(tmp), "http://deb.debian.org/debian"],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    timings["debootstrap_s"] = time.monotonic() - t0
    tmp.rename(ARM_ROOT)


def _write_log(path: Path, db: cantools.database.can.Database) -> None:
    """A candump log: VehicleDynamics every 10 ms with a speed ramp, AdasStatus every 100 ms."""
    dyn, adas = db.get_message_by_name("VehicleDynamics"), db.get_message_by_name("AdasStatus")
    with can.Logger(str(path)) as log:
        for i in range(FRAMES):
            t = 1000.0 + i * 0.01
            values = {s.name: 0 for s in dyn.signals} | {"VehicleSpeed": min(i / 5, 120)}
            log.on_message_received(can.Message(timestamp=t, arbitration_id=dyn.frame_id, data=dyn.encode(values),
                                                is_extended_id=False, channel="can0"))
            if i % 10 == 0:
                avalues = {s.name: 0 for s in adas.signals}
                log.on_message_received(can.Message(timestamp=t, arbitration_id=adas.frame_id,
                                                    data=adas.encode(avalues), is_extended_id=False, channel="can0"))


@pytest.fixture(scope="module")
def arm_root() -> dict[str, float]:
    reason = _binfmt_ready()
    if reason is not None:
        pytest.skip(reason)
    if os.environ.get("CEREBELLUMD_QEMU_ARM") == "0":
        pytest.skip("CEREBELLUMD_QEMU_ARM=0")
    timings: dict[str, float] = {}
    _ensure_root(timings)
    arch = _chroot("python3", "-c", "import platform; print(platform.machine())", timeout=120)
    assert arch.stdout.strip() == "aarch64", arch.stderr
    return timings


@pytest.mark.timeout(1800)
def test_wheel_runs_on_arm64_under_qemu(arm_root: dict[str, float], tmp_path: Path) -> None:
    timings = arm_root
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = wheels.glob("cerebellumd-*.whl")
    work = ARM_ROOT / "tmp" / "cerebellumd-test"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(wheel, work / wheel.name)
    shutil.copy(ROOT / "src/cerebellumd/data/vehicle.dbc", work / "vehicle.dbc")
    db = cantools.database.load_file(str(ROOT / "src/cerebellumd/data/vehicle.dbc"))
    _write_log(work / "short.log", db)
    udp_port, metrics_port = 47000 + os.getpid() % 1000, free_port()
    (work / "run.toml").write_text(lean_config(udp_port, metrics_port).replace("239.74.163.9", GROUP))
    (work / "run.toml").chmod(0o600)
    inside = "/tmp/cerebellumd-test"

    t0 = time.monotonic()
    if not (ARM_ROOT / VENV.lstrip("/") / "bin/python").exists():
        venv = _chroot("python3", "-m", "venv", VENV)
        assert venv.returncode == 0, venv.stderr
    pip = [f"{VENV}/bin/pip", "--disable-pip-version-check", "-q"]
    host_ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if host_ca and Path(host_ca).is_file():  # the host's trust (a TLS-inspecting proxy's CA) for the index
        shutil.copy(host_ca, work / "ca.crt")
        pip.append(f"--cert={inside}/ca.crt")
    # the runtime (+ [multicast] for the udp_multicast feed below): aarch64 wheels from the index
    for args in (["install", "--force-reinstall", "--no-deps", f"{inside}/{wheel.name}"],
                 ["install", f"{inside}/{wheel.name}[multicast]"]):
        proc = _chroot(*pip, *args, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
    timings["pip_install_s"] = time.monotonic() - t0
    frozen = _chroot(*pip, "freeze").stdout
    assert "numpy" not in frozen and "matplotlib" not in frozen and "rich" not in frozen, frozen

    exe = f"{VENV}/bin/cerebellumd"
    t0 = time.monotonic()
    check = _chroot(exe, "check", f"{inside}/run.toml", timeout=300)
    timings["check_s"] = time.monotonic() - t0
    assert check.returncode == 0 and check.stdout.strip() == "OK", check.stderr

    t0 = time.monotonic()
    schema = _chroot(exe, "schema", timeout=300)
    timings["schema_s"] = time.monotonic() - t0
    assert schema.returncode == 0, schema.stderr
    assert "can" in json.loads(schema.stdout)["properties"]

    t0 = time.monotonic()
    replay = _chroot(exe, "replay", f"{inside}/short.log", "--dbc", f"{inside}/vehicle.dbc",
                     "--config", f"{inside}/run.toml", "--json", timeout=600)
    timings["replay_s"] = time.monotonic() - t0
    assert replay.returncode == 0, replay.stderr[-3000:]
    result = json.loads(replay.stdout)
    assert result["frames"] == FRAMES + FRAMES // 10 and result["decoded"] == result["frames"], result

    t0 = time.monotonic()
    daemon = subprocess.Popen([CHROOT, str(ARM_ROOT), exe, "run", "--config", f"{inside}/run.toml"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=INSIDE_ENV)
    try:
        def metrics_up() -> bool:
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            try:
                scrape(metrics_port)
            except OSError:
                return False
            return True

        poll(metrics_up, "the arm64 daemon's metrics endpoint", timeout=120)
        timings["run_start_to_metrics_s"] = time.monotonic() - t0
        sent = 0
        with can.Bus(interface="udp_multicast", channel=GROUP, port=udp_port) as bus:
            for msg in can.LogReader(str(work / "short.log")):
                bus.send(msg)
                sent += 1
                if sent % 50 == 0:
                    time.sleep(0.05)  # pacing of the feed (1,000 frames/s), not a wait for an outcome
        poll(lambda: scrape(metrics_port).get("cerebellumd_can_frames_total", 0) > 0
             and scrape(metrics_port).get("cerebellumd_decision_seconds_count", 0) > 0,
             "frames decoded and decisions by the arm64 daemon", timeout=60)
        frames = scrape(metrics_port)["cerebellumd_can_frames_total"]
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, err[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    print(json.dumps({**{k: round(v, 2) for k, v in timings.items()}, "run_frames": frames, "sent": sent}))
