"""What `cerebellumd check --here` asks of a device or program, shared by the daemon's preflight
(daemon/preflight.py) and the drivers' own `preflight(options)` hooks.

A driver class may define `preflight(options) -> list[Problem]` (a staticmethod): what its
options name that is not usable on this machine, each a (severity, message) pair. Blocking
(stat, sysfs): called by the CLI, never from the event loop.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]
Problem = tuple[Severity, str]


def character_device(path: str | Path, what: str = "device", hint: str = "") -> Problem | None:
    """A character device this user can read and write; `hint` says where to look when absent."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "error", f"{what} {path} does not exist" + (f" ({hint})" if hint else "")
    except OSError as exc:
        return "error", f"{what} {path}: {exc.strerror}"
    if not stat.S_ISCHR(mode):
        return "error", f"{what} {path} is not a character device"
    if not os.access(path, os.R_OK | os.W_OK):
        return "error", (f"{what} {path} is not readable and writable by this user (uid {os.getuid()}): "
                         "add it to the device's group")
    return None


def program(argv: list[str] | None, what: str) -> Problem | None:
    """argv[0] is an executable file, or found on PATH as the daemon would find it."""
    if not argv:
        return None
    if shutil.which(argv[0]) is None:
        return "error", f"{what}: {argv[0]!r} is not an executable file nor found on PATH"
    return None
