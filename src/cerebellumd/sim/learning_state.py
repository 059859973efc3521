"""What the configured policy learned, between the evaluator and the daemon's state file.

`evaluate --state FILE` starts the configured policy from the calibration and learned-anticipation
table a daemon persisted (`daemon.state_file`), as the daemon itself does after a restart: the
evaluation of a car that has driven before, not of its first drive. `--save-state FILE` writes
what the drive taught it into that file's layout, so that drives can be chained
(`--state a.json --save-state a.json`) and a daemon can start from a state learned offline.

Saving into an existing state file keeps its energy totals, counts and other sections and
replaces only the policy's two sections; a new file starts the daemon's totals at zero. A file
that does not read back is an error naming it, never silently replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..config.state_file import CALIBRATION_SECTION, LEARNED_SECTION, StateFileError, Totals, read_totals, write_atomic
from ..policies.calibration import Calibration, parse_calibration
from ..policies.learned import Learned
from ..policies.types import PolicyParams


class LearningStateError(ValueError):
    """A state file the evaluator cannot start from or save into; the message names the file."""


def read_learning(path: str | Path, params: PolicyParams) -> tuple[Calibration | None, Learned | None]:
    """(calibration, learned table) from a daemon's state file; None for a section it lacks (the
    policy then starts from its configuration there). A learned table saved under other features,
    or while learning was off, starts empty, as in the daemon."""
    return learning_from_sections(read_sections(path), params, path)


def read_sections(path: str | Path) -> dict[str, Any]:
    """The policy's two sections of a daemon's state file, raw (JSON values; absent ones left
    out): what a sweep ships to its workers, which parse them per grid point."""
    totals = _read(Path(path), must_exist=True)
    assert totals is not None
    return {k: totals.sections[k] for k in (CALIBRATION_SECTION, LEARNED_SECTION) if k in totals.sections}


def learning_from_sections(sections: dict[str, Any], params: PolicyParams,
                           path: str | Path) -> tuple[Calibration | None, Learned | None]:
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
    return calibration, learned


def save_learning(path: str | Path, config: Config, params: PolicyParams, calibration: Calibration,
                  learned: Learned, now: float) -> None:
    """Write the policy's two sections into the state file at `path` (created, or updated in
    place), as the daemon saves them at `now` (the end of the drive, on the drive's clock)."""
    target = Path(path)
    totals = _read(target, must_exist=False) or Totals()
    totals.sections.update(learning_sections(params, calibration, learned, now))
    try:
        write_atomic(target, totals.to_json(config.daemon.node))
    except OSError as exc:
        raise LearningStateError(f"{path}: cannot write: {exc.strerror or exc}") from None


def learning_sections(params: PolicyParams, calibration: Calibration, learned: Learned,
                      now: float) -> dict[str, Any]:
    """The policy's two sections as a daemon persists them at `now` (`learning_from_sections`
    reads them back)."""
    return {CALIBRATION_SECTION: calibration.to_dict(now),
            LEARNED_SECTION: learned.to_dict(params.learned) if params.learned.enabled else None}


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
