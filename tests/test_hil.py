"""HIL end to end with real processes: `cerebellumd sim` (the plant) and `cerebellumd run` (the
daemon, from examples/hil.toml) over real transports — CAN on udp_multicast, on slcan through a
socat pty pair, or on socketcan (vcan, where the kernel has it); SOME/IP over loopback UDP; the
companion MCU on a pty. Checked only through the daemon's metrics endpoint."""

from __future__ import annotations

import json
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .helpers import free_port

# Standing 3 s, up to 90 km/h, steady until 40 s, down and standing: with seed 1 the event model
# puts one highway event at 22-40 s (and its precursor before it).
CYCLE = "time_s,speed_kmh\n" + "".join(
    f"{t},{0 if t < 3 else min(90, (t - 3) * 9) if t < 40 else max(0, 90 - (t - 40) * 9)}\n" for t in range(61))
SPEEDUP = 4.0




def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(metrics: dict, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in metrics.items()
               if n == name and all(dict(labels).get(k) == val for k, val in match.items()))


def _sub(pattern: str, replacement: str, text: str) -> str:
    out, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert n >= 1, f"example config changed: {pattern!r} not found"
    return out


def _example(name: str) -> str:
    return resources.files("cerebellumd").joinpath("examples", name).read_text("utf-8")


def _can_lines(transport: str, channel: str, udp_port: int, *, daemon: bool) -> str:
    if transport == "udp_multicast":
        return f'interface = "udp_multicast"\nchannel = "239.74.163.2"\noptions = {{ port = {udp_port} }}'
    if transport == "slcan":
        # slcan waits 2 s after opening by default; a pty needs none.
        options = "options = { sleep_after_open = 0.1 }" if daemon else "options = {}"
        return f'interface = "slcan"\nchannel = "{channel}"\n{options}'
    return f'interface = "socketcan"\nchannel = "{channel}"\noptions = {{}}'


def write_configs(tmp: Path, transport: str, channels: tuple[str, str]) -> tuple[Path, Path, int]:
    metrics_port = free_port()
    someip_port = free_port(socket.SOCK_DGRAM)
    udp_port = random.randint(20000, 60000)  # a multicast port of this test's own
    mcu = tmp / "mcu"
    can_section = r'^interface = "udp_multicast".*\nchannel = .*\noptions = \{ port = 43113 \}'
    run = _example("hil.toml")
    run = _sub(can_section, _can_lines(transport, channels[1], udp_port, daemon=True), run)
    run = _sub(r"^port = 30501$", f"port = {someip_port}", run)
    run = _sub(r'^port = "/tmp/cerebellumd-hil/mcu".*$', f'port = "{mcu}"', run)
    run = _sub(r"^reconnect_max_ms = 1000$", "reconnect_max_ms = 200", run)
    run = _sub(r"^port = 9108$", f"port = {metrics_port}", run)
    run = _sub(r"^release_ms = 4000$", "release_ms = 1000", run)
    sim = _example("hil-sim.toml")
    sim = _sub(r'^cycle = "udds".*$', f'cycle = "{tmp / "short.csv"}"', sim)
    sim = _sub(r'^interface = "udp_multicast".*\nchannel = .*\noptions = \{ port = 43113 \}',
               _can_lines(transport, channels[0], udp_port, daemon=False), sim)
    sim = _sub(r"^port = 30501$", f"port = {someip_port}", sim)
    sim = _sub(r'^link = "/tmp/cerebellumd-hil/mcu"$', f'link = "{mcu}"', sim)
    # The MCU asks for the accelerator at plant 6 s and lets it go at 14 s (before the highway).
    sim = _sub(r"^at_s = 5$", "at_s = 6", sim)
    sim = _sub(r"^at_s = 15$", "at_s = 14", sim)
    (tmp / "short.csv").write_text(CYCLE)
    (tmp / "run.toml").write_text(run)
    (tmp / "sim.toml").write_text(sim)
    return tmp / "run.toml", tmp / "sim.toml", metrics_port


class Processes:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[str]]] = []

    def start(self, name: str, *argv: str) -> subprocess.Popen[str]:
        log = (self.tmp / f"{name}.log").open("w")
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=log, text=True)
        self.procs.append((name, proc))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{(self.tmp / f'{name}.log').read_text()[-3000:]}" for name, _ in self.procs)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop()


def wait_for(predicate, timeout: float, what: str, procs: Processes):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.procs:
            if proc.poll() is not None and name == "run":
                raise AssertionError(f"{name} exited with {proc.returncode}\n{procs.logs()}")
        result = predicate()
        if result:
            return result
        time.sleep(0.1)  # polling interval of a deadline loop, not a wait for an event
    raise AssertionError(f"timed out waiting for {what}\n{procs.logs()}")


def _try_scrape(port: int) -> dict | None:
    try:
        return scrape(port)
    except OSError:
        return None


