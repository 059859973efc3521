"""Learned anticipation: the policy counts waking-demand onsets and exposure per context (bins of
named signals) and keeps a warm state where challenges begin far more often than elsewhere."""

from __future__ import annotations

import asyncio
import json

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import ConfigError, builtin_example, parse_config, policy_params
from cerebellumd.policies.cerebellum import CerebellumFirst, PolicyState
from cerebellumd.policies.learned import Learned, LearnedParams, context_of, next_change, observe, warm
from cerebellumd.policies.types import Inputs, OnStale, Sample, SignalSpec
from cerebellumd.sim.cycles import load_cycle
from cerebellumd.sim.evaluate import evaluate, run_evaluation
from cerebellumd.sim.events import EventModel, build_scenario

from .helpers import until
from .policy_helpers import model, params, samples
from .test_calibration_daemon import part, start
from .test_reload import make

LP = LearnedParams(features=(("speed", (1.0, 50.0)), ("gear", ())), min_rate_per_h=10.0, min_ratio=2.0)


def test_context_is_the_bins_of_the_features_and_stale_is_a_bin_of_its_own() -> None:
    s = {"speed": Sample(0.5, 0.0), "gear": Sample(3.0, 0.0)}
    assert context_of(LP, s, ()) == (0.0, 3.0)
    assert context_of(LP, {"speed": Sample(70.0, 0.0)}, ()) == (2.0, -1.0)
    assert context_of(LP, s, ("speed",)) == (-1.0, 3.0)


def test_onsets_and_exposure_are_counted_per_context() -> None:
    a, b = (0.0, 3.0), (1.0, 3.0)
    L = observe(Learned(), a, False, None, 0.0)
    assert observe(L, a, False, None, 5.0) is L  # same segment: nothing allocated
    L = observe(L, a, True, 0.4, 10.0)  # an onset in a after 10 s there
    assert L.table[a].onsets == 1 and L.table[a].exposure_s == pytest.approx(10.0)
    assert L.table[a].deadline_s == pytest.approx(0.4) and L.since is None
    L = observe(L, b, False, None, 20.0)  # the demand ended; 30 s in b
    L = observe(L, a, False, None, 50.0)
    assert L.table[b].exposure_s == pytest.approx(30.0) and L.table[b].onsets == 0
    assert L.onsets == 1 and L.exposure_s == pytest.approx(40.0)


def test_the_table_is_bounded_and_the_rest_is_learned_as_other() -> None:
    """A categorical feature on a signal with many values cannot grow the table without bound."""
    from cerebellumd.policies.learned import MAX_CONTEXTS, OTHER_BIN, label

    L, t = Learned(), 0.0
    for value in range(MAX_CONTEXTS + 50):
        L = observe(L, (float(value),), False, None, t)
        t += 1.0
    L = observe(L, (0.0,), False, None, t)  # back to a known context: the last segment closes
    assert len(L.table) == MAX_CONTEXTS + 1  # the first MAX_CONTEXTS, and "other"
    assert L.table[(OTHER_BIN,)].exposure_s == pytest.approx(50.0)
    assert label(LearnedParams(features=(("x", ()),)), (OTHER_BIN,)) == "x=other"


def _drive(p: LearnedParams, rounds: int, onsets_in_b: bool) -> Learned:
    """Rounds of 20 s standing (a) then 60 s moving (b); an onset ends each stand, and with
    `onsets_in_b` one ends each drive as well (the same rate per second of exposure as in a
    is not reached, but b is no longer quiet)."""
    a, b = (0.0, 3.0), (1.0, 3.0)
    L, t = Learned(), 0.0
    for _ in range(rounds):
        L = observe(L, a, False, None, t)
        t += 20.0
        L = observe(L, a, True, 0.4, t)
        t += 5.0
        L = observe(L, b, False, None, t)
        t += 60.0
        if onsets_in_b:
            L = observe(L, b, True, 1.5, t)
            t += 5.0
    return observe(L, a, False, None, t)


def test_a_context_where_challenges_begin_is_warm_with_its_learned_deadline() -> None:
    L = _drive(LP, 3, onsets_in_b=False)
    hot = warm(LP, L, L.since or 0.0)
    assert hot == ((0.0, 3.0), pytest.approx(0.4))
    # Time standing without a challenge cools it, and next_change says when.
    at = next_change(LP, L, L.since or 0.0)
    assert at is not None and warm(LP, L, at - 0.01) is not None and warm(LP, L, at + 0.01) is None


