"""Temporary alias while branches merge; the vocabulary lives in `cerebellumd.accel`."""

from ..accel import *  # noqa: F403
from ..accel import ALL_STATES, COMMANDABLE_STATES, RESTING_STATES, AcceleratorModel, AccelState, Transition

__all__ = ["ALL_STATES", "COMMANDABLE_STATES", "RESTING_STATES", "AccelState", "AcceleratorModel", "Transition"]
