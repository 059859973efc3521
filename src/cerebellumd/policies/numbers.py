"""The check every persisted policy section applies to the numbers it reads back (calibration,
learned anticipation, entry risk): JSON gives ints, floats and booleans alike, and a state file
may hold NaN or infinity."""

from __future__ import annotations

import math
from typing import TypeGuard


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """An int or float (not a bool) that is finite."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
