"""The policy's self-calibrating readiness (policies/calibration.py) in the daemon: the learned
latency budget for unannounced challenges is exported (`cerebellumd_unannounced_budget_seconds`,
`cerebellumd_late_wakes`), shown in MQTT `state` under `calibration`, and persisted in the state
file's `calibration` section so that a restart does not forget what late wakes taught.
Learned anticipation's table (onsets and exposure per context, policies/learned.py) is persisted
in the `learned_anticipation` section the same way, when the config enables it; a table learned
on other features starts empty, one that does not read back is counted as corrupt and ignored.
Entry risk's challenge counts (policies/entry_risk.py: the share of challenges that came
unannounced) are persisted in the `entry_risk` section, so that a restart does not fall back to
the prior share; counts that do not read back are counted as corrupt and ignored.

A saved calibration that does not read back (not an object, a budget that is no finite
non-negative number) is ignored and counted (`cerebellumd_state_file_errors_total{kind="corrupt"}`
through persistence's own counter); the policy then starts from its configured budget.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ..config.state_file import CALIBRATION_SECTION, ENTRY_RISK_SECTION, LEARNED_SECTION
from ..policies.calibration import parse_calibration
from ..policies.entry_risk import parse_entry_risk
from .clock import Clock
from .host import CalibrationHost, Events, Undo
from .metrics import Metrics
from .persist import CORRUPT, MISSING, Persistence

log = logging.getLogger(__name__)


class CalibrationPartHost(CalibrationHost, Events, Protocol):
    """The calibration accessors and the telemetry tick."""


class CalibrationPart:
    def __init__(self, *, host: CalibrationPartHost, clock: Clock, metrics: Metrics,
                 persistence: Persistence | None = None) -> None:
        self._host = host
        self._clock = clock
        self._persistence = persistence
        self._undo: list[Undo] = []
        self.restored = False
        self.restored_contexts = 0
        self.m_budget = metrics.gauge(
            "cerebellumd_unannounced_budget_seconds",
            "Latency budget in force for unannounced challenges (learned from late wakes, or configured).")
        self.m_late = metrics.gauge("cerebellumd_late_wakes", "Wakes that came after their challenge's deadline.")
        self.m_errors = metrics.counter(
            "cerebellumd_state_file_errors", "State file problems by kind (corrupt, schema, unreadable, write).",
            ["kind"])

    async def async_start(self) -> None:
        if self._persistence is not None:
            self._restore(self._persistence.restored_section(CALIBRATION_SECTION))
            self._undo.append(self._persistence.add_section(CALIBRATION_SECTION, self._dump))
            self._restore_learned(self._persistence.restored_section(LEARNED_SECTION))
            self._undo.append(self._persistence.add_section(LEARNED_SECTION, self._host.learned_table))
            self._restore_entry_risk(self._persistence.restored_section(ENTRY_RISK_SECTION))
            self._undo.append(self._persistence.add_section(ENTRY_RISK_SECTION, self._dump_entry_risk))
        self._undo.append(self._host.on_telemetry(self._on_telemetry))
        self._on_telemetry(self._clock.now())

    async def async_stop(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _restore(self, raw: Any) -> None:
        if raw is MISSING:
            return
        calibration = parse_calibration(raw, self._clock.now()) if raw is not CORRUPT else None
        if calibration is None:
            self.m_errors.labels("corrupt").inc()
            log.error("state file: the saved calibration does not read back (%r); starting from the configured "
                      "latency budget", raw)
            return
        self._host.restore_calibration(calibration)
        self.restored = True
        log.info("calibration restored: unannounced budget %s, %d late wakes so far",
                 "configured" if calibration.budget_s is None else f"{calibration.budget_s:.3f} s",
                 calibration.late_wakes)

    def _restore_learned(self, raw: Any) -> None:
        if raw is MISSING or raw is None:  # None: saved while learning was off
            return
        try:
            if raw is CORRUPT:
                raise ValueError("corrupt section")
            self.restored_contexts = self._host.restore_learned(raw)
        except ValueError as exc:
            self.m_errors.labels("corrupt").inc()
            log.error("state file: the saved learned-anticipation table does not read back (%s); learning from "
                      "nothing", exc)
            return
        log.info("learned anticipation restored: %d contexts", self.restored_contexts)

    def _restore_entry_risk(self, raw: Any) -> None:
        if raw is MISSING or raw is None:
            return
        risk = parse_entry_risk(raw) if raw is not CORRUPT else None
        if risk is None:
            self.m_errors.labels("corrupt").inc()
            log.error("state file: the saved entry-risk counts do not read back (%r); starting from the prior share",
                      raw)
            return
        self._host.restore_entry_risk(risk)
        log.info("entry risk restored: %.0f challenges, %.0f unannounced", risk.challenges, risk.unannounced)

    def _dump_entry_risk(self) -> dict[str, Any] | None:
        risk = self._host.entry_risk()
        return risk.to_dict() if risk is not None else None

    def _dump(self) -> dict[str, Any] | None:
        calibration = self._host.calibration()
        return calibration.to_dict(self._clock.now()) if calibration is not None else None

    def _on_telemetry(self, _now: float) -> None:
        self.m_budget.set(self._host.unannounced_budget_s())
        calibration = self._host.calibration()
        self.m_late.set(calibration.late_wakes if calibration is not None else 0)

    def state_extra(self) -> dict[str, Any]:
        calibration = self._host.calibration()
        # What is in force now (not the persisted form, which leaves out a tightening that only
        # this drive keeps).
        learned: dict[str, Any] = {} if calibration is None else {
            "budget_s": calibration.budget_s, "late_wakes": calibration.late_wakes,
            "worst_lateness_s": calibration.worst_lateness_s,
            # the budget's probation: whether the world has confirmed it, and the rest seconds spent at idle so far
            "trusted": calibration.trusted, "probation_used_s": round(calibration.probation_used_s, 1)}
        risk = self._host.entry_risk()
        if risk is not None:  # what spaces out entries into sleep (policies/entry_risk.py)
            learned["challenges"] = round(risk.challenges, 3)
            learned["unannounced_share"] = round(risk.unannounced_share(self._host.entry_risk_params()), 3)
        return {"calibration": {"unannounced_budget_s": round(self._host.unannounced_budget_s(), 3), **learned}}