def _vcan() -> Iterator[str]:
    name = f"vcan{random.randint(100, 999)}"
    try:
        proc = subprocess.run(["ip", "link", "add", "dev", name, "type", "vcan"], capture_output=True, text=True,
                              timeout=10, check=False)
    except FileNotFoundError:
        pytest.skip("socketcan HIL: no `ip` command on this machine")
    if proc.returncode != 0:
        pytest.skip(f"socketcan HIL: cannot create a vcan interface ({proc.stderr.strip() or proc.returncode}); "
                    "this kernel has no vcan module or we lack CAP_NET_ADMIN")
    subprocess.run(["ip", "link", "set", "up", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "delete", name], check=False, timeout=10)


@pytest.fixture
def can_channels(request: pytest.FixtureRequest, tmp_path: Path, processes: Processes) -> Iterator[tuple[str, str]]:
    transport = request.param
    if transport == "udp_multicast":
        yield ("", "")
    elif transport == "slcan":
        if shutil.which("socat") is None:
            pytest.skip("slcan HIL needs socat (apt-get install socat)")
        adapter, host = tmp_path / "slcan-adapter", tmp_path / "slcan-host"
        processes.start("socat", "socat", "-d", "-d", f"pty,raw,echo=0,link={adapter}",
                        f"pty,raw,echo=0,link={host}")
        wait_for(lambda: adapter.exists() and host.exists(), 10, "socat's pty pair", processes)
        yield (str(adapter), str(host))
    else:
        for name in _vcan():
            yield (name, name)


@pytest.mark.slow
@pytest.mark.parametrize("can_channels", ["udp_multicast", "slcan", "socketcan"], indirect=True)
def test_daemon_follows_the_plant_over_real_transports(
        tmp_path: Path, processes: Processes, can_channels: tuple[str, str], request: pytest.FixtureRequest) -> None:
    transport = request.node.callspec.params["can_channels"]
    run_toml, sim_toml, port = write_configs(tmp_path, transport, can_channels)
    processes.start("run", sys.executable, "-m", "cerebellumd", "run", "--config", str(run_toml))
    wait_for(lambda: _try_scrape(port), 30, "the daemon's metrics endpoint", processes)
    sim = processes.start("sim", sys.executable, "-m", "cerebellumd", "sim", "--config", str(sim_toml),
                          "--seed", "1", "--speedup", str(SPEEDUP))
    assert sim.stdout is not None
    ready = json.loads(sim.stdout.readline() or "{}")
    assert ready.get("ready"), processes.logs()
    assert [e[0] for e in ready["events"]] == ["highway"]

    def followed() -> dict | None:
        m = _try_scrape(port)
        if m is None:
            return None
        if (total(m, "cerebellumd_wakes_total", reason="demand:mcu_wake") >= 1
                and total(m, "cerebellumd_wakes_total", reason="demand:highway_assist") >= 1
                and total(m, "cerebellumd_sleeps_total") >= 2):
            return m
        return None

    m = wait_for(followed, 60, "wakes for the MCU's request and the highway event, and sleeps after both",
                 processes)
    assert sim.poll() is None, "the plant ended before the daemon followed it"
    # Every wake had a demand behind it; nothing woke for stale inputs.
    wakes = {dict(labels)["reason"]: v for (n, labels), v in m.items() if n == "cerebellumd_wakes_total"}
    assert all(reason.startswith("demand:") for reason, v in wakes.items() if v), wakes
    frames = total(m, "cerebellumd_can_frames_total", bus="vehicle")
    assert frames > 200, m
    assert total(m, "cerebellumd_can_errors_total", bus="vehicle", kind="decode") == 0
    assert total(m, "cerebellumd_can_errors_total", bus="vehicle", kind="unknown_id") == 0
    # SOME/IP- and MCU-fed signals are live while the plant runs.
    for signal in ("obstacle_m", "traffic_density", "battery_v", "accel_temp_c", "mcu_wake_request"):
        assert total(m, "cerebellumd_signal_stale", signal=signal) == 0, signal
    assert total(m, "cerebellumd_someip_messages_total", endpoint="adas") > 10
    assert total(m, "cerebellumd_someip_errors_total") == 0
    assert total(m, "cerebellumd_mcu_link_up") == 1
    assert total(m, "cerebellumd_mcu_requests_total", kind="wake") == 1
    # The rail followed the policy through the MCU and its power was measured (6 W while on).
    assert total(m, "cerebellumd_mcu_frames_total", direction="tx") >= 2
    assert total(m, "cerebellumd_domain_energy_joules_total", domain="accelerator") > 0
    # CAN keeps flowing: the counter grows between scrapes.
    wait_for(lambda: total(scrape(port), "cerebellumd_can_frames_total", bus="vehicle") > frames, 10,
             "more CAN frames", processes)