def test_same_rate_everywhere_warms_nothing() -> None:
    # Onsets at the same rate per second of exposure in both contexts: relative test fails.
    a, b = (0.0, 3.0), (1.0, 3.0)
    L, t = Learned(), 0.0
    for _ in range(10):
        for ctx in (a, b):
            L = observe(L, ctx, False, None, t)
            t += 30.0
            L = observe(L, ctx, True, 1.5, t)
            t += 5.0
    L = observe(L, a, False, None, t)
    assert warm(LP, L, t) is None
    L = observe(L, b, False, None, t + 1)
    assert warm(LP, L, t + 1) is None


def test_persisted_table_round_trips_and_other_features_start_empty() -> None:
    L = _drive(LP, 3, onsets_in_b=True)
    back = Learned.from_dict(L.to_dict(LP), LP)
    assert back.table.keys() == L.table.keys() and back.onsets == L.onsets
    assert back.table[(0.0, 3.0)].deadline_s == pytest.approx(0.4)
    other = LearnedParams(features=(("speed", (1.0,)),))
    assert Learned.from_dict(L.to_dict(LP), other).table == {}


# -- in the policy ------------------------------------------------------------------------------


def _core(learned: LearnedParams) -> CerebellumFirst:
    base = params(release_s=1.0)
    signals = (*base.signals, SignalSpec("speed", 0.5, OnStale.IGNORE))
    return CerebellumFirst(params(release_s=1.0, signals=signals, learned=learned), model())


def _step(core: CerebellumFirst, state: PolicyState, t: float, actual: AccelState, **values: float) -> PolicyState:
    state, _ = core.step(state, Inputs(samples=samples(t, **values), actual=actual), t)
    return state


def _stop_and_go(core: CerebellumFirst, stops: int) -> tuple[PolicyState, float]:
    """Stand 40 s (speed 0) until a normal demand (perception) begins, drive 120 s, repeat."""
    state, t = core.initial_state(0.0, AccelState.IDLE), 0.0
    for _ in range(stops):
        state = _step(core, state, t, state.target, speed=0.0)
        state = _step(core, state, t + 20.0, state.target, speed=0.0)
        t += 40.0
        state = _step(core, state, t, state.target, speed=0.0, norm=1.0)
        state = _step(core, state, t + 0.2, state.target, speed=0.0, norm=1.0)  # validated: wake
        assert state.target is AccelState.ACTIVE
        state = _step(core, state, t + 0.9, AccelState.ACTIVE, speed=0.0, norm=1.0)  # on time
        state = _step(core, state, t + 2.0, AccelState.ACTIVE, speed=10.0, norm=1.0)
        state = _step(core, state, t + 5.0, AccelState.ACTIVE, speed=60.0)
        t += 125.0
        state = _step(core, state, t, AccelState.ACTIVE, speed=60.0)
    return state, t


def test_the_policy_learns_to_stay_warm_where_challenges_begin() -> None:
    lp = LearnedParams(features=(("speed", (1.0, 50.0)),), min_rate_per_h=10.0, min_ratio=2.0)
    for learned, expect in ((lp, AccelState.IDLE), (LearnedParams(), AccelState.SLEEP)):
        core = _core(learned)
        state, t = _stop_and_go(core, 4)
        assert state.target is AccelState.SLEEP  # driving: nothing begins there
        state = _step(core, state, t + 1.0, AccelState.SLEEP, speed=0.0)  # stopping again
        state = _step(core, state, t + 2.0, state.target, speed=0.0)
        assert state.target is expect
        if learned.enabled:
            assert state.reason == "learned:speed=..1" and state.learned.table[(0.0,)].onsets == 4
            # Perception's deadline 1.0 s minus its confirm 0.2 s: sleep's 1.0 s exit misses it.
            assert state.learned.table[(0.0,)].deadline_s == pytest.approx(0.8)
            assert core.next_timer(state, t + 2.0) is not None


def test_config_keys_validate_and_build_params() -> None:
    text = builtin_example() + (
        "\n[policy.learned_anticipation]\nfeatures = { speed_kmh = [1, 10], gear = [] }\nmin_ratio = 3\n")
    p = policy_params(parse_config(text)).learned
    assert p.features == (("speed_kmh", (1.0, 10.0)), ("gear", ())) and p.min_ratio == 3.0
    assert not policy_params(parse_config(text.replace("min_ratio = 3", "enabled = false"))).learned.enabled
    with pytest.raises(ConfigError, match="unknown signal 'nope'"):
        parse_config(text.replace("gear = []", "nope = []"))
    with pytest.raises(ConfigError, match="strictly increasing"):
        parse_config(text.replace("[1, 10]", "[10, 1]"))


