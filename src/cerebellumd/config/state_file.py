"""The daemon's state file (`daemon.state_file`): its JSON layout, strict reading and atomic
writing. Read and written by the daemon's persistence (daemon/persist.py: energy totals, wake and
sleep counts, and parts' sections such as what calibration learned) and by the evaluator
(`evaluate --state` starts the configured policy from what a daemon learned; `--save-state`
writes what a drive taught it in a file a daemon can start from).

The policy's own sections, by name: `calibration` (policies/calibration.py `Calibration.to_dict`),
`learned_anticipation` (policies/learned.py `Learned.to_dict`) and `entry_risk`
(policies/entry_risk.py `EntryRisk.to_dict`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
#: Restored label sets are capped: a state file must not be able to blow up the registry.
MAX_RESTORED_LABELS = 256
#: Sections of the policy's learning.
CALIBRATION_SECTION = "calibration"
LEARNED_SECTION = "learned_anticipation"
ENTRY_RISK_SECTION = "entry_risk"


class StateFileError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Totals:
    joules: dict[str, float] = field(default_factory=dict)
    wakes: int = 0
    sleeps: int = 0
    wakes_by_reason: dict[str, float] = field(default_factory=dict)
    #: (state, reason) -> count; stored as a list of [state, reason, count] (JSON has no tuples).
    sleeps_by_state_reason: dict[tuple[str, str], float] = field(default_factory=dict)
    #: Parts' own sections, raw JSON values (validated by their part, not here).
    sections: dict[str, Any] = field(default_factory=dict)
    #: The file's `sections` was there but not an object: every part's section counts as corrupt.
    sections_corrupt: bool = False

    def to_json(self, node: str) -> str:
        return json.dumps({
            "schema": SCHEMA_VERSION,
            "node": node,
            "saved_at": time.time(),
            "joules": self.joules,
            "wakes": self.wakes,
            "sleeps": self.sleeps,
            "wakes_by_reason": self.wakes_by_reason,
            "sleeps_by_state_reason": [[s, r, n] for (s, r), n in self.sleeps_by_state_reason.items()],
            "sections": self.sections,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Totals:
        """Strict: anything not exactly as written by `to_json` is a StateFileError."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise StateFileError("corrupt", f"not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise StateFileError("corrupt", "top level is not an object")
        if raw.get("schema") != SCHEMA_VERSION:
            raise StateFileError("schema", f"schema {raw.get('schema')!r}, this version reads {SCHEMA_VERSION}")
        try:
            joules = {str(k): _amount(v) for k, v in _mapping(raw["joules"]).items()}
            wakes = int(_amount(raw["wakes"]))
            sleeps = int(_amount(raw["sleeps"]))
            by_reason = {str(k): _amount(v) for k, v in _mapping(raw.get("wakes_by_reason", {})).items()}
            by_state: dict[tuple[str, str], float] = {}
            for item in raw.get("sleeps_by_state_reason", []):
                if not (isinstance(item, list) and len(item) == 3):
                    raise ValueError("sleeps_by_state_reason entries are [state, reason, count]")
                by_state[(str(item[0]), str(item[1]))] = _amount(item[2])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError("corrupt", f"bad content: {exc!r}") from None
        if len(by_reason) > MAX_RESTORED_LABELS or len(by_state) > MAX_RESTORED_LABELS:
            raise StateFileError("corrupt", "too many label sets")
        sections = raw.get("sections", {})
        if not isinstance(sections, dict):  # the counters are good: only the parts' sections are lost
            return cls(joules, wakes, sleeps, by_reason, by_state, {}, True)
        return cls(joules, wakes, sleeps, by_reason, by_state, {str(k): v for k, v in sections.items()})


def _mapping(value: object) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _amount(value: object) -> float:
    # bool is an int in Python; a counter of `true` is a corrupt file, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"counter value {value!r} is not a finite non-negative number")
    return number


def write_atomic(path: Path, text: str) -> None:
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_totals(path: Path) -> Totals | None:
    """None when there is no file yet (first start); StateFileError when it is bad."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError("unreadable", f"cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise StateFileError("corrupt", "not UTF-8") from None
    return Totals.from_json(text)
