"""`cerebellumd check --here FILE`: the config against the machine it is about to run on.

`check` alone validates the file wherever it is (a laptop, CI). On the target, a config can be
valid and still name a CAN interface the kernel does not have, a serial port that is not
plugged in, or a directory that does not exist. The daemon starts all the same and retries (an
adapter that enumerates late is normal at boot), so such a typo shows only as a bus that never
opens. This is the check an engineer runs on the gateway before starting or flashing it.

What it looks at, each as the daemon would use it:

- CAN: socketcan needs AF_CAN in the kernel and a CAN netdev of that name (sysfs type 280), up,
  in CAN FD mode (MTU 72) when `fd = true`. The channel of slcan and python-can's other serial
  interfaces (`/dev/ttyACM0@115200`), or any channel under /dev, must be a character device we
  can read and write.
- `[mcu]`: its serial port, the same way.
- `[[someip]]`: the host must be one of this machine's addresses, and the port free.
- `[prometheus]`: the address and port must be bindable.
- `[mqtt]`: the TLS and password files readable, and the broker accepting TCP connections.
- `[daemon] state_file` and `[leases] path`: their directory must exist and be writable, and
  neither it nor the config may be writable by others (`security.check_files`).
- hwmon domains and rail sensors: one real read through the driver (`HwmonSensor.probe`).
- the accelerator driver: it loads here (its extra installed), and its own `preflight(options)`
  hook, where it has one, finds what its options name: the GPIO chip, the PCI function, the
  programs it runs, the device node (drivers/preflight_checks.py).

Errors are what the daemon would not get past by retrying: something absent. Warnings are what
it would: an interface down, a port taken, a broker not answering. Blocking (sysfs reads, socket
binds, one TCP connect each): the CLI runs it before any event loop exists.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import Config, hwmon_options
from ..drivers import registry
from ..drivers.hwmon import HwmonSensor
from ..drivers.preflight_checks import character_device
from .security import check_files
from .sources import ADDRESS_NOT_YET

Loc = tuple[str | int, ...]
SYS_NET = Path("/sys/class/net")
ARPHRD_CAN = 280
CANFD_MTU = 72
IFF_UP = 0x1
#: python-can interfaces whose channel is a serial port (`/dev/ttyACM0@115200` for slcan).
SERIAL_INTERFACES = frozenset({"slcan", "serial", "robotell", "seeedstudio"})


@dataclass(frozen=True)
class HostIssue:
    severity: Literal["error", "warning"]
    loc: Loc
    message: str


def _error(loc: Loc, message: str) -> HostIssue:
    return HostIssue("error", loc, message)


def _warning(loc: Loc, message: str) -> HostIssue:
    return HostIssue("warning", loc, message)


def check_host(config: Config, config_path: str | Path | None = None, *, sys_net: Path = SYS_NET,
               connect_timeout_s: float = 2.0) -> list[HostIssue]:
    """Every issue of `config` on this machine (empty: nothing found)."""
    return [
        *_can(config, sys_net),
        *_serial_ports(config),
        *_someip(config),
        *_prometheus(config),
        *_mqtt(config, connect_timeout_s),
        *_files(config, config_path),
        *_hwmon(config),
        *_accelerator(config),
    ]


# -- CAN -----------------------------------------------------------------------------------------


def _af_can_error() -> str | None:
    family = getattr(socket, "AF_CAN", None)
    if family is None:
        return "this Python has no AF_CAN (socketcan needs Linux)"
    try:
        socket.socket(family, socket.SOCK_RAW, socket.CAN_RAW).close()
    except OSError as exc:
        return f"this kernel has no AF_CAN ({exc.strerror}): load can and can_raw (modprobe can_raw)"
    return None


def _can(config: Config, sys_net: Path) -> Iterator[HostIssue]:
    af_can_checked = False
    for i, bus in enumerate(config.can):
        loc: Loc = ("can", i, "channel")
        if bus.interface == "socketcan":
            if not af_can_checked:
                af_can_checked = True
                missing = _af_can_error()
                if missing is not None:
                    yield _error(("can", i, "interface"), missing)
            yield from _can_netdev(loc, bus.channel, bus.fd, bus.bitrate, sys_net)
        elif bus.interface in SERIAL_INTERFACES or bus.channel.startswith("/dev/"):
            port = bus.channel.partition("@")[0]
            if port.startswith("/"):  # not socket://host:port (slcan over TCP) nor a COM name
                yield from _serial_device(loc, port)


def _can_netdev(loc: Loc, name: str, fd: bool, bitrate: int | None, sys_net: Path) -> Iterator[HostIssue]:
    device = sys_net / name
    if not device.exists():
        known = sorted(p.name for p in _can_netdevs(sys_net))
        yield _error(loc, f"no network interface {name!r} on this machine (CAN interfaces here: "
                          f"{', '.join(known) or 'none'}); the daemon would retry for ever")
        return
    kind = _read_int(device / "type")
    if kind is not None and kind != ARPHRD_CAN:
        yield _error(loc, f"{name!r} is not a CAN interface (link type {kind}, CAN is {ARPHRD_CAN})")
        return
    flags = _read_int(device / "flags", 16)
    if flags is not None and not flags & IFF_UP:
        yield _warning(loc, f"{name!r} is down: ip link set {name} up type can bitrate {bitrate or '...'} "
                            "(the daemon reads nothing until it is up)")
    mtu = _read_int(device / "mtu")
    if fd and mtu is not None and mtu != CANFD_MTU:
        yield _error(loc, f"fd = true but {name!r} is not in CAN FD mode (MTU {mtu}, FD is {CANFD_MTU}): "
                          f"ip link set {name} type can ... fd on")


def _can_netdevs(sys_net: Path) -> Iterator[Path]:
    try:
        devices = list(sys_net.iterdir())
    except OSError:
        return
    for device in devices:
        if _read_int(device / "type") == ARPHRD_CAN:
            yield device


def _read_int(path: Path, base: int = 10) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip(), base)
    except (OSError, ValueError):
        return None


# -- serial ports --------------------------------------------------------------------------------


def _serial_ports(config: Config) -> Iterator[HostIssue]:
    if config.mcu is not None:
        yield from _serial_device(("mcu", "port"), config.mcu.port)


def _serial_device(loc: Loc, path: str) -> Iterator[HostIssue]:
    problem = character_device(path, "serial port", "not plugged in, or another name: ls /dev/serial/by-id/")
    if problem is not None:
        yield HostIssue(problem[0], loc, problem[1])


# -- sockets -------------------------------------------------------------------------------------


def _bind_issue(loc: Loc, what: str, family: int, kind: int, host: str, port: int) -> HostIssue | None:
    try:
        with socket.socket(family, kind) as s:
            s.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return _warning(loc, f"{what} {host}:{port} is in use by another socket (a running cerebellumd?)")
        if exc.errno in ADDRESS_NOT_YET:
            return _error(loc, f"{what} {host} is not an address of this machine ({exc.strerror}); "
                               "the daemon would keep retrying to bind it")
        return _error(loc, f"{what} {host}:{port}: {exc.strerror}")
    return None


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _someip(config: Config) -> Iterator[HostIssue]:
    for i, endpoint in enumerate(config.someip):
        issue = _bind_issue(("someip", i, "host"), "SOME/IP endpoint", _family(endpoint.host), socket.SOCK_DGRAM,
                            endpoint.host, endpoint.port)
        if issue is not None:
            yield issue


def _prometheus(config: Config) -> Iterator[HostIssue]:
    p = config.prometheus
    if p.enabled:
        issue = _bind_issue(("prometheus", "port"), "metrics endpoint", _family(p.address), socket.SOCK_STREAM,
                            p.address, p.port)
        if issue is not None:
            yield issue


def _mqtt(config: Config, timeout_s: float) -> Iterator[HostIssue]:
    m = config.mqtt
    if not m.enabled:
        return
    for key in ("password_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = getattr(m, key)
        if path is not None and not os.access(path, os.R_OK):
            yield _error(("mqtt", key), f"{path} is not readable by this user" if Path(path).exists()
                         else f"{path} does not exist")
    try:
        socket.create_connection((m.host, m.port), timeout=timeout_s).close()
    except OSError as exc:
        yield _warning(("mqtt", "host"), f"no MQTT broker answers at {m.host}:{m.port} "
                                         f"({exc.strerror or exc}); the daemon retries with backoff")


# -- files and sensors ---------------------------------------------------------------------------


def _files(config: Config, config_path: str | Path | None) -> Iterator[HostIssue]:
    places: list[tuple[Loc, Path]] = []
    if config.daemon.state_file is not None:
        places.append((("daemon", "state_file"), Path(config.daemon.state_file)))
    if config.leases.enabled:
        places.append((("leases", "path"), config.leases.path))
    for loc, path in places:
        directory = path.parent
        if not directory.is_dir():
            yield _error(loc, f"directory {directory} does not exist")
        elif not os.access(directory, os.W_OK | os.X_OK):
            yield _error(loc, f"directory {directory} is not writable by this user (uid {os.getuid()})")
    for finding in check_files(config_path, config.daemon.state_file):
        loc = ("daemon", "state_file") if finding.kind == "state_dir" else ()
        yield _warning(loc, f"{finding}: another local user could change what the daemon does")


def _hwmon(config: Config) -> Iterator[HostIssue]:
    sensors: list[tuple[Loc, HwmonSensor]] = []
    try:
        for i, domain in enumerate(config.power.domains):
            if domain.source == "hwmon":
                sensors.append((("power", "domains", i, "sensor"), HwmonSensor(hwmon_options(domain))))
        for rail, sensor in config.power.rail_sensors.items():
            if sensor.driver == "hwmon":
                sensors.append((("power", "rail_sensors", rail), HwmonSensor(sensor.options)))
    except ValueError as exc:  # `check` has validated these options already; say so if not
        yield _error(("power",), f"hwmon options: {exc}")
        return
    for loc, hwmon in sensors:
        try:
            hwmon.probe()
        except ValueError as exc:
            yield _error(loc, str(exc))


def _accelerator(config: Config) -> Iterator[HostIssue]:
    accel = config.accelerator
    try:
        factory = registry.load("accelerator", accel.driver)
    except (KeyError, ImportError) as exc:
        yield _error(("accelerator", "driver"), f"driver {accel.driver!r} cannot be loaded here: {exc}")
        return
    hook = getattr(factory, "preflight", None)
    if hook is None or (accel.driver == "mcu" and config.mcu is not None):
        return  # nothing to look at, or the driver runs on [mcu]'s link, checked above
    try:
        problems = hook(accel.options)
    except ValueError as exc:
        yield _error(("accelerator", "options"), f"{accel.driver} options: {exc}")
        return
    for severity, message in problems:
        yield HostIssue(severity, ("accelerator", "options"), message)