def _learning_config():  # type: ignore[no-untyped-def]
    return parse_config(builtin_example() + (
        "\n[policy.learned_anticipation]\nfeatures = { speed_kmh = [1, 10, 20, 40, 60, 80, 100, 130], gear = [] }\n"))


@pytest.mark.parametrize("seed", [1, 2])
def test_event_driven_equals_plain_loop_with_learning(seed: int) -> None:
    from .test_evaluate import _short_cycle

    config = _learning_config()
    world = EventModel(surprise_rate_per_h=240.0, precursor_missing_probability=1.0)
    scenario = build_scenario(_short_cycle(), seed, world)
    fast = evaluate(config, scenario, causal_baselines=False)
    assert fast == evaluate(config, scenario, event_driven=False, causal_baselines=False)


def test_a_udds_drive_teaches_the_standing_context_and_a_restored_table_starts_warm() -> None:
    config = _learning_config()
    scenario = build_scenario(load_cycle("udds"), 3)
    run = run_evaluation(config, scenario, causal_baselines=False)
    learned = run.runs[0].final_state.learned  # type: ignore[union-attr]
    standing = (0.0, 3.0)  # speed below 1 km/h, in drive: the pull-aways begin there
    assert learned.table[standing].onsets >= 5
    assert warm(policy_params(config).learned, Learned.from_dict(
        learned.to_dict(policy_params(config).learned), policy_params(config).learned), 0.0) is None  # no context yet
    restored = run_evaluation(config, scenario, causal_baselines=False, learned=learned)
    assert restored.runs[0].final_state.learned.table[standing].onsets > learned.table[standing].onsets  # type: ignore[union-attr]


# -- in the daemon: persisted beside the calibration ---------------------------------------------

LEARNING = "\n[policy.learned_anticipation]\nfeatures = { speed_kmh = [1, 60], gear = [] }\n"


async def test_the_daemon_persists_the_table_and_restores_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state_file = tmp_path / "state.json"
    rig = await start(tmp_path, state_file, deadline_ms=1500, extra=LEARNING)
    try:
        core = rig.daemon
        rig.values["AdasStatus"]["CollisionRisk"] = 1  # an onset of a waking demand
        await until(lambda: core.learned_table() is not None and any(
            c[1] >= 1 for c in core.learned_table()["cells"]), 10, "the onset counted")  # type: ignore[index]
        rig.values["AdasStatus"]["CollisionRisk"] = 0
    finally:
        await rig.close()
    saved = json.loads(await asyncio.to_thread(state_file.read_text))["sections"]["learned_anticipation"]
    assert saved["features"] == [["speed_kmh", [1.0, 60.0]], ["gear", []]]
    onsets = sum(c[1] for c in saved["cells"])
    assert onsets >= 1

    again = await start(tmp_path, state_file, deadline_ms=1500, extra=LEARNING)  # a restart keeps it
    try:
        assert part(again.daemon).restored_contexts >= 1
        table = again.daemon.learned_table()
        assert table is not None and sum(c[1] for c in table["cells"]) >= onsets
    finally:
        await again.close()

    body = json.loads(await asyncio.to_thread(state_file.read_text))
    body["sections"]["learned_anticipation"] = {"features": saved["features"], "cells": [[[0], "x", -1, None]]}
    await asyncio.to_thread(state_file.write_text, json.dumps(body))
    bad = await start(tmp_path, state_file, deadline_ms=1500, extra=LEARNING)
    try:
        assert part(bad.daemon).restored_contexts == 0
        assert bad.metric("cerebellumd_state_file_errors_total", kind="corrupt") == 1
    finally:
        await bad.close()


async def test_a_live_reload_keeps_the_table_unless_the_features_change(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = await make(tmp_path, LEARNING)
    try:
        def onsets() -> int:
            table = r.daemon.learned_table()
            return sum(c[1] for c in table["cells"]) if table is not None else -1

        r.rig.values["AdasStatus"]["CollisionRisk"] = 1
        await until(lambda: onsets() >= 1, 10, "the onset counted")
        r.rig.values["AdasStatus"]["CollisionRisk"] = 0
        before = onsets()
        await r.write(r.text.replace("features = {", "min_ratio = 3\nfeatures = {"))
        result = await r.daemon.assembly.async_reload()
        assert result.applied, result
        assert r.daemon.params.learned.min_ratio == 3.0 and onsets() >= before  # same features: kept
        await r.write(r.text.replace("[1, 60]", "[1, 30, 60]"))
        result = await r.daemon.assembly.async_reload()
        assert result.applied, result
        assert onsets() == 0  # other contexts: learned from nothing again
    finally:
        await r.rig.close()
