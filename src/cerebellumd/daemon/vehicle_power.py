"""The parked car in the daemon (docs/parked.md): the vehicle power state, key-off and key-on,
the 12 V energy budget, and every reason the daemon keeps the car awake.

A part built by `daemon/assembly.py` with `[vehicle_power]`, `[battery]`, the narrow host
Protocols, the actuator, the accelerator model and two optional peers (NM, persistence). It
steps the pure `PowerFusion` and `BatteryBudget` (policies/vehicle_power.py) on every decision
tick and on its own timer (the decision ticker stops in NM bus sleep; the parked budget must not).

- The state is a *policy input* (`Inputs.parked`), not a signal: the demands are written against
  the DBC's signals and a synthetic signal would need a source kind of its own in `[signals]`;
  as an input the policy applies it the same way in the daemon and the evaluator (deny normal and
  anticipatory demands, rest in the deepest allowed state at once, stale signals are quiet) and
  its `min_dwell` bounds how fast a flapping ignition can cycle the accelerator.
- NM gets the fused ignition (on or cranking) as its KL15 request instead of the raw signal:
  key-off releases the network, NM goes to prepare-bus-sleep and clamps the accelerator.
- Readiness counts from the key-on's first evidence (the sample time, before the debounce) to the
  accelerator being in a state whose exit latency fits the policy's latency budget.
- When the budget, the low-passed voltage or the maximum parked time runs out, a target filter
  holds the accelerator `off` and the decision is exported (`cerebellumd_battery_power_down`,
  MQTT state), and the MCU is told the gateway may power down (POWER_DOWN_ALLOWED, acknowledged;
  docs/mcu-protocol.md). Without an MCU, or unacknowledged, the optional `power_down_command` runs.
- Keep-awake: while parked, each reason that keeps the accelerator or the bus awake (an awake
  hold, a lease, a critical demand, our NM request) is counted once per episode in
  `cerebellumd_keep_awake_total{reason}` and logged with its owner and stated reason.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine
from typing import Any, Protocol

from ..accel import AcceleratorModel, AccelState
from ..config.vehicle_power import BatteryConfig, VehiclePowerConfig
from ..drivers import subprocess_run
from ..drivers.mcu_protocol import Reason
from ..policies.nm import NmMode
from ..policies.types import HoldMode
from ..policies.vehicle_power import (
    VSS_LOW_VOLTAGE_SYSTEM_STATE,
    BatteryBudget,
    BudgetInputs,
    BudgetState,
    FusionInputs,
    FusionState,
    FusionStep,
    PowerFusion,
    PowerState,
    vehicle_nm_activity,
)
from .clock import Clock
from .host import AcceleratorHost, EnergyHost, Events, HoldsHost, Inputs, PowerDownLink, Snapshot, Undo, VehicleHost
from .metrics import Metrics
from .nm_service import NmService
from .persist import CORRUPT, MISSING, Persistence
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

KEEP_AWAKE_REASONS = ("hold", "lease", "critical_demand", "nm_request")
INPUT_EVENT_KINDS = ("edge", "debounced", "stale", "bad_value", "flapping")
POWER_DOWN_REASONS = ("budget", "voltage", "max_parked")
#: A power_down_command still running after this is killed (with its process group) and counted.
HOOK_TIMEOUT_S = 60.0
#: The reason code POWER_DOWN_ALLOWED carries (docs/mcu-protocol.md).
MCU_REASONS = {"budget": int(Reason.ENERGY_BUDGET), "voltage": int(Reason.LOW_BATTERY),
               "max_parked": int(Reason.PARKED_TIME)}
RESTORE_RESULTS = ("ok", "missing", "corrupt")
_NETWORK_MODES = frozenset({NmMode.REPEAT_MESSAGE, NmMode.NORMAL_OPERATION, NmMode.READY_SLEEP})
_DRIVING = frozenset({PowerState.ON, PowerState.CRANKING})
_PARKED = frozenset({PowerState.OFF, PowerState.ACCESSORY})


class VehiclePowerHost(Events, Inputs, HoldsHost, EnergyHost, VehicleHost, Protocol):
    """What the part needs of the daemon."""


class VehiclePower:
    def __init__(self, cfg: VehiclePowerConfig, battery: BatteryConfig, *, host: VehiclePowerHost,
                 actuator: AcceleratorHost, model: AcceleratorModel, clock: Clock, metrics: Metrics,
                 persistence: Persistence | None = None) -> None:
        self.config = cfg
        self.battery_config = battery
        self._host = host
        self._actuator = actuator
        self._model = model
        self._clock = clock
        self._persistence = persistence
        self.nm: NmService | None = None
        self.fusion = PowerFusion(cfg.params())
        self.fstate: FusionState = self.fusion.initial_state()
        self.budget_model = BatteryBudget(battery.params()) if battery.enabled else None
        self.budget: BudgetState | None = None
        self.keyon_at: float | None = None
        self.last_ready_s: float | None = None
        self.awake_reasons: dict[str, str] = {}  # reason -> who and why, while parked
        self.power_down_reason: str | None = None
        self._power_down_link: PowerDownLink | None = None
        self._decision_reason = ""
        self._nm_awake_since: float | None = None
        self._undo: list[Undo] = []
        self._task: asyncio.Task[None] | None = None
        self._hooks: set[asyncio.Task[None]] = set()
        self._stepping = False
        m = metrics
        self.m_state = m.gauge("cerebellumd_vehicle_power_state",
                               "1 for the fused vehicle power state (VSS Vehicle.LowVoltageSystemState).", ["state"])
        self.m_transitions = m.counter("cerebellumd_vehicle_power_transitions",
                                       "Vehicle power state changes, by state entered.", ["state"])
        self.m_inputs = m.counter("cerebellumd_vehicle_power_input_events",
                                  "Ignition input events: edge, debounced (a change that did not last), stale "
                                  "(a latched CAN source timed out), bad_value, flapping.", ["source", "kind"])
        self.m_ready = m.histogram("cerebellumd_keyon_ready_seconds",
                                   "Key-on (first evidence) to the accelerator in a state that meets the latency "
                                   "budget.", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.m_keep_awake = m.counter("cerebellumd_keep_awake",
                                      "Episodes in which the daemon kept the accelerator or the bus awake while the "
                                      "vehicle is off, by reason.", ["reason"])
        for s in PowerState:
            self.m_state.labels(s.value).set(1 if s is PowerState.UNDEFINED else 0)
            self.m_transitions.labels(s.value)
        for reason in KEEP_AWAKE_REASONS:
            self.m_keep_awake.labels(reason)
        for source in ("line", "can"):
            for kind in INPUT_EVENT_KINDS:
                self.m_inputs.labels(source, kind)
        if self.budget_model is not None:
            self.m_budget = m.gauge("cerebellumd_battery_budget_wh",
                                    "The gateway's 12 V energy budget (Wh): credited while driving, debited by every "
                                    "domain's draw while parked.")
            self.m_voltage = m.gauge("cerebellumd_battery_voltage_lpf_volts", "Low-passed battery voltage (V).")
            self.m_power_down = m.gauge("cerebellumd_battery_power_down",
                                        "1 while the gateway may power down, by reason (budget, voltage, max_parked).",
                                        ["reason"])
            self.m_decisions = m.counter("cerebellumd_battery_power_down_decisions",
                                         "Decisions that the gateway may power down, by reason.", ["reason"])
            self.m_restore = m.counter("cerebellumd_battery_budget_restores",
                                       "Budget at start: ok (from the state file), missing, corrupt (restarted at the "
                                       "floor).", ["result"])
            self.m_hook = m.counter("cerebellumd_battery_power_down_hook_runs",
                                    "Runs of battery.power_down_command, by result.", ["result"])
            self.m_link = m.counter("cerebellumd_battery_power_down_link",
                                    "POWER_DOWN_ALLOWED to the MCU, by result (acked, unacked, error, revoked).",
                                    ["result"])
            for result in ("acked", "unacked", "error", "revoked"):
                self.m_link.labels(result)
            for reason in POWER_DOWN_REASONS:
                self.m_power_down.labels(reason).set(0)
                self.m_decisions.labels(reason)
            for result in RESTORE_RESULTS:
                self.m_restore.labels(result)
            for result in ("ok", "error"):
                self.m_hook.labels(result)

    # -- part ----------------------------------------------------------------------------------

    def attach_nm(self, nm: NmService | None) -> None:
        """NM is built after this part (it takes `ignition` from here): set before start."""
        self.nm = nm

    def attach_power_down(self, link: PowerDownLink | None) -> None:
        """The gateway's supply through the MCU (built after this part): set before start."""
        self._power_down_link = link

    def budget_wh(self) -> float | None:
        """The 12 V budget now (None without `[battery]`): garage-mode leases are granted against it."""
        return self.budget.budget_wh if self.budget is not None else None

    async def async_start(self) -> None:
        if self.budget_model is not None:
            self.budget = self.budget_model.initial_state(self._restored_budget())
            self.m_budget.set(self.budget.budget_wh)
            if self._persistence is not None:
                self._undo.append(self._persistence.add_section("battery", self._dump_budget))
        self._undo += [
            self._host.on_tick(self.step),
            self._host.on_input_while_paused(self._on_input),
            self._host.on_decision(self._on_decision),
            self._actuator.add_target_filter("path:power_down", self._clamp),
            self._actuator.on_transition(self._on_transition),
        ]
        self.step(self._clock.now())
        self._task = asyncio.create_task(self._run(), name="vehicle-power")

    async def async_stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        while self._undo:
            self._undo.pop()()
        self._host.set_parked(False)
        hooks, self._hooks = list(self._hooks), set()
        for hook in hooks:
            hook.cancel()
        await asyncio.gather(*hooks, return_exceptions=True)

    async def _run(self) -> None:
        period = max(self._clock.wall_seconds(self.config.interval_ms / 1000), 0.001)
        while True:
            await asyncio.sleep(period)
            self.step(self._clock.now())

    def _on_input(self, t: float) -> None:
        self.step(self._clock.now())

    def _on_decision(self, snap: Snapshot) -> None:
        self._decision_reason = snap.reason

    # -- views ---------------------------------------------------------------------------------

    @property
    def state(self) -> PowerState:
        return self.fstate.state

    def ignition(self, now: float) -> bool | None:
        """KL15 for NM: on or cranking (accessory never requests the network: NM activity is one
        of the fusion's own sources). None while undefined."""
        if self.fstate.state is PowerState.UNDEFINED:
            return None
        return self.fstate.state in _DRIVING

    def state_extra(self) -> dict[str, Any]:
        f = self.fstate
        out: dict[str, Any] = {"vehicle_power": {
            "state": f.state.value, "vss": VSS_LOW_VOLTAGE_SYSTEM_STATE[f.state], "source": f.source,
            "can_latched": f.can_latched, "flapping": f.flapping,
            "keyon_ready_s": self.last_ready_s, "keep_awake": dict(self.awake_reasons),
        }}
        b = self.budget
        if b is not None:
            now = self._clock.now()
            out["battery"] = {
                "budget_wh": round(b.budget_wh, 4),
                "voltage_lpf_v": None if b.voltage_lpf is None else round(b.voltage_lpf, 3),
                "parked_s": None if b.parked_since is None else round(now - b.parked_since, 1),
                "power_down": b.power_down, "reason": b.reason,
            }
        return out

    # -- the step ------------------------------------------------------------------------------

    def step(self, now: float) -> None:
        if self._stepping:
            return
        self._stepping = True
        try:
            self._step(now)
        finally:
            self._stepping = False

    def _step(self, now: float) -> None:
        host, cfg = self._host, self.config
        nm_known = self.nm is not None and cfg.use_nm
        if nm_known and self.nm is not None:
            nm_state = self.nm.state
            awake = nm_state is not None and vehicle_nm_activity(
                nm_state.mode in _NETWORK_MODES, nm_state.last_activity, now, self.nm.nm.params.timeout_s)
            if awake and self._nm_awake_since is None:
                self._nm_awake_since = now
            elif not awake:
                self._nm_awake_since = None
        inputs = FusionInputs(
            line=host.latest_sample(cfg.line_signal),
            can_ignition=host.latest_sample(cfg.can_ignition_signal),
            power_mode=host.latest_sample(cfg.power_mode_signal),
            nm_awake_since=self._nm_awake_since, nm_known=nm_known)
        self.fstate, step = self.fusion.step(self.fstate, inputs, now)
        self._count(step)
        if step.changed:
            self._changed(step, now)
        self._check_ready(self._actuator.state, now)
        self._keep_awake(now)
        if self.budget_model is not None:
            self._step_budget(now)

    def _count(self, step: FusionStep) -> None:
        for source, n in step.edges.items():
            self.m_inputs.labels(source, "edge").inc(n)
        can = "can" if self.fstate.can_latched else "line"
        if step.debounced:
            self.m_inputs.labels(can, "debounced").inc()
            log.info("vehicle power: a change did not last its debounce (kept %s)", step.state.value)
        if step.went_stale:
            self.m_inputs.labels("can", "stale").inc()
            log.warning("vehicle power: CAN ignition/power mode silent for %d ms", self.config.can_timeout_ms)
        if step.bad_power_mode is not None:
            self.m_inputs.labels("can", "bad_value").inc()
            log.warning("vehicle power: power mode value %r is not in power_modes; ignored", step.bad_power_mode)
        if step.flapping_started:
            source = "can" if "can" in step.edges else "line"
            self.m_inputs.labels(source, "flapping").inc()
            log.warning("vehicle power: %s is flapping (%d edges in %.0f s); debounced, the accelerator follows at "
                        "most every min_dwell", source, self.config.flap_edges, self.config.flap_window_s)

    def _changed(self, step: FusionStep, now: float) -> None:
        old, new = step.previous, step.state
        self.m_state.labels(old.value).set(0)
        self.m_state.labels(new.value).set(1)
        self.m_transitions.labels(new.value).inc()
        log.info("vehicle power %s -> %s (%s)", old.value, new.value, step.source)
        parked = new is PowerState.OFF
        self._host.set_parked(parked)
        if not parked and old is PowerState.OFF:  # (a start with the ignition on is no key-on)
            self.keyon_at = step.evidence_at  # readiness counts from the first evidence
        elif parked:
            self.keyon_at = None
        if not parked and self.power_down_reason is not None:
            self._lift_power_down()

    # -- readiness -----------------------------------------------------------------------------

    def _ready(self, state: AccelState) -> bool:
        if state is AccelState.ACTIVE:
            return True
        if state not in self._model.exit:
            return False
        return self._model.exit_latency_s(state) <= self._host.latency_budget_s + 1e-9

    def _on_transition(self, state: AccelState, took_s: float) -> None:
        self._check_ready(state, self._clock.now())

    def _check_ready(self, state: AccelState, t: float) -> None:
        if self.keyon_at is None or not self._ready(state):
            return
        ready_s = max(0.0, t - self.keyon_at)
        self.keyon_at = None
        self.last_ready_s = ready_s
        self.m_ready.observe(ready_s)
        log.info("key-on to accelerator ready (%s): %.3f s", state.value, ready_s)

    # -- keep-awake ----------------------------------------------------------------------------

    def _keep_awake(self, now: float) -> None:
        reasons: dict[str, str] = {}
        if self.fstate.state is PowerState.OFF:
            for hold in self._host.active_holds(now):
                if hold.mode is HoldMode.AWAKE:
                    kind = "lease" if hold.owner.startswith("app:") else "hold"
                    reasons.setdefault(kind, f"{hold.owner}: {hold.reason}")
            reason = self._decision_reason
            if reason.startswith(("demand:", "stale:")):
                reasons["critical_demand"] = reason
            if self.nm is not None and self.nm.local_requested:
                reasons["nm_request"] = "the gateway requests the network"
        for kind, why in reasons.items():
            if kind not in self.awake_reasons:
                self.m_keep_awake.labels(kind).inc()
                log.info("keeping the car awake while parked: %s (%s)", kind, why)
        self.awake_reasons = reasons

    # -- the budget ----------------------------------------------------------------------------

    def _restored_budget(self) -> float | None:
        if self._persistence is None:
            self.m_restore.labels("missing").inc()
            return None
        raw = self._persistence.restored_section("battery")
        if raw is MISSING:
            self.m_restore.labels("missing").inc()
            log.info("battery budget: none saved; starting at the floor (%.1f Wh)",
                     self.battery_config.restore_floor_wh)
            return None
        value = raw.get("budget_wh") if isinstance(raw, dict) and raw is not CORRUPT else None
        if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                or value < 0):
            self.m_restore.labels("corrupt").inc()
            log.error("battery budget in the state file is corrupt (%r); restarting at the floor (%.1f Wh)",
                      raw if raw is not CORRUPT else "sections", self.battery_config.restore_floor_wh)
            return None
        self.m_restore.labels("ok").inc()
        return float(value)

    def _dump_budget(self) -> dict[str, float]:
        return {"budget_wh": self.budget.budget_wh if self.budget is not None else 0.0}

    def _step_budget(self, now: float) -> None:
        assert self.budget_model is not None and self.budget is not None
        cfg, host, state = self.battery_config, self._host, self.fstate.state
        voltage = host.signal_value(cfg.voltage_signal, now)
        current = host.signal_value(cfg.current_signal, now)
        battery_w = voltage * current if voltage is not None and current is not None else None
        inputs = BudgetInputs(driving=state in _DRIVING, parked=state in _PARKED,
                              draw_w=sum(host.domain_watts().values()), battery_w=battery_w, voltage_v=voltage)
        before = self.budget
        self.budget = self.budget_model.step(before, inputs, now)
        self.m_budget.set(self.budget.budget_wh)
        if self.budget.voltage_lpf is not None:
            self.m_voltage.set(self.budget.voltage_lpf)
        if self.budget.power_down and not before.power_down:
            self._power_down(self.budget.reason)

    def _power_down(self, reason: str) -> None:
        self.power_down_reason = reason
        self.m_power_down.labels(reason).set(1)
        self.m_decisions.labels(reason).inc()
        log.warning("battery: %s ran out; accelerator off, the gateway may power down", reason)
        self._actuator.reapply(AccelState.OFF)
        if self._power_down_link is not None:
            self._spawn(self._tell_mcu(reason), "power-down-mcu")
        elif self.battery_config.power_down_command:
            self._spawn(self._run_hook(reason), "power-down-hook")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    async def _tell_mcu(self, reason: str) -> None:
        """POWER_DOWN_ALLOWED to the MCU (acknowledged; the link repeats it). Unacknowledged, the
        configured power_down_command is the fallback: the gateway must not stay up on a flat battery
        because one frame was lost."""
        assert self._power_down_link is not None
        try:
            result = await self._power_down_link.async_allow_power_down(MCU_REASONS[reason])
        except Exception as exc:  # a link down or a bug: counted, and the fallback runs
            log.error("battery: telling the MCU the gateway may power down failed: %s", exc)
            self.m_link.labels("error").inc()
            acked = False
        else:
            acked = result.acked
            self.m_link.labels("acked" if acked else "unacked").inc()
            if not acked:
                log.error("battery: the MCU did not acknowledge the power-down permission (%s)", result.detail)
        if not acked and self.battery_config.power_down_command:
            await self._run_hook(reason)

    def _lift_power_down(self) -> None:
        reason, self.power_down_reason = self.power_down_reason, None
        if reason is not None:
            self.m_power_down.labels(reason).set(0)
            if self._power_down_link is not None:
                self._spawn(self._revoke(), "power-down-revoke")
        log.info("battery: key-on, power-down decision lifted")
        self._actuator.reapply(self._host.deepest_state)

    async def _revoke(self) -> None:
        assert self._power_down_link is not None
        try:
            result = await self._power_down_link.async_revoke_power_down()
        except Exception as exc:  # the MCU will cut the supply after its delay: say so loudly
            log.error("battery: revoking the power-down permission failed: %s", exc)
            self.m_link.labels("error").inc()
            return
        self.m_link.labels("revoked" if result.acked else "unacked").inc()

    def _clamp(self) -> AccelState | None:
        return AccelState.OFF if self.power_down_reason is not None else None

    async def _run_hook(self, reason: str) -> None:
        argv = [*self.battery_config.power_down_command, reason]
        try:
            done = await subprocess_run.run(argv, HOOK_TIMEOUT_S)
        except TimeoutError:  # before OSError: it is one; the hook's process group is killed
            self.m_hook.labels("error").inc()
            log.error("power_down_command %s did not finish within %.0f s; killed", argv[0], HOOK_TIMEOUT_S)
            return
        except OSError as exc:
            self.m_hook.labels("error").inc()
            log.error("power_down_command %s failed to start: %s", argv[0], exc)
            return
        if done.returncode == 0:
            self.m_hook.labels("ok").inc()
        else:
            self.m_hook.labels("error").inc()
            log.error("power_down_command exited %s: %s", done.returncode, done.stderr_tail(500))


__all__ = ["KEEP_AWAKE_REASONS", "VehiclePower"]
