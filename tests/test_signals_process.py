"""Signals against real `cerebellumd run` processes: SIGTERM, SIGKILL + restart, SIGHUP (valid
and invalid), a corrupt state file at start, and the systemd notify/watchdog protocol.

The accelerator is the `command` driver running a small real "vendor tool" that records the
commanded state in a file: what the daemon left the accelerator in after SIGTERM is read from
that file, written by a separate program, not from the daemon's own word. The daemon has no CAN
bus (the default power domains still integrate energy: gateway 3.5 W constant)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_demo_e2e import free_port, scrape, total

pytestmark = pytest.mark.slow
GATEWAY_W = 3.5


def poll(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        time.sleep(0.05)  # poll interval, not a wait for an outcome


class Node:
    """One test's files: config, tool, accelerator state file, daemon state file, log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.accel = root / "accelerator"
        self.accel.write_text("idle")
        self.tool = root / "tool.py"
        self.tool.write_text(
            "import pathlib, sys\n"
            f"state = pathlib.Path({str(self.accel)!r})\n"
            "if sys.argv[1] == 'set':\n"
            "    state.write_text(sys.argv[2])\n"
            "else:\n"
            "    print(state.read_text())\n")
        self.state_file = root / "state" / "energy.json"
        self.config = root / "cerebellumd.toml"
        self.port = free_port()
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def toml(self, *, demands: str = "", persist_s: float = 0.5) -> str:
        tool = [sys.executable, str(self.tool)]
        states = ("off", "sleep", "idle", "active")
        commands = ", ".join(f'{s} = {json.dumps([*tool, "set", "{state}"])}' for s in states)
        return f"""
[daemon]
node = "proc"
tick_ms = 10
telemetry_interval_ms = 100
initial_state = "idle"
safe_state = "off"
state_file = "{self.state_file}"
persist_interval_s = {persist_s}

[accelerator]
driver = "command"
command_timeout_ms = 5000
[accelerator.options]
commands = {{ {commands} }}
status = {json.dumps([*tool, "get"])}

[policy]
min_dwell_ms = 0
release_ms = 0
deepest_state = "idle"  # only SIGTERM may move it to `off` (the safe state)

[prometheus]
address = "127.0.0.1"
port = {self.port}
{demands}
"""

    def write_config(self, text: str) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)  # the daemon never reads a half-written config

    def start(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cerebellumd", "--log-format", "json", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})})
        poll(self.metrics_up, what="metrics endpoint")
        return self.proc

    def metrics_up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            scrape(self.port)
        except OSError:
            return False
        return True

    def metric(self, name: str, **labels: str) -> float:
        return total(scrape(self.port), name, **labels)

    def log_records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    n.write_config(n.toml())
    yield n
    n.stop()


def saved_joules(node: Node, domain: str = "gateway") -> float:
    body = json.loads(node.state_file.read_text())
    return float(body["joules"][domain])


def test_sigterm_leaves_safe_state_and_persists(node: Node) -> None:
    proc = node.start()
    poll(lambda: node.metric("cerebellumd_domain_energy_joules_total", domain="gateway") > 1.0, what="energy")
    seen = node.metric("cerebellumd_domain_energy_joules_total", domain="gateway")
    assert node.accel.read_text() == "idle"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert node.accel.read_text() == "off", "the tool was not told to go to the safe state"
    assert saved_joules(node) >= seen  # the stop save covers everything scraped before it
    records = node.log_records()
    assert not [r for r in records if r["level"] == "error"], records
    assert not list(node.state_file.parent.glob(".*.tmp")), "a temp file was left behind"


def test_sigkill_then_restart_resumes_energy(node: Node) -> None:
    persist_s = 0.5
    proc = node.start()
    poll(lambda: node.metric("cerebellumd_state_file_writes_total") >= 3, what="three saves")
    before_kill = node.metric("cerebellumd_domain_energy_joules_total", domain="gateway")
    wakes_before = node.metric("cerebellumd_wakes_total")
    proc.kill()
    proc.wait()
    node.start()
    resumed = node.metric("cerebellumd_domain_energy_joules_total", domain="gateway")
    # At most one persist interval of energy is lost (plus scheduling slack on a busy box).
    assert resumed >= before_kill - GATEWAY_W * persist_s * 1.5, (before_kill, resumed)
    assert resumed > GATEWAY_W * persist_s  # and it really resumed: not a fresh counter
    assert node.metric("cerebellumd_wakes_total") >= wakes_before
    assert node.metric("cerebellumd_state_file_errors_total") == 0


def test_sighup_valid_change_is_applied(node: Node) -> None:
    proc = node.start()
    assert node.metric("cerebellumd_config_reloads_total", result="ok") == 0
    node.write_config(node.toml(demands='[[demands]]\nname = "always"\nwhen = "true"\nclass = "normal"\n'))
    proc.send_signal(signal.SIGHUP)
    poll(lambda: node.metric("cerebellumd_config_reloads_total", result="ok") == 1, what="reload ok")
    # Applied, not just parsed: the new demand drives the accelerator awake through the tool.
    poll(lambda: node.metric("cerebellumd_demand_active", demand="always") == 1, what="new demand active")
    poll(lambda: node.accel.read_text() == "active", what="accelerator woken by the new demand")
    assert node.metric("cerebellumd_wakes_total", reason="demand:always") == 1
    assert node.metric("cerebellumd_config_reloads_total", result="error") == 0


def test_sighup_new_domain_and_demand_then_sigterm_is_safe(node: Node) -> None:
    """A new user's first reload: one constant domain and one demand added. The domain accrues
    from zero while the others keep their totals, the demand wakes, and SIGTERM afterwards still
    leaves the accelerator in `off` with exit 0. A restart-only change is then refused whole."""
    proc = node.start()
    poll(lambda: node.metric("cerebellumd_domain_energy_joules_total", domain="gateway") > 0.5, what="energy")
    demand = '[[demands]]\nname = "always"\nwhen = "true"\nclass = "normal"\n'
    domains = ('[[power.domains]]\nname = "gateway"\nsource = "constant"\nwatts = 3.5\n'
               '[[power.domains]]\nname = "radio"\nsource = "constant"\nwatts = 2.0\n')
    node.write_config(node.toml(demands=demand + domains))
    before = node.metric("cerebellumd_domain_energy_joules_total", domain="gateway")
    proc.send_signal(signal.SIGHUP)
    poll(lambda: node.metric("cerebellumd_config_reloads_total", result="ok") == 1, what="reload ok")
    poll(lambda: node.metric("cerebellumd_domain_energy_joules_total", domain="radio") > 0.2, what="radio accrues")
    assert node.metric("cerebellumd_domain_energy_joules_total", domain="gateway") >= before  # kept, not reset
    poll(lambda: node.accel.read_text() == "active", what="accelerator woken by the new demand")
    node.write_config(node.toml(demands=demand + domains).replace('node = "proc"', 'node = "renamed"'))
    proc.send_signal(signal.SIGHUP)
    poll(lambda: node.metric("cerebellumd_config_reloads_total", result="restart_required") == 1,
         what="restart-only change refused")
    assert node.metric("cerebellumd_domain_energy_joules_total", domain="radio") > 0  # still the live config
    assert any("daemon.node" in str(r["msg"]) and "restart" in str(r["msg"]) for r in node.log_records())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, node.log.read_text()
    assert node.accel.read_text() == "off"  # the safe state, written by the tool itself
    assert not any(r["level"] == "error" for r in node.log_records()), node.log.read_text()


def test_sighup_invalid_file_keeps_old_config(node: Node) -> None:
    node.write_config(node.toml(demands='[[demands]]\nname = "always"\nwhen = "true"\nclass = "normal"\n'))
    proc = node.start()
    poll(lambda: node.accel.read_text() == "active", what="woken by the configured demand")
    node.write_config("[daemon]\ntick_ms = -5\n[[demands]]\nname = \"x\"\nwhen = \"__import__('os')\"\n")
    proc.send_signal(signal.SIGHUP)
    poll(lambda: node.metric("cerebellumd_config_reloads_total", result="error") == 1, what="reload error")
    decisions = node.metric("cerebellumd_decision_seconds_count")
    poll(lambda: node.metric("cerebellumd_decision_seconds_count") > decisions + 20, what="still deciding")
    assert proc.poll() is None
    assert node.metric("cerebellumd_config_reloads_total", result="ok") == 0
    assert node.metric("cerebellumd_demand_active", demand="always") == 1  # the old policy still runs
    assert node.accel.read_text() == "active"
    assert any("reload failed" in str(r["msg"]) for r in node.log_records())


def test_corrupt_state_file_at_start_is_reported_and_replaced(node: Node) -> None:
    node.state_file.parent.mkdir(parents=True)
    node.state_file.write_bytes(b'{"schema": 1, "joules": {"gateway": 12')  # a write cut by power loss
    node.start()
    assert node.metric("cerebellumd_state_file_errors_total", kind="corrupt") == 1
    body = json.loads(node.state_file.read_text())  # replaced by a good file
    assert body["schema"] == 1
    assert node.state_file.with_name("energy.json.corrupt").exists()
    decisions = node.metric("cerebellumd_decision_seconds_count")
    poll(lambda: node.metric("cerebellumd_decision_seconds_count") > decisions + 20, what="daemon runs")
    assert any(r["level"] == "error" and "state file" in str(r["msg"]) for r in node.log_records())


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def test_systemd_watchdog_pings_and_stops_when_stalled(node: Node) -> None:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    sock_dir = tempfile.mkdtemp(prefix="cbd-notify-")
    path = os.path.join(sock_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    received: list[str] = []

    def recv_for(seconds: float) -> list[str]:
        got = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                break
        received.extend(got)
        return got

    def recv_until(predicate: Callable[[list[str]], bool], timeout: float) -> None:
        end = time.monotonic() + timeout
        while not predicate(received):
            if time.monotonic() > end:
                raise AssertionError(f"notify messages so far: {received}")
            recv_for(0.1)

    try:
        proc = node.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})  # ping every ~100 ms
        recv_until(lambda r: "READY=1" in r and r.count("WATCHDOG=1") >= 3, 10)
        assert received.index("READY=1") < received.index("WATCHDOG=1")
        overruns = node.metric("cerebellumd_tick_overruns_total", loop="decision")
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            poll(lambda: _proc_state(proc.pid) == "T", timeout=5, what="process stopped")
            sock.setblocking(False)
            while True:  # drain what was sent before the stop took effect
                try:
                    sock.recv(4096)
                except BlockingIOError:
                    break
            # Five watchdog periods without a ping: systemd (WatchdogSec) would restart us.
            assert recv_for(1.0) == [], "watchdog pinged while the loop was stalled"
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        received.clear()
        recv_until(lambda r: "WATCHDOG=1" in r, 5)
        # The stall shows in the metrics as missed periods (skipped, not replayed).
        assert node.metric("cerebellumd_tick_overruns_total", loop="decision") >= overruns + 50
        proc.send_signal(signal.SIGTERM)
        recv_until(lambda r: "STOPPING=1" in r, 10)
        assert proc.wait(timeout=20) == 0
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(sock_dir)
