"""`cerebellumd check --here`: a config against this machine (daemon/preflight.py).

Real sockets, a real pty, real directories and the real /sys/class/net. The CAN netdevs'
attributes (type, flags, MTU) are also read from a directory laid out as /sys/class/net, since
this kernel may have no vcan to create one with.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cerebellumd.config import Config, parse_config
from cerebellumd.daemon.preflight import HostIssue, check_host

from .helpers import free_port
from .test_hwmon import make_device

pytestmark = pytest.mark.timeout(60)


def config(text: str) -> Config:
    # prometheus off unless a test sets it: 9108 may be taken by a daemon another test runs
    return parse_config(text if "[prometheus]" in text else text + "\n[prometheus]\nenabled = false\n")


def by_key(issues: list[HostIssue]) -> dict[tuple[str | int, ...], list[HostIssue]]:
    out: dict[tuple[str | int, ...], list[HostIssue]] = {}
    for issue in issues:
        out.setdefault(issue.loc, []).append(issue)
    return out


def kernel_has_af_can() -> bool:
    try:
        socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW).close()
    except (OSError, AttributeError):
        return False
    return True


def netdev(root: Path, name: str, kind: int, flags: int, mtu: int) -> None:
    device = root / name
    device.mkdir(parents=True)
    (device / "type").write_text(f"{kind}\n")
    (device / "flags").write_text(f"{flags:#x}\n")
    (device / "mtu").write_text(f"{mtu}\n")


def bus(name: str, interface: str, channel: str, fd: bool = False) -> str:
    return (f'[[can]]\nname = "{name}"\ninterface = "{interface}"\nchannel = "{channel}"\n'
            f"fd = {str(fd).lower()}\n\n")


def test_socketcan_channels_are_checked_as_the_kernel_lists_them(tmp_path: Path) -> None:
    sys_net = tmp_path / "net"
    netdev(sys_net, "can0", 280, 0x1002, 16)  # a CAN netdev, down, classic MTU
    netdev(sys_net, "can1", 280, 0x1003, 72)  # up, FD
    netdev(sys_net, "eth0", 1, 0x1003, 1500)
    cfg = config(bus("down", "socketcan", "can0", fd=True) + bus("fine", "socketcan", "can1", fd=True)
                 + bus("eth", "socketcan", "eth0") + bus("typo", "socketcan", "can9"))
    issues = by_key(check_host(cfg, sys_net=sys_net))

    down = issues.pop(("can", 0, "channel"))
    assert sorted(i.severity for i in down) == ["error", "warning"]
    assert any("'can0' is down" in i.message and i.severity == "warning" for i in down)
    assert any("not in CAN FD mode (MTU 16" in i.message and i.severity == "error" for i in down)
    [eth] = issues.pop(("can", 2, "channel"))
    assert eth.severity == "error" and "not a CAN interface (link type 1" in eth.message
    [typo] = issues.pop(("can", 3, "channel"))
    assert typo.severity == "error" and "no network interface 'can9'" in typo.message
    assert "CAN interfaces here: can0, can1)" in typo.message  # eth0 is not offered
    # AF_CAN is checked once, against this kernel, whatever the sysfs says
    af_can = issues.pop(("can", 0, "interface"), [])
    assert bool(af_can) == (not kernel_has_af_can())
    assert all("AF_CAN" in i.message and i.severity == "error" for i in af_can)
    assert issues == {}  # can1 is up and in FD mode: nothing to say


def test_a_socketcan_channel_missing_from_the_real_sysfs_is_an_error() -> None:
    present = sorted(p.name for p in Path("/sys/class/net").iterdir())
    name = "cbdabsent0"
    assert name not in present
    issues = by_key(check_host(config(bus("vehicle", "socketcan", name))))
    [missing] = issues[("can", 0, "channel")]
    assert missing.severity == "error" and f"no network interface {name!r}" in missing.message


@pytest.fixture
def pty_path() -> Iterator[str]:
    primary, secondary = os.openpty()
    try:
        yield os.ttyname(secondary)
    finally:
        os.close(primary)
        os.close(secondary)


def test_serial_ports_of_slcan_and_the_mcu_must_be_character_devices(tmp_path: Path, pty_path: str) -> None:
    plain = tmp_path / "ttyFAKE"
    plain.write_text("")
    text = (bus("pty", "slcan", f"{pty_path}@115200") + bus("plain", "slcan", f"{plain}@115200")
            + bus("gone", "slcan", "/dev/ttyCBDABSENT0@500000") + bus("udp", "udp_multicast", "239.74.163.3")
            + f'[mcu]\nport = "{tmp_path / "mcu"}"\n')
    issues = by_key(check_host(config(text)))
    assert ("can", 0, "channel") not in issues  # a real pty: a character device we may open
    [not_chr] = issues.pop(("can", 1, "channel"))
    assert not_chr.severity == "error" and "is not a character device" in not_chr.message
    [gone] = issues.pop(("can", 2, "channel"))
    assert gone.severity == "error" and "/dev/ttyCBDABSENT0 does not exist" in gone.message  # without "@500000"
    [mcu] = issues.pop(("mcu", "port"))
    assert mcu.severity == "error" and "does not exist" in mcu.message
    assert issues == {}  # udp_multicast has no device to look at
    ok = check_host(config(f'[mcu]\nport = "{pty_path}"\n'))
    assert ok == []


def someip(host: str, port: int, name: str = "adas") -> str:
    return (f'[[someip]]\nname = "{name}"\nhost = "{host}"\nport = {port}\n\n[[someip.fields]]\n'
            f'notification = "{name}"\nservice_id = 0x1234\nevent_id = 0x8001\nfield = "gap"\noffset = 0\n'
            'type = "u8"\n\n')


def test_addresses_and_ports_are_bound_as_the_daemon_would() -> None:
    udp_port, tcp_port, broker_port = free_port(socket.SOCK_DGRAM), free_port(), free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held_udp, socket.socket() as held_tcp:
        held_udp.bind(("127.0.0.1", udp_port))
        held_tcp.bind(("127.0.0.1", tcp_port))
        held_tcp.listen()
        text = (someip("127.0.0.1", udp_port) + someip("192.0.2.10", 30501, "radar")
                + f'[prometheus]\nenabled = true\naddress = "127.0.0.1"\nport = {tcp_port}\n\n'
                + f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker_port}\n'
                + 'tls_ca_file = "/nonexistent/ca.pem"\n')
        issues = by_key(check_host(config(text), connect_timeout_s=2.0))
    [taken] = issues.pop(("someip", 0, "host"))
    assert taken.severity == "warning" and f"127.0.0.1:{udp_port} is in use" in taken.message
    [foreign] = issues.pop(("someip", 1, "host"))
    assert foreign.severity == "error" and "192.0.2.10 is not an address of this machine" in foreign.message
    [metrics] = issues.pop(("prometheus", "port"))
    assert metrics.severity == "warning" and f"metrics endpoint 127.0.0.1:{tcp_port} is in use" in metrics.message
    [ca] = issues.pop(("mqtt", "tls_ca_file"))
    assert ca.severity == "error" and "/nonexistent/ca.pem does not exist" in ca.message
    [broker] = issues.pop(("mqtt", "host"))
    assert broker.severity == "warning" and f"no MQTT broker answers at 127.0.0.1:{broker_port}" in broker.message
    assert issues == {}


def test_a_broker_that_accepts_connections_and_free_ports_raise_nothing() -> None:
    with socket.socket() as broker:
        broker.bind(("127.0.0.1", 0))
        broker.listen()
        port = broker.getsockname()[1]
        text = (someip("127.0.0.1", free_port(socket.SOCK_DGRAM))
                + f'[prometheus]\nenabled = true\naddress = "127.0.0.1"\nport = {free_port()}\n\n'
                + f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n')
        assert check_host(config(text)) == []


def test_directories_and_file_modes(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    text = (f'[daemon]\nstate_file = "{tmp_path / "absent" / "state.json"}"\n\n'
            f'[leases]\nenabled = true\npath = "{tmp_path / "run" / "leases.sock"}"\n')
    issues = by_key(check_host(config(text)))
    [state] = issues.pop(("daemon", "state_file"))
    assert state.severity == "error" and f"directory {tmp_path / 'absent'} does not exist" in state.message
    [leases] = issues.pop(("leases", "path"))
    assert leases.severity == "error" and "does not exist" in leases.message
    assert issues == {}

    cfg_file = tmp_path / "cerebellumd.toml"
    cfg_file.write_text("")
    cfg_file.chmod(0o666)
    issues = by_key(check_host(config(f'[daemon]\nstate_file = "{shared / "state.json"}"\n'), cfg_file))
    [state_dir] = issues.pop(("daemon", "state_file"))
    assert state_dir.severity == "warning" and "state dir" in state_dir.message and "others" in state_dir.message
    [config_file] = issues.pop(())
    assert config_file.severity == "warning" and f"config file {cfg_file} is writable" in config_file.message
    assert issues == {}


def test_hwmon_sensors_are_read_once(tmp_path: Path) -> None:
    root = tmp_path / "hwmon"
    make_device(root, 0, {"name": "ina226", "power1_input": "7250000"})
    text = ('[[power.domains]]\nname = "accelerator"\nsource = "hwmon"\n'
            f'options = {{ root = "{root}", name = "ina226" }}\n\n'
            '[[power.domains]]\nname = "npu"\nsource = "hwmon"\nsensor = "VDD_NPU"\n'
            f'options = {{ root = "{root}" }}\n')
    issues = by_key(check_host(config(text)))
    [npu] = issues.pop(("power", "domains", 1, "sensor"))
    assert npu.severity == "error" and f"no hwmon device under {root} with label='VDD_NPU'" in npu.message
    assert issues == {}  # the ina226 was found and read


def accelerator(driver: str, options: str) -> str:
    return f'[accelerator]\ndriver = "{driver}"\noptions = {options}\n'


def test_accelerator_drivers_check_what_their_options_name(tmp_path: Path, pty_path: str) -> None:
    tool = tmp_path / "npu-power"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    cases = {
        # every program it would run must be there: one on PATH, one by path, one missing
        "command": ('{ commands = { sleep = ["true"], active = ["' + str(tool) + '"], '
                    'off = ["/nonexistent/npu-off"] }, status = ["cbd-absent-status-tool"] }',
                    ["error: commands.off: '/nonexistent/npu-off' is not an executable file nor found on PATH",
                     "error: status: 'cbd-absent-status-tool' is not an executable file nor found on PATH"]),
        # nvpmodel is looked for only when modes are configured
        "jetson": ('{ suspend = ["true"], wake = ["' + str(tool) + '"], status = ["/nonexistent/status"] }',
                   ["error: status: '/nonexistent/status' is not an executable file nor found on PATH"]),
        "pcie_runtime_pm": (f'{{ address = "0000:0f:00.0", root = "{tmp_path}" }}',
                            [f"warning: PCI device 0000:0f:00.0 is not present under {tmp_path}"]),
        "mcu": (f'{{ link = {{ port = "{tmp_path / "ttyNONE"}" }} }}',
                [f"error: MCU serial port {tmp_path / 'ttyNONE'} does not exist"]),
        "hailo_pcie": (f'{{ address = "0000:0f:00.0", root = "{tmp_path}", device_node = "{tmp_path / "hailo0"}" }}',
                       [f"warning: PCI device 0000:0f:00.0 is not present under {tmp_path}",
                        f"warning: {tmp_path / 'hailo0'} does not exist (is hailo_pci loaded and bound?)"]),
        "coral_pcie": (f'{{ address = "0000:0f:00.0", root = "{tmp_path}", '
                       f'rail = {{ chip = "{tmp_path / "gpiochip7"}", enable_line = 3 }} }}',
                       [f"error: GPIO chip {tmp_path / 'gpiochip7'} does not exist",
                        f"warning: PCI device 0000:0f:00.0 is not present under {tmp_path}"]),
        "simulated": ("{}", []),
    }
    for driver, (options, expected) in cases.items():
        issues = check_host(config(accelerator(driver, options)))
        found = sorted(f"{i.severity}: {i.message}" for i in issues)
        assert all(i.loc == ("accelerator", "options") for i in issues), (driver, issues)
        assert len(found) == len(expected), (driver, found)
        assert all(f.startswith(e) for f, e in zip(found, sorted(expected), strict=True)), (driver, found)

    (tmp_path / "0000:0f:00.0").mkdir()  # the function enumerated: nothing to say
    pcie = f'{{ address = "0000:0f:00.0", root = "{tmp_path}" }}'
    assert check_host(config(accelerator("pcie_runtime_pm", pcie))) == []
    assert check_host(config(accelerator("mcu", f'{{ link = {{ port = "{pty_path}" }} }}'))) == []


def test_an_accelerator_driver_that_cannot_load_here_is_named(tmp_path: Path) -> None:
    try:
        import gpiod  # noqa: F401
    except ImportError:
        [issue] = check_host(config(accelerator("gpio", '{ enable_line = 5 }')))
        assert issue.loc == ("accelerator", "driver") and "driver 'gpio' cannot be loaded here" in issue.message
    else:  # with the [gpio] extra, the chip it names is looked at
        chip = tmp_path / "gpiochip9"
        [issue] = check_host(config(accelerator("gpio", f'{{ chip = "{chip}", enable_line = 5 }}')))
        assert issue.loc == ("accelerator", "options") and f"GPIO chip {chip} does not exist" in issue.message


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cerebellumd", *args], capture_output=True, text=True, timeout=60)


def test_check_here_exits_1_on_errors_with_file_and_line_and_0_on_warnings(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[prometheus]\nenabled = false\n\n"
                    "[daemon]\nnode = \"bench\"\n\n"
                    f'[mcu]\nport = "{tmp_path / "ttyMCU"}"\nbaudrate = 115200\n')
    assert run_cli("check", str(path)).returncode == 0  # valid anywhere
    result = run_cli("check", "--here", str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert f"{path}:8: mcu.port: serial port {tmp_path / 'ttyMCU'} does not exist" in result.stderr

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        path.write_text(f'[prometheus]\nenabled = true\naddress = "127.0.0.1"\nport = {port}\n')
        result = run_cli("check", "--here", str(path))
    assert result.returncode == 0 and result.stdout.strip() == "OK"
    assert f"{path}:4: prometheus.port: metrics endpoint 127.0.0.1:{port} is in use" in result.stderr
    assert result.stderr.rstrip().endswith("(warning)")
