"""The base install is the gateway's runtime: `cerebellumd run` imports none of what the extras
bring (numpy, matplotlib, dask, rich), and a command whose extra is missing names it.

The daemon runs as a real process on the shipped demo config with its bus switched to
udp_multicast, fed by this test; it writes the modules it loaded when it exits (after a
SIGTERM once frames were decoded and ticks had run), so everything imported from start-up to
shutdown is in the list.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import can
import cantools
import pytest

from cerebellumd.config import builtin_example
from cerebellumd.sim.vehicle import load_vehicle_dbc

from .helpers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GROUP = "239.74.163.9"  # not the default group: a concurrently running HIL test does not mix in
DEADLINE_S = 30.0
#: Top-level modules the extras bring; `run` must load none of them.
EXTRA_MODULES = {"numpy", "matplotlib", "PIL", "contourpy", "kiwisolver", "fontTools", "dask", "distributed",
                 "rich", "pygments", "markdown_it"}

#: Top-level modules of features the demo config does not configure (MQTT, the MCU's serial link).
UNCONFIGURED_MODULES = {"aiomqtt", "paho", "serial", "serial_asyncio_fast"}
#: The SOME/IP codec, receiver and SD client: only their option models are needed without `[[someip]]`.
UNCONFIGURED_OWN_MODULES = {"cerebellumd.drivers.someip", "cerebellumd.drivers.someip_sd",
                            "cerebellumd.drivers.someip_sd_udp"}
#: The evaluator's drive cycles and event models: `run` builds the `evaluate` parser only.
SIM_ONLY_MODULES = {"cerebellumd.sim.cycles", "cerebellumd.sim.events", "cerebellumd.sim.events_config"}


def lean_config(udp_port: int, metrics_port: int) -> str:
    """The shipped demo config, its virtual bus replaced by udp_multicast on a private port."""
    text = builtin_example()
    can_block = (
        '[[can]]\nname = "vehicle"\ninterface = "udp_multicast"\n'
        f'channel = "{GROUP}"\ndbc = "builtin:vehicle.dbc"\n'
        f"silence_timeout_ms = 1000\n[can.options]\nport = {udp_port}\n\n"
    )
    text, n = re.subn(r"\[\[can\]\].*?(?=# -- signals)", can_block, text, flags=re.S)
    assert n == 1
    return text.replace("port = 9108", f"port = {metrics_port}")


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def poll(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.05)  # polling interval of a deadline loop, not a wait for an outcome


def frames(db: cantools.database.can.Database) -> Iterator[can.Message]:
    msg = db.get_message_by_name("VehicleDynamics")
    values = {s.name: 0 for s in msg.signals}
    values["VehicleSpeed"] = 42
    while True:
        yield can.Message(arbitration_id=msg.frame_id, data=msg.encode(values), is_extended_id=msg.is_extended_frame)


def run_cli(tmp_path: Path, argv: list[str], *, block: tuple[str, ...] = (), modules_out: Path | None = None,
            **popen: object) -> subprocess.Popen[str]:
    """`cerebellumd ARGV` in a fresh interpreter; `block` modules import as if not installed."""
    code = ("import json, sys\n"
            # a finder in front of the others: `import x` fails exactly as for a package not installed
            "class Absent:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name in {list(block)!r}:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Absent())\n"
            "from cerebellumd.cli import main\n"
            f"rc = main({argv!r})\n")
    if modules_out is not None:
        code += f"open({str(modules_out)!r}, 'w').write(json.dumps(sorted(sys.modules)))\n"
    code += "raise SystemExit(rc)\n"
    return subprocess.Popen([sys.executable, "-c", code], text=True, cwd=tmp_path, **popen)  # type: ignore[call-overload]


@pytest.mark.timeout(90)
def test_run_loads_no_extra_module(tmp_path: Path) -> None:
    udp_port, metrics_port = 45000 + os.getpid() % 1000, free_port()
    config = tmp_path / "lean.toml"
    config.write_text(lean_config(udp_port, metrics_port))
    config.chmod(0o600)
    modules_out = tmp_path / "modules.json"
    daemon = run_cli(tmp_path, ["run", "--config", str(config)], modules_out=modules_out,
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = load_vehicle_dbc()
    feed = frames(db)
    try:
        with can.Bus(interface="udp_multicast", channel=GROUP, port=udp_port) as bus:
            def decided() -> bool:
                assert daemon.poll() is None, f"daemon exited: {daemon.stderr.read() if daemon.stderr else ''}"
                bus.send(next(feed))
                try:
                    m = scrape(metrics_port)
                except OSError:
                    return False
                return (m.get("cerebellumd_can_frames_total", 0) > 0
                        and m.get("cerebellumd_decision_seconds_count", 0) > 0)

            poll(decided, "frames decoded and ticks run")
            # status on the same daemon without rich: plain lines, not a crash
            status = run_cli(tmp_path, ["status", "--url", f"http://127.0.0.1:{metrics_port}/metrics"],
                             block=("rich",), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = status.communicate(timeout=DEADLINE_S)
            assert status.returncode == 0, err
            assert out.startswith("cerebellumd (metrics, online)") and "accelerator" in out, out
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=DEADLINE_S)
        assert daemon.returncode == 0, err[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    loaded = json.loads(modules_out.read_text())
    assert "cerebellumd.daemon.runtime" in loaded and "can.interfaces.udp_multicast" in loaded  # it did run
    tops = {m.partition(".")[0] for m in loaded}
    assert not tops & EXTRA_MODULES, sorted(tops & EXTRA_MODULES)
    # What only some configs need is imported when configured (docs/PERFORMANCE.md, memory of `run`):
    # the demo has no [mqtt] and no [mcu], and `run` evaluates no scenario.
    sections = tomllib.loads(config.read_text())
    assert "mqtt" not in sections and "mcu" not in sections and "someip" not in sections
    assert not tops & UNCONFIGURED_MODULES, sorted(tops & UNCONFIGURED_MODULES)
    assert not set(loaded) & UNCONFIGURED_OWN_MODULES, sorted(set(loaded) & UNCONFIGURED_OWN_MODULES)
    assert not set(loaded) & SIM_ONLY_MODULES, sorted(set(loaded) & SIM_ONLY_MODULES)


@pytest.mark.parametrize(("argv", "blocked", "extra"), [
    (["demo", "--duration", "1", "--no-live", "--port", "0"], "numpy", "sim"),
    (["evaluate", "--scenario", "udds", "--json"], "numpy", "sim"),
    (["evaluate", "--scenario", "udds", "--plot", "x.png"], "matplotlib", "plot"),
    (["sweep", "none.toml", "--dask", "127.0.0.1:1"], "distributed", "dask"),
    (["sim", "--config", "none.toml"], "rich", "sim"),
    (["run", "--config", "lean.toml"], "msgpack", "multicast"),  # a udp_multicast bus
])
def test_a_missing_extra_is_named(tmp_path: Path, argv: list[str], blocked: str, extra: str) -> None:
    (tmp_path / "lean.toml").write_text(lean_config(45999, free_port()))
    (tmp_path / "lean.toml").chmod(0o600)
    proc = run_cli(tmp_path, argv, block=(blocked,), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 2, (out, err)
    assert f"needs {blocked}, which is not installed: pip install 'cerebellumd[{extra}]'" in err
    assert "Traceback" not in err


def test_base_dependencies_are_the_runtime() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert not names & {"numpy", "matplotlib", "rich", "dask", "msgpack", "pyserial", "uvloop", "gpiod", "atheris"}
    assert "python-can[serial]" in " ".join(project["dependencies"])  # pyserial through python-can's own extra
    extras = project["optional-dependencies"]
    assert any(d.startswith("python-can[multicast]") for d in extras["multicast"])
    # `pip install '.[test]'` still brings everything the suite imports
    test_extra = " ".join(extras["test"])
    for needed in ("sim", "plot", "dask", "rt", "gpio", "fuzz", "multicast"):
        assert re.search(rf"cerebellumd\[[^\]]*\b{needed}\b", test_extra), needed
