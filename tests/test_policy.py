"""The pure cerebellum-first policy: table-driven cases and hypothesis properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cerebellumd.accel import AccelState
from cerebellumd.policies.baselines import AlwaysOn, Timeout
from cerebellumd.policies.cerebellum import CerebellumFirst, PolicyState
from cerebellumd.policies.types import Decision, Guards, Hold, HoldMode, Inputs

from .policy_helpers import model, params, samples

TICK = 0.01


def run(policy: CerebellumFirst, timeline: list[tuple[float, dict[str, float]]], until: float,
        holds: tuple[Hold, ...] = (), start_state: AccelState = AccelState.IDLE
        ) -> list[tuple[float, PolicyState, Decision]]:
    """Step every 10 ms; `timeline` holds (time, signal values) changes, fresh every tick."""
    state = policy.initial_state(0.0, start_state)
    values: dict[str, float] = {}
    out = []
    changes = sorted(timeline, key=lambda c: c[0])
    i = 0
    for k in range(int(until / TICK) + 1):
        now = round(k * TICK, 6)
        while i < len(changes) and changes[i][0] <= now:
            values.update(changes[i][1])
            i += 1
        state, decision = policy.step(state, Inputs(samples(now, **values), holds), now)
        out.append((now, state, decision))
    return out


def first_time(trace: list[tuple[float, PolicyState, Decision]], predicate) -> float:
    for now, state, decision in trace:
        if predicate(state, decision):
            return now
    return math.inf


def test_critical_demand_wakes_on_the_same_step() -> None:
    policy = CerebellumFirst(params(), model())
    trace = run(policy, [(1.0, {"crit": 1})], 1.2)
    woke = first_time(trace, lambda s, d: d.target is AccelState.ACTIVE)
    assert woke == pytest.approx(1.0)
    decision = next(d for t, s, d in trace if t == pytest.approx(1.0))
    assert decision.wake and decision.reason == "demand:collision"


def test_normal_demand_waits_for_confirmation_then_validates() -> None:
    policy = CerebellumFirst(params(), model())
    trace = run(policy, [(1.0, {"norm": 1})], 1.5)
    woke = first_time(trace, lambda s, d: d.target is AccelState.ACTIVE)
    assert woke == pytest.approx(1.2, abs=TICK)
    validations = [v for _, _, d in trace for v in d.validations]
    assert validations == [("perception", "validated")]


def test_short_normal_blip_expires_and_does_not_wake() -> None:
    policy = CerebellumFirst(params(), model())
    trace = run(policy, [(1.0, {"norm": 1}), (1.1, {"norm": 0})], 2.0)
    assert all(d.target is not AccelState.ACTIVE for _, _, d in trace)
    assert [v for _, _, d in trace for v in d.validations] == [("perception", "expired")]


def test_release_time_then_step_down() -> None:
    policy = CerebellumFirst(params(), model())
    trace = run(policy, [(1.0, {"crit": 1}), (3.0, {"crit": 0})], 10.0)
    after_demand = [row for row in trace if row[0] > 3.0]
    down = first_time(after_demand, lambda s, d: s.target is not AccelState.ACTIVE and d.changed)
    assert down == pytest.approx(3.0 + 2.0, abs=TICK)
    reasons = {d.reason for t, _, d in trace if 3.0 < t < 4.9}
    assert reasons == {"release"}


def test_anticipation_warms_to_idle_only() -> None:
    policy = CerebellumFirst(params(initial_idle_prediction_s=600.0), model())
    trace = run(policy, [(0.0, {}), (20.0, {"ant": 1})], 25.0, start_state=AccelState.IDLE)
    before = [s.target for t, s, _ in trace if 10.0 < t < 20.0]
    assert set(before) == {AccelState.SLEEP}  # latency budget 1.5 s forbids off, sleep pays off
    after = [s.target for t, s, _ in trace if t > 21.0]
    assert set(after) == {AccelState.IDLE}  # 0.3 s budget: only idle exits fast enough
    assert all(not d.wake for _, _, d in trace)


def test_sleep_depth_follows_break_even_and_latency_budget() -> None:
    m = model()
    short = CerebellumFirst(params(initial_idle_prediction_s=2.0), m)
    assert run(short, [], 5.0)[-1][1].target is AccelState.IDLE  # 2 s < sleep break-even
    long_budget = CerebellumFirst(params(initial_idle_prediction_s=1000.0, latency_budget_s=60.0), m)
    assert run(long_budget, [], 5.0)[-1][1].target is AccelState.OFF
    tight = CerebellumFirst(params(initial_idle_prediction_s=1000.0, latency_budget_s=0.1), m)
    assert run(tight, [], 5.0)[-1][1].target is AccelState.IDLE


def test_stale_critical_input_fails_safe_awake() -> None:
    policy = CerebellumFirst(params(), model())
    state = policy.initial_state(0.0)
    fresh = samples(0.0)
    state, d = policy.step(state, Inputs(fresh), 0.1)
    assert d.target is not AccelState.ACTIVE
    # Nothing new for longer than crit's max_age (0.5 s): unknown -> on_stale=wake.
    state, d = policy.step(state, Inputs(fresh), 0.7)
    assert d.target is AccelState.ACTIVE
    assert d.reason == "stale:crit"
    assert "crit" in d.stale_signals


def test_battery_guard_denies_normal_but_not_critical() -> None:
    policy = CerebellumFirst(params(guards=Guards(battery_signal="battery", battery_min_v=11.6)), model())
    trace = run(policy, [(0.0, {"battery": 11.0}), (1.0, {"norm": 1})], 2.0)
    assert all(d.target is not AccelState.ACTIVE for _, _, d in trace)
    assert any(d.denied == "guard:battery" for _, _, d in trace)
    trace = run(policy, [(0.0, {"battery": 11.0}), (1.0, {"crit": 1})], 1.5)
    assert trace[-1][2].target is AccelState.ACTIVE


def test_sleep_hold_blocks_normal_and_awake_hold_keeps_active() -> None:
    policy = CerebellumFirst(params(), model())
    sleep_hold = (Hold("h", "op", "test", HoldMode.SLEEP, expires_at=100.0),)
    trace = run(policy, [(1.0, {"norm": 1})], 3.0, holds=sleep_hold)
    assert all(d.target is not AccelState.ACTIVE for _, _, d in trace)
    trace = run(policy, [(1.0, {"crit": 1})], 1.5, holds=sleep_hold)
    assert trace[-1][2].target is AccelState.ACTIVE
    awake = (Hold("a", "op", "test", HoldMode.AWAKE, expires_at=5.0),)
    trace = run(policy, [], 12.0, holds=awake)
    assert all(s.target is AccelState.ACTIVE for t, s, _ in trace if 0.6 < t < 5.0)
    assert trace[-1][1].target is not AccelState.ACTIVE  # expired hold, then release, then rest


def test_wake_cap_limits_non_critical_wakes() -> None:
    policy = CerebellumFirst(params(max_wake_cycles_per_hour=2, release_s=0.0, min_dwell_s=0.0), model())
    timeline = []
    for k in range(5):
        timeline += [(1.0 + 2 * k, {"norm": 1}), (1.5 + 2 * k, {"norm": 0})]
    trace = run(policy, timeline, 12.0)
    assert sum(d.wake for _, _, d in trace) == 2
    assert any(d.denied == "cap:wake_cycles" for _, _, d in trace)


def test_baselines() -> None:
    always = AlwaysOn(params(), model())
    state = always.initial_state(0.0)
    for k in range(100):
        state, d = always.step(state, Inputs(samples(k * 0.1)), k * 0.1)
        assert d.target is AccelState.ACTIVE
    timeout = Timeout(params(), model(), idle_timeout_s=3.0, rest_state=AccelState.SLEEP)
    state = timeout.initial_state(0.0, AccelState.SLEEP)
    targets = []
    for k in range(1000):
        now = k * TICK
        vals = {"ant": 1.0} if 1.0 <= now < 2.0 else {}
        state, d = timeout.step(state, Inputs(samples(now, **vals)), now)
        targets.append((now, d.target))
    # Wakes on an anticipatory demand too, stays 3 s after it ends, then autosuspends.
    assert next(t for t, s in targets if s is AccelState.ACTIVE) == pytest.approx(1.0)
    assert [t for t, s in targets if s is AccelState.ACTIVE][-1] == pytest.approx(4.99, abs=0.02)
    assert targets[-1][1] is AccelState.SLEEP


# -- properties ---------------------------------------------------------------------------------

events = st.lists(
    st.tuples(st.floats(0, 10, allow_nan=False), st.sampled_from(["crit", "norm", "ant"]),
              st.sampled_from([0.0, 1.0])),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(events, st.floats(0.0, 3.0), st.floats(0.0, 2.0))
def test_never_leaves_active_while_a_waking_demand_is_active(changes, release_s, dwell_s) -> None:
    policy = CerebellumFirst(params(release_s=release_s, min_dwell_s=dwell_s), model())
    trace = run(policy, [(t, {name: v}) for t, name, v in changes], 12.0)
    for now, state, decision in trace:
        waking = [n for n in decision.active_demands if n in ("collision", "perception")]
        if waking and decision.denied is None:
            # Only hysteresis may hold a non-critical wake back, and only within min_dwell.
            assert state.target is AccelState.ACTIVE or (
                decision.reason == "dwell" and now - state.target_since < dwell_s), (now, decision)


@settings(max_examples=60, deadline=None)
@given(events, st.floats(0.05, 3.0))
def test_never_changes_state_faster_than_min_dwell_except_critical(changes, dwell_s) -> None:
    policy = CerebellumFirst(params(min_dwell_s=dwell_s), model())
    trace = run(policy, [(t, {name: v}) for t, name, v in changes], 12.0)
    last_change = 0.0
    for now, _, decision in trace:
        if decision.changed:
            if not decision.reason.startswith(("demand:collision", "stale:")):
                assert now - last_change >= dwell_s - 1e-9, (now, last_change, decision.reason)
            last_change = now


@settings(max_examples=40, deadline=None)
@given(events)
def test_step_is_pure_and_deterministic(changes) -> None:
    policy = CerebellumFirst(params(), model())
    timeline = [(t, {name: v}) for t, name, v in changes]
    a = [(s, d) for _, s, d in run(policy, timeline, 10.0)]
    b = [(s, d) for _, s, d in run(policy, timeline, 10.0)]
    assert a == b


def test_warm_hold_keeps_the_accelerator_warm_after_an_anticipation_ends() -> None:
    policy = CerebellumFirst(params(initial_idle_prediction_s=600.0, anticipation_release_s=3.0), model())
    trace = run(policy, [(10.0, {"ant": 1}), (15.0, {"ant": 0}), (16.0, {"norm": 1})], 25.0)
    held = [s.target for t, s, _ in trace if 15.0 <= t < 16.0]
    assert set(held) == {AccelState.IDLE}  # no idle -> sleep -> wake round trip right before the demand
    woke = first_time([r for r in trace if r[0] >= 16.0], lambda s, d: d.target is AccelState.ACTIVE)
    assert woke == pytest.approx(16.2, abs=TICK)
    # Without a demand the hold lapses and the accelerator sinks again.
    trace = run(policy, [(10.0, {"ant": 1}), (15.0, {"ant": 0})], 25.0)
    assert first_time([r for r in trace if r[0] > 15.0], lambda s, d: s.target is AccelState.SLEEP) == pytest.approx(
        18.0, abs=2 * TICK)


def test_next_timer_names_every_time_the_decision_can_change_without_input() -> None:
    """Stepping only at input changes and at next_timer() gives the same targets as stepping
    every tick (the evaluator relies on it)."""
    policy = CerebellumFirst(params(initial_idle_prediction_s=1.0, anticipation_release_s=2.0), model())
    timeline = [(1.0, {"norm": 1}), (3.0, {"norm": 0}), (8.0, {"ant": 1}), (9.0, {"ant": 0}), (20.0, {"crit": 1}),
                (20.5, {"crit": 0})]
    dense = run(policy, timeline, 40.0)
    state = policy.initial_state(0.0)
    changes = {round(t / TICK) for t, _ in timeline}
    values: dict[str, float] = {}
    sparse_targets = {}
    k = 0
    while k <= round(40.0 / TICK):
        now = round(k * TICK, 6)
        for t, v in timeline:
            if round(t / TICK) == k:
                values.update(v)
        # Fresh samples every step: staleness is not what this test is about.
        state, d = policy.step(state, Inputs(samples(now, **values)), now)
        sparse_targets[k] = d.target
        timer = policy.next_timer(state, now)
        candidates = [c for c in changes if c > k]
        if timer is not None:
            candidates += [math.ceil(timer / TICK - 1e-9), math.ceil(timer / TICK - 1e-9) + 1]
        k = min([c for c in candidates if c > k], default=round(40.0 / TICK) + 1)
    last = None
    for k in range(round(40.0 / TICK) + 1):
        last = sparse_targets.get(k, last)
        assert last is dense[k][2].target, (k * TICK, last, dense[k][2].target)
