"""`[vehicle_power]` and `[battery]`: the parked car (docs/parked.md). Each default names its
source; the openpilot ones are from `system/hardware/power_monitoring.py` and
`ignition_state.py`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..policies.vehicle_power import STATE_NAMES, BudgetParams, FusionParams


class VehiclePowerConfig(BaseModel):
    """`[vehicle_power]`: one vehicle power state (off / accessory / on / cranking) fused from
    an ignition line, CAN ignition or power-mode signals and NM bus activity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        False, description="Fuse the ignition sources; the state is a policy input (off = parked).")
    line_signal: str | None = Field(
        None, description="Signal with the ignition line (KL15): a GPIO or the MCU heartbeat's flag "
                          "(signals.X.mcu = \"ignition\"), or an analog voltage.")
    can_ignition_signal: str | None = Field(
        None, description="Signal with a CAN KL15 bit (non-zero = on).")
    power_mode_signal: str | None = Field(
        None, description="Signal with a CAN power-mode value; mapped to a state by power_modes.")
    power_modes: dict[str, str] = Field(
        default_factory=dict,
        description="Raw power-mode value (as a TOML key, e.g. \"2\") -> off | accessory | on | cranking "
                    "(or the VSS names OFF, LOCK, ACC, ON, START). Unmapped values are counted as bad.")
    use_nm: bool = Field(
        True, description="With [nm] enabled: a validated NM wake is evidence of `accessory`, NM bus sleep of "
                          "`off` when no line or CAN source says otherwise.")
    line_on_threshold: float = Field(
        0.5, description="The line is on at or above this (a 0/1 flag: 0.5; an analog KL15 input: e.g. 9 V).")
    line_off_threshold: float = Field(
        0.5, description="The line is off at or below this; between the two thresholds the last level holds "
                         "(separate thresholds: WiCAN #162, one threshold flaps).")
    line_timeout_ms: int = Field(
        1500, gt=0, description="A line sample older than this is unknown (default: the MCU link's "
                                "heartbeat_timeout_ms, docs/mcu-protocol.md).")
    can_timeout_ms: int = Field(
        2000, gt=0, description="A CAN ignition or power-mode sample older than this no longer counts "
                                "(openpilot's 2 s ignition-message timeout).")
    on_debounce_ms: int = Field(
        50, ge=0, description="A change towards accessory/on/cranking must hold this long (short: readiness is "
                              "counted from the first evidence anyway; longer than a contact bounce).")
    off_debounce_ms: int = Field(
        1000, ge=0, description="A change to off must hold this long (half the 2 s CAN timeout: a lost frame or "
                                "two never parks the car).")
    flap_window_s: float = Field(
        10.0, gt=0, description="Window in which input edges are counted for the flapping alarm.")
    flap_edges: int = Field(
        6, ge=2, description="This many edges of the line or the CAN ignition within the window = flapping "
                             "(logged and counted once per episode).")
    interval_ms: int = Field(
        100, gt=0, description="How often the fusion and the budget step (also while the daemon is paused in "
                               "NM bus sleep).")

    @field_validator("power_modes")
    @classmethod
    def _modes(cls, value: dict[str, str]) -> dict[str, str]:
        for raw, name in value.items():
            try:
                int(raw, 0)
            except ValueError:
                raise ValueError(f"power_modes key {raw!r} is not an integer") from None
            if name not in STATE_NAMES:
                raise ValueError(f"power_modes[{raw!r}] = {name!r}: use one of {', '.join(STATE_NAMES)}")
        return value

    @model_validator(mode="after")
    def _thresholds(self) -> VehiclePowerConfig:
        if self.line_on_threshold < self.line_off_threshold:
            raise ValueError("line_on_threshold must be >= line_off_threshold")
        if self.power_mode_signal is not None and not self.power_modes:
            raise ValueError("power_mode_signal needs power_modes")
        return self

    def params(self) -> FusionParams:
        return FusionParams(
            line_on_threshold=self.line_on_threshold,
            line_off_threshold=self.line_off_threshold,
            line_timeout_s=self.line_timeout_ms / 1000,
            can_timeout_s=self.can_timeout_ms / 1000,
            on_debounce_s=self.on_debounce_ms / 1000,
            off_debounce_s=self.off_debounce_ms / 1000,
            power_modes={int(k, 0): STATE_NAMES[v] for k, v in self.power_modes.items()},
            flap_window_s=self.flap_window_s,
            flap_edges=self.flap_edges,
        )


class BatteryConfig(BaseModel):
    """`[battery]`: the gateway's share of the 12 V battery, in Wh (needs [vehicle_power])."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Keep the 12 V energy budget (needs [vehicle_power] enabled).")
    capacity_wh: float = Field(
        30.0, gt=0, description="Most the budget holds (openpilot CAR_BATTERY_CAPACITY_uWh = 30 Wh).")
    restore_floor_wh: float = Field(
        3.0, ge=0, description="Start value when the state file has no budget, a lower one or a corrupt one "
                               "(openpilot restarts a low budget at capacity / 10).")
    charge_rate_w: float = Field(
        45.0, ge=0, description="Credit per hour of driving when no battery current is measured "
                                "(openpilot CAR_CHARGING_RATE_W = 45).")
    current_signal: str | None = Field(
        None, description="Signal with the battery current (A, + = charging): the credit while driving is "
                          "then the measured V x I instead of charge_rate_w.")
    voltage_signal: str | None = Field(None, description="Signal with the battery voltage (V).")
    voltage_cutoff_v: float = Field(
        11.8, ge=0, description="Power down when the low-passed voltage stays below this while parked "
                                "(openpilot VBATT_PAUSE_CHARGING = 11.8 V).")
    voltage_tau_s: float = Field(
        45.0, ge=0, description="Time constant of the voltage low-pass filter (openpilot "
                                "CAR_VOLTAGE_LOW_PASS_K = 0.011, '45s tau').")
    voltage_delay_s: float = Field(
        30.0, ge=0, description="The low voltage must last this long (openpilot VOLTAGE_SHUTDOWN_DELAY_S = 30).")
    min_parked_s: float = Field(
        300.0, ge=0, description="The budget or the parked time never powers down sooner after key-off "
                                 "(openpilot DELAY_SHUTDOWN_TIME_S = 300).")
    max_parked_s: float = Field(
        30 * 3600.0, gt=0, description="Longest time parked with the gateway on, whatever the budget "
                                       "(openpilot MAX_TIME_OFFROAD_S = 30 h).")
    power_down_command: list[str] = Field(
        default_factory=list,
        description="Hook: argv run once (no shell) when the gateway may power down and no [mcu] link "
                    "acknowledged it (or there is none), e.g. a script that tells the PMIC; empty = only the "
                    "metric, the MQTT state and the MCU.")

    @model_validator(mode="after")
    def _floor(self) -> BatteryConfig:
        if self.restore_floor_wh > self.capacity_wh:
            raise ValueError("restore_floor_wh must not exceed capacity_wh")
        return self

    def params(self) -> BudgetParams:
        return BudgetParams(
            capacity_wh=self.capacity_wh,
            restore_floor_wh=self.restore_floor_wh,
            charge_rate_w=self.charge_rate_w,
            voltage_cutoff_v=self.voltage_cutoff_v,
            voltage_tau_s=self.voltage_tau_s,
            voltage_delay_s=self.voltage_delay_s,
            min_parked_s=self.min_parked_s,
            max_parked_s=self.max_parked_s,
        )
