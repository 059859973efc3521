"""Accelerator power profiles: shipped TOML files (`data/profiles/`) or a user's path, loaded
into the pure `AcceleratorModel`."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from .accel import RESTING_STATES, AcceleratorModel, AccelState, Transition


class ProfileError(ValueError):
    pass


def shipped_profiles() -> list[str]:
    folder = resources.files("cerebellumd").joinpath("data", "profiles")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> AcceleratorModel:
    if name_or_path in shipped_profiles():
        text = resources.files("cerebellumd").joinpath("data", "profiles", f"{name_or_path}.toml").read_text("utf-8")
        origin = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(
                f"no profile {name_or_path!r}: not a shipped one ({', '.join(shipped_profiles())}) nor a file"
            )
        text, origin = path.read_text("utf-8"), str(path)
    try:
        return profile_from_dict(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"profile {origin}: {exc}") from None


def profile_from_dict(data: dict[str, Any]) -> AcceleratorModel:
    power = {AccelState(k): float(v) for k, v in data["power_w"].items()}
    enter = {AccelState(k): Transition(float(v["latency_s"]), float(v["energy_j"])) for k, v in data["enter"].items()}
    exit_ = {AccelState(k): Transition(float(v["latency_s"]), float(v["energy_j"])) for k, v in data["exit"].items()}
    for state in RESTING_STATES:
        for table in (enter, exit_):
            t = table.get(state)
            if t is not None and (t.latency_s < 0 or t.energy_j < 0):
                raise ValueError(f"negative latency or energy for {state.value}")
    return AcceleratorModel(
        name=str(data.get("name", "custom")),
        power_w=power,
        enter=enter,
        exit=exit_,
        description=str(data.get("description", "")),
    )
