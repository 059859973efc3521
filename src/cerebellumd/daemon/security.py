"""Start-up checks of the files the daemon trusts (docs/SECURITY.md).

The config decides when the accelerator may sleep (and which program the `command` driver
runs); the state file's directory decides where counters are written. If group or others can
write either, another local user can change what the daemon does. The daemon still starts (a
bench board often runs as one user), but says so loudly: a log warning and
`cerebellumd_insecure_files{kind}` = 1, which an alert rule can watch.
"""

from __future__ import annotations

import asyncio
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

from .metrics import Metrics

log = logging.getLogger(__name__)

KINDS = ("config_file", "state_dir")


@dataclass(frozen=True)
class Finding:
    kind: str  # config_file | state_dir
    path: Path
    mode: int

    def __str__(self) -> str:
        who = " and ".join(w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if self.mode & bit)
        return f"{self.kind.replace('_', ' ')} {self.path} is writable by {who} (mode {stat.filemode(self.mode)})"


def _writable_by_others(path: Path) -> int | None:
    """The mode when group/other can write, else None (also None when it cannot be stat'ed)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    # A sticky world-writable dir (/tmp) counts too: others cannot replace our file there,
    # but they can fill the disk under it or race the first creation.
    return mode if mode & (stat.S_IWGRP | stat.S_IWOTH) else None


def check_files(config_path: str | Path | None, state_file: str | Path | None) -> list[Finding]:
    """Blocking (stat calls): run it in a worker thread from the loop."""
    found: list[Finding] = []
    if config_path is not None:
        mode = _writable_by_others(Path(config_path))
        if mode is not None:
            found.append(Finding("config_file", Path(config_path), mode))
    if state_file is not None:
        directory = Path(state_file).parent
        mode = _writable_by_others(directory)
        if mode is not None:
            found.append(Finding("state_dir", directory, mode))
    return found


class FileCheck:
    """Part: checks once at start; nothing to stop."""

    def __init__(self, config_path: str | Path | None, state_file: str | Path | None, metrics: Metrics) -> None:
        self.config_path = config_path
        self.state_file = state_file
        self.gauge = metrics.gauge(
            "cerebellumd_insecure_files", "1 when a trusted file or directory is writable by group/others.",
            ["kind"])
        for kind in KINDS:
            self.gauge.labels(kind).set(0)
        self.findings: list[Finding] = []

    async def async_start(self) -> None:
        self.findings = await asyncio.to_thread(check_files, self.config_path, self.state_file)
        for finding in self.findings:
            self.gauge.labels(finding.kind).set(1)
            log.warning("security: %s; another local user could change what the daemon does", finding)

    async def async_stop(self) -> None:
        return None
