"""Learned anticipation: in which *contexts* challenges begin, learned online from every waking
demand's onset (in the spirit of cpuidle's TEO governor, which learns from every wake-up, hits
included).

Pure: no I/O, no clock. The config names the features (signals and their bin edges), never
the rules. A context is the tuple of the features' bins (a stale or missing signal is a bin of
its own). The policy counts, per context:

- the onsets of waking demands (critical or normal; announced by an anticipation or not),
  counted at the step where the first of them turns true while none was;
- the exposure: the time spent in the context while no waking demand is true;
- the tightest (deadline - confirm) of the demands that began there.

Hazard of a context = onsets / (exposure + `prior_exposure_s`). At rest, a context whose hazard
is at least `min_rate_per_h` *and* at least `min_ratio` times the hazard of all other contexts
together (their onsets over their exposure, same prior) is treated like an active anticipatory demand with the context's
learned deadline. The relative test keeps surprises that come at the same rate in every context
from warming every context.

Allocation-light: `observe` returns the same object while the context and the waking flag stay
the same; the table is copied only when a segment of exposure closes.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .numbers import is_finite_number
from .types import LearnedParams, Sample

__all__ = ["Cell", "Learned", "LearnedParams", "context_of", "explains", "label", "next_change", "observe", "teach",
           "warm"]

_HOUR_S = 3600.0
_EPS = 1e-9
#: The bin of a stale or missing signal.
STALE_BIN = -1.0
#: At most this many contexts are learned (a categorical feature on a signal with many values
#: must not grow the table without bound); a new context beyond it is learned as "other".
MAX_CONTEXTS = 1024
OTHER_BIN = -2.0

Context = tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Cell:
    onsets: int = 0
    exposure_s: float = 0.0
    deadline_s: float = math.inf  # tightest (deadline - confirm) of the demands that began here


@dataclass(frozen=True, slots=True)
class Learned:
    """What the policy learned, and the open exposure segment: `context` since `since` (None:
    a waking demand is true, no exposure accrues)."""

    table: Mapping[Context, Cell] = field(default_factory=dict)
    onsets: int = 0
    exposure_s: float = 0.0
    context: Context | None = None
    since: float | None = None
    onset_context: Context | None = None  # where the latest onset happened

    def without_segment(self) -> Learned:
        """The table without the open exposure segment (a pause or a reload: the time until the
        next step is not exposure)."""
        return Learned(self.table, self.onsets, self.exposure_s, None, None, self.onset_context)

    def to_dict(self, p: LearnedParams) -> dict[str, Any]:
        """Persistable form: the table (closed exposure only) and the features it was learned on."""
        return {
            "features": [[name, list(edges)] for name, edges in p.features],
            "cells": [[list(ctx), c.onsets, round(c.exposure_s, 3), None if math.isinf(c.deadline_s) else c.deadline_s]
                      for ctx, c in self.table.items()],
        }

    @classmethod
    def from_dict(cls, data: Any, p: LearnedParams) -> Learned:
        """A persisted table; empty when it was learned on other features (the contexts differ).
        ValueError when it does not read back (not the shape `to_dict` writes)."""
        if not isinstance(data, dict) or not isinstance(data.get("cells", []), list):
            raise ValueError("not a learned table")
        try:
            features = tuple((str(n), tuple(float(e) for e in edges)) for n, edges in data.get("features", []))
        except (TypeError, ValueError):
            raise ValueError("features do not read back") from None
        if features != p.features:
            return cls()
        table: dict[Context, Cell] = {}
        for entry in data.get("cells", []):
            if not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[0], list):
                raise ValueError(f"cell {entry!r} does not read back")
            ctx, onsets, exposure, deadline = entry
            numbers = [*ctx, onsets, exposure, *([] if deadline is None else [deadline])]
            if len(ctx) != len(p.features) or not all(is_finite_number(v) for v in numbers):
                raise ValueError(f"cell {entry!r} does not read back")
            if not isinstance(onsets, int) or onsets < 0 or exposure < 0 or (deadline is not None and deadline < 0):
                raise ValueError(f"cell {entry!r} does not read back")
            table[tuple(float(b) for b in ctx)] = Cell(
                onsets, float(exposure), math.inf if deadline is None else float(deadline))
        return cls(table, sum(c.onsets for c in table.values()), sum(c.exposure_s for c in table.values()))


def context_of(
    p: LearnedParams, samples: Mapping[str, Sample], stale: tuple[str, ...]
) -> Context:
    out: list[float] = []
    for name, edges in p.features:
        sample = samples.get(name)
        if sample is None or name in stale:
            out.append(STALE_BIN)
        elif edges:
            out.append(float(bisect_right(edges, sample.value)))
        else:
            out.append(float(sample.value))
    return tuple(out)


def observe(
    learned: Learned, context: Context, waking: bool, onset_deadline_s: float | None, now: float
) -> Learned:
    """One step: `waking` (some waking demand is true), `onset_deadline_s` (not None: a waking
    demand turned true this step while none was; its tightest deadline - confirm)."""
    if context != learned.context and context not in learned.table:
        known = len(learned.table) + (learned.context is not None and learned.context not in learned.table)
        if known >= MAX_CONTEXTS:
            context = (OTHER_BIN,) * len(context)
    accruing = learned.since is not None
    if onset_deadline_s is None and accruing != waking and context == learned.context:
        return learned  # nothing changed: same segment
    table = learned.table
    total_exposure = learned.exposure_s
    if learned.since is not None and learned.context is not None:
        spent = max(0.0, now - learned.since)
        cell = table.get(learned.context, _EMPTY)
        table = {**table, learned.context: Cell(cell.onsets, cell.exposure_s + spent, cell.deadline_s)}
        total_exposure += spent
    onsets = learned.onsets
    if onset_deadline_s is not None:
        cell = table.get(context, _EMPTY)
        table = {**table, context: Cell(cell.onsets + 1, cell.exposure_s, min(cell.deadline_s, onset_deadline_s))}
        onsets += 1
    return Learned(table, onsets, total_exposure, context, None if waking else now,
                   context if onset_deadline_s is not None else learned.onset_context)


def teach(learned: Learned, allowed_s: float) -> Learned:
    """The latest onset's challenge allowed only `allowed_s` (a late wake, a consumer's report):
    its context's learned deadline shrinks to it."""
    ctx = learned.onset_context
    cell = learned.table.get(ctx) if ctx is not None else None
    if ctx is None or cell is None or cell.deadline_s <= allowed_s:
        return learned
    table = {**learned.table, ctx: Cell(cell.onsets, cell.exposure_s, max(0.0, allowed_s))}
    return Learned(table, learned.onsets, learned.exposure_s, learned.context, learned.since, ctx)


