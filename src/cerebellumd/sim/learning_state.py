"""What the configured policy learned, between the evaluator and the daemon's state file.

`evaluate --state FILE` starts the configured policy from the calibration, the learned-anticipation
table and entry risk's challenge counts a daemon persisted (`daemon.state_file`), as the daemon
itself does after a restart: the
evaluation of a car that has driven before, not of its first drive. `--save-state FILE` writes
what the drive taught it into that file's layout, so that drives can be chained
(`--state a.json --save-state a.json`) and a daemon can start from a state learned offline.

Saving into an existing state file keeps its energy totals, counts and other sections and
replaces only the policy's sections; a new file starts the daemon's totals at zero. A file
that does not read back is an error naming it, never silently replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..config.state_file import (
    CALIBRATION_SECTION,
    ENTRY_RISK_SECTION,
    LEARNED_SECTION,
    StateFileError,
    Totals,
    read_totals,
    write_atomic,
)
from ..policies.calibration import Calibration, parse_calibration
from ..policies.cerebellum import PolicyState
from ..policies.entry_risk import EntryRisk, parse_entry_risk
from ..policies.learned import Learned
from ..policies.types import PolicyParams

#: The state file's sections that hold what the policy learned.
POLICY_SECTIONS = (CALIBRATION_SECTION, LEARNED_SECTION, ENTRY_RISK_SECTION)


class LearningStateError(ValueError):
    """A state file the evaluator cannot start from or save into; the message names the file."""


@dataclass(frozen=True, slots=True)
class Learning:
    """What the configured policy starts from; None: a section the file lacks (the policy then
    starts from its configuration there)."""

    calibration: Calibration | None = None
    learned: Learned | None = None
    entry_risk: EntryRisk | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """For `run_evaluation`, `evaluate` and `evaluate_recording`."""
        return {"calibration": self.calibration, "learned": self.learned, "entry_risk": self.entry_risk}


def read_learning(path: str | Path, params: PolicyParams) -> Learning:
    """What a daemon's state file says the policy learned. A learned table saved under other
    features, or while learning was off, starts empty, as in the daemon."""
    return learning_from_sections(read_sections(path), params, path)


def read_sections(path: str | Path) -> dict[str, Any]:
    """The policy's sections of a daemon's state file, raw (JSON values; absent ones left
    out): what a sweep ships to its workers, which parse them per grid point."""
    totals = _read(Path(path), must_exist=True)
    assert totals is not None
    return {k: totals.sections[k] for k in POLICY_SECTIONS if k in totals.sections}


def learning_from_sections(sections: dict[str, Any], params: PolicyParams, path: str | Path) -> Learning:
    """`read_sections`' result parsed for a policy (`path` names the file in errors)."""
    calibration: Calibration | None = None
    raw = sections.get(CALIBRATION_SECTION)
    if raw is not None:
        # The drive's time starts at 0: a restored clean stretch starts with the drive, as the
        # daemon's starts when it restarts.
        calibration = parse_calibration(raw, 0.0)
        if calibration is None:
            raise LearningStateError(f"{path}: section {CALIBRATION_SECTION!r} does not read back: {raw!r}")
    learned: Learned | None = None
    raw = sections.get(LEARNED_SECTION)
    if raw is not None and params.learned.enabled:
        try:
            learned = Learned.from_dict(raw, params.learned)
        except ValueError as exc:
            raise LearningStateError(f"{path}: section {LEARNED_SECTION!r} does not read back: {exc}") from None
    entry_risk: EntryRisk | None = None
    raw = sections.get(ENTRY_RISK_SECTION)
    if raw is not None:
        entry_risk = parse_entry_risk(raw)
        if entry_risk is None:
            raise LearningStateError(f"{path}: section {ENTRY_RISK_SECTION!r} does not read back: {raw!r}")
    return Learning(calibration, learned, entry_risk)


def save_learning(path: str | Path, config: Config, params: PolicyParams, state: PolicyState, now: float) -> None:
    """Write the policy's sections, from its `state` at the end of a drive, into the state file
    at `path` (created, or updated in place), as the daemon saves them at `now` (the end of the
    drive, on the drive's clock)."""
    target = Path(path)
    totals = _read(target, must_exist=False) or Totals()
    totals.sections.update(learning_sections(params, state, now))
    try:
        write_atomic(target, totals.to_json(config.daemon.node))
    except OSError as exc:
        raise LearningStateError(f"{path}: cannot write: {exc.strerror or exc}") from None


def learning_sections(params: PolicyParams, state: PolicyState, now: float) -> dict[str, Any]:
    """The policy's sections, from its `state`, as a daemon persists them at `now`
    (`learning_from_sections` reads them back)."""
    return {CALIBRATION_SECTION: state.calibration.to_dict(now),
            LEARNED_SECTION: state.learned.to_dict(params.learned) if params.learned.enabled else None,
            ENTRY_RISK_SECTION: state.entry_risk.to_dict()}


def _read(path: Path, *, must_exist: bool) -> Totals | None:
    try:
        totals = read_totals(path)
    except StateFileError as exc:
        raise LearningStateError(f"{path}: not a state file a daemon wrote ({exc.kind}: {exc})") from None
    if totals is None and must_exist:
        raise LearningStateError(f"{path}: no such state file")
    if totals is not None and totals.sections_corrupt:
        raise LearningStateError(f"{path}: its 'sections' is not an object")
    return totals