def explains(p: LearnedParams, learned: Learned) -> bool:
    """Whether the latest onset's context is one the policy now keeps warm: a lesson about
    that challenge is then the context's (`teach`), not the unannounced budget's."""
    ctx = learned.onset_context
    return ctx is not None and _hot(p, learned, ctx, 0.0)


_EMPTY = Cell()


def _open(learned: Learned, context: Context, now: float) -> float:
    if learned.since is not None and learned.context == context:
        return max(0.0, now - learned.since)
    return 0.0


def warm(p: LearnedParams, learned: Learned, now: float) -> tuple[Context, float] | None:
    """(context, learned deadline) when the current context is hazardous enough to keep warm."""
    ctx = learned.context
    if ctx is None or learned.since is None:
        return None
    cell = learned.table.get(ctx)
    if cell is None or cell.onsets < p.min_onsets:
        return None
    if not _hot(p, learned, ctx, _open(learned, ctx, now)):
        return None
    return ctx, cell.deadline_s


def _hot(p: LearnedParams, learned: Learned, ctx: Context, spent: float) -> bool:
    cell = learned.table.get(ctx)
    if cell is None or cell.onsets < p.min_onsets:
        return False
    hazard = cell.onsets / (cell.exposure_s + spent + p.prior_exposure_s)
    rest = (learned.onsets - cell.onsets) / (learned.exposure_s - cell.exposure_s + p.prior_exposure_s)
    return hazard * _HOUR_S >= p.min_rate_per_h - _EPS and hazard >= p.min_ratio * rest - _EPS


def next_change(p: LearnedParams, learned: Learned, now: float) -> float | None:
    """When the current context stops being warm as its exposure grows (both tests only fall
    with time spent in the context; the other contexts' rate stays), None if it is not warm."""
    ctx = learned.context
    if ctx is None or learned.since is None or warm(p, learned, now) is None:
        return None
    cell = learned.table[ctx]
    n, e = cell.onsets, cell.exposure_s + p.prior_exposure_s
    times = [learned.since + n * _HOUR_S / p.min_rate_per_h - e]
    # The rest's rate does not change while exposure accrues here: n / (e + x) >= k R.
    rest = (learned.onsets - n) / (learned.exposure_s - cell.exposure_s + p.prior_exposure_s)
    if rest > 0:
        times.append(learned.since + n / (p.min_ratio * rest) - e)
    future = [t for t in times if t > now]
    return min(future) if future else None


@lru_cache(maxsize=256)
def label(p: LearnedParams, context: Context) -> str:
    """`speed_kmh=1..10,gear=3`: the context as a reason."""
    parts = []
    for (name, edges), b in zip(p.features, context, strict=True):
        if b == STALE_BIN:
            parts.append(f"{name}=stale")
        elif b == OTHER_BIN:
            parts.append(f"{name}=other")
        elif not edges:
            parts.append(f"{name}={b:g}")
        else:
            i = int(b)
            lo = f"{edges[i - 1]:g}" if i > 0 else ""
            hi = f"{edges[i]:g}" if i < len(edges) else ""
            parts.append(f"{name}={lo}..{hi}")
    return ",".join(parts)
