"""Self-calibrating readiness: late wakes tighten the budget for unannounced challenges, the
mid-entry worst case counts once tightened, a clean stretch relaxes it, and it persists."""

from __future__ import annotations

import math

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import Config, builtin_example, parse_config, policy_params
from cerebellumd.policies.calibration import (
    Calibration,
    CalibrationParams,
    next_relax,
    parse_calibration,
    relax,
    tighten,
)
from cerebellumd.policies.cerebellum import CerebellumFirst, PolicyState
from cerebellumd.policies.entry_risk import EntryRiskParams
from cerebellumd.policies.expr import compile_expression
from cerebellumd.policies.types import DemandClass, DemandSpec, Inputs
from cerebellumd.sim.cycles import load_cycle
from cerebellumd.sim.evaluate import evaluate, run_evaluation
from cerebellumd.sim.events import EventModel, build_scenario

from .policy_helpers import SIGNALS, model, params, samples

P = CalibrationParams()


def test_tighten_learns_what_the_challenge_allowed_less_a_margin() -> None:
    cal = tighten(Calibration(), 10.0, allowed_s=0.8, lateness_s=0.3, p=P)
    assert cal.budget_s == pytest.approx(0.7) and cal.late_wakes == 1 and cal.first_late_at == 10.0
    assert cal.effective(1.5) == (pytest.approx(0.7), True)
    looser = tighten(cal, 20.0, allowed_s=1.2, lateness_s=0.1, p=P, count=False)
    assert looser.budget_s == pytest.approx(0.7) and looser.late_wakes == 1 and looser.first_late_at == 10.0
    assert Calibration().effective(1.5) == (1.5, False)
    assert tighten(Calibration(), 1.0, 0.8, 0.3, CalibrationParams(enabled=False)) == Calibration()


def test_relax_steps_after_clean_stretches_back_to_untightened() -> None:
    cal = tighten(Calibration(), 0.0, allowed_s=1.3, lateness_s=0.5, p=P)  # budget 1.2
    assert relax(cal, 899.0, 1.5, P) == cal
    assert next_relax(cal, P) == 900.0
    one = relax(cal, 900.0, 1.5, P)
    assert one.budget_s == pytest.approx(1.3) and one.since == 900.0
    assert relax(cal, 2 * 900.0 + 5, 1.5, P).budget_s == pytest.approx(1.4)
    back = relax(cal, 3 * 900.0, 1.5, P)
    assert back.budget_s is None and back.late_wakes == 1  # the history stays
    assert next_relax(back, P) is None


def test_persisted_form_round_trips() -> None:
    cal = tighten(Calibration(), 5.0, 0.8, 0.25, P)
    restored = Calibration.from_dict(cal.to_dict(), now=100.0)
    assert restored.budget_s == cal.budget_s and restored.late_wakes == 1 and restored.since == 100.0
    core = CerebellumFirst(params(), model())
    assert core.unannounced_budget_s(core.initial_state(0.0, calibration=restored)) == pytest.approx(0.7)
    assert core.unannounced_budget_s(core.initial_state(0.0)) == 1.5


def test_a_restored_calibration_continues_its_clean_stretch_across_short_drives() -> None:
    """Drives of 10 minutes, each a restart: a budget tightened in the first must still relax
    after 15 minutes of clean driving, spread over two drives, not be held forever because each
    restart began the stretch again."""
    cal = tighten(Calibration(), 60.0, 0.8, 0.25, P)  # learned one minute into drive 1
    saved = cal.to_dict(now=600.0)  # drive 1 ends: 540 s of the 900 s stretch run
    assert saved["clean_s"] == pytest.approx(540.0)
    drive2 = Calibration.from_dict(saved, now=5000.0)  # another boot, another monotonic clock
    assert relax(drive2, 5000.0 + 359.0, 1.5, P).budget_s == pytest.approx(0.7)
    assert relax(drive2, 5000.0 + 360.0, 1.5, P).budget_s == pytest.approx(0.8)
    # What an older daemon saved (no clean_s) restarts the stretch, as before.
    old = Calibration.from_dict({k: v for k, v in saved.items() if k != "clean_s"}, now=5000.0)
    assert relax(old, 5000.0 + 360.0, 1.5, P).budget_s == pytest.approx(0.7)
    assert parse_calibration({**saved, "clean_s": -1.0}, 0.0) is None
    assert parse_calibration({**saved, "clean_s": float("nan")}, 0.0) is None
    assert "clean_s" not in Calibration().to_dict(now=600.0)  # nothing to relax: nothing kept


def test_only_a_deadline_lesson_is_carried_across_a_restart() -> None:
    """A challenge that allowed about the configured budget and still came late arrived
    mid-entry: the drive keeps the caution, a restart does not. One that allowed less by more
    than the margin taught a deadline, and that is persisted."""
    # 1.45 s: the consumer's "allowed" falls short of the 1.5 s deadline by the detection delay.
    mid_entry = tighten(Calibration(), 60.0, 1.45, 0.4, P, configured_s=1.5)
    assert mid_entry.budget_s == pytest.approx(1.35)  # in force for this drive
    assert mid_entry.to_dict(now=100.0)["budget_s"] is None  # not carried to the next
    assert mid_entry.to_dict(now=100.0)["late_wakes"] == 1  # the history is
    deadline = tighten(mid_entry, 200.0, 0.8, 0.25, P, configured_s=1.5)
    assert deadline.to_dict(now=300.0)["budget_s"] == pytest.approx(0.7)
    later = tighten(deadline, 400.0, 1.5, 0.4, P, configured_s=1.5)
    assert later.to_dict(now=500.0)["budget_s"] == pytest.approx(0.7)
    # Relaxed back to untightened, the deadline lesson is spent: a later mid-entry one stays with its drive.
    back = relax(deadline, 400.0 + 9 * 900.0, 1.5, P)
    assert back.budget_s is None and not back.deadline_lesson
    again = tighten(back, 9000.0, 1.5, 0.4, P, configured_s=1.5)
    assert again.budget_s == pytest.approx(1.4) and again.to_dict(now=9100.0)["budget_s"] is None
    # Restored, a persisted budget is a deadline lesson again (only those are persisted).
    restored = Calibration.from_dict(deadline.to_dict(now=300.0), now=0.0)
    assert restored.deadline_lesson and restored.to_dict(now=10.0)["budget_s"] == pytest.approx(0.7)


def _step(core: CerebellumFirst, state: PolicyState, t: float, actual: AccelState, **kw: object) -> PolicyState:
    reports = {k: kw.pop(k) for k in ("late_reports", "served_reports") if k in kw}
    inputs = Inputs(samples=samples(t, **kw), actual=actual, **reports)  # type: ignore[arg-type]
    return core.step(state, inputs, t)[0]


def test_a_late_unannounced_wake_tightens_and_then_sleep_is_not_chosen() -> None:
    # Entry risk off: a wake late although its challenge allowed the configured budget (it came
    # mid-entry) is calibration's to answer, as before entry risk existed.
    core = CerebellumFirst(params(release_s=1.0, entry_risk=EntryRiskParams(late_share=0.0)), model())
    state = core.initial_state(0.0, AccelState.IDLE)
    for t in (0.0, 100.0):  # a long quiet spell: sleep pays off
        state = _step(core, state, t, AccelState.IDLE)
    state = _step(core, state, 200.0, AccelState.SLEEP)
    assert state.target is AccelState.SLEEP
    state = _step(core, state, 210.0, AccelState.SLEEP, crit=1.0)  # a surprise: wake (deadline 1.5 s)
    assert state.target is AccelState.ACTIVE and state.wake_onset == 210.0 and state.wake_unannounced
    state = _step(core, state, 212.0, AccelState.ACTIVE, crit=1.0)  # active 2.0 s after: 0.5 s late
    assert state.calibration.budget_s == pytest.approx(1.4) and state.calibration.late_wakes == 1
    assert state.last_wake_latency_s == pytest.approx(2.0)
    # The same wake reported late by its consumer (real deadline 0.8 s): 1.2 s late.
    state = _step(core, state, 212.01, AccelState.ACTIVE, crit=1.0, late_reports=(1.2,))
    assert state.calibration.budget_s == pytest.approx(0.7) and state.calibration.late_wakes == 1
    state = _step(core, state, 215.0, AccelState.ACTIVE)
    state = _step(core, state, 400.0, AccelState.IDLE)
    # Sleep's exit (1.0 s) alone fits neither 0.7 s nor its entry + exit (2.5 s): idle.
    assert state.target is AccelState.IDLE and state.reason == "rest:idle"
    assert core.unannounced_budget_s(state) == pytest.approx(0.7)
    assert core.next_timer(state, 400.0) is not None


def test_with_entry_risk_only_a_deadline_tightens_and_a_mid_entry_late_wake_is_counted() -> None:
    core = CerebellumFirst(params(release_s=1.0), model())  # entry risk on (the default)
    state = core.initial_state(0.0, AccelState.IDLE)
    for t in (0.0, 100.0):
        state = _step(core, state, t, AccelState.IDLE)
    state = _step(core, state, 200.0, AccelState.SLEEP)
    state = _step(core, state, 210.0, AccelState.SLEEP, crit=1.0)
    state = _step(core, state, 212.0, AccelState.ACTIVE, crit=1.0)  # 0.5 s late; it allowed the configured 1.5 s
    assert state.calibration.late_wakes == 1 and state.calibration.worst_lateness_s == pytest.approx(0.5)
    assert state.calibration.budget_s is None and state.calibration.first_late_at is None
    assert core.unannounced_budget_s(state) == 1.5
    # Its consumer says it allowed 0.8 s (1.2 s late): a deadline the config does not know.
    state = _step(core, state, 212.01, AccelState.ACTIVE, crit=1.0, late_reports=(1.2,))
    assert state.calibration.budget_s == pytest.approx(0.7) and state.calibration.late_wakes == 1


def test_mid_entry_worst_case_counts_once_tightened() -> None:
    core = CerebellumFirst(params(), model())
    # 1.4 s: sleep's exit (1.0 s) fits, its entry + exit (2.5 s) does not.
    assert core._deepest_unannounced(1000.0, 1.4, whole_entry=False) == (AccelState.SLEEP, False)
    assert core._deepest_unannounced(1000.0, 1.4, whole_entry=True) == (AccelState.IDLE, False)
    assert core._deepest_unannounced(1000.0, 2.6, whole_entry=True) == (AccelState.SLEEP, False)


def test_anticipated_wakes_teach_nothing_but_a_surprise_during_anticipation_does() -> None:
    core = CerebellumFirst(params(), model())
    state = core.initial_state(0.0, AccelState.IDLE)
    state = _step(core, state, 0.0, AccelState.IDLE, ant=1.0)
    assert state.reason.startswith("anticipate")
    # A normal demand woken while anticipating: the anticipation chose the depth for it.
    announced = _step(core, state, 1.0, AccelState.IDLE, ant=1.0, norm=1.0)
    announced = _step(core, announced, 1.3, AccelState.IDLE, ant=1.0, norm=1.0)  # confirmed
    assert announced.target is AccelState.ACTIVE and not announced.wake_unannounced
    announced = _step(core, announced, 5.0, AccelState.ACTIVE, ant=1.0, norm=1.0, late_reports=(2.0,))
    assert announced.calibration == Calibration()
    # A critical demand (a surprise, no precursor by definition) during the same anticipation.
    state = _step(core, state, 1.0, AccelState.IDLE, ant=1.0, crit=1.0)
    assert state.wake_unannounced
    state = _step(core, state, 1.6, AccelState.ACTIVE, ant=1.0, crit=1.0, late_reports=(0.2,))
    assert state.calibration.budget_s == pytest.approx(0.3) and state.calibration.late_wakes == 1


def test_a_surprise_served_on_time_teaches_when_it_allowed_less_than_its_deadline() -> None:
    core = CerebellumFirst(params(), model())
    state = core.initial_state(0.0, AccelState.IDLE)
    state = _step(core, state, 0.0, AccelState.IDLE)
    state = _step(core, state, 10.0, AccelState.IDLE, crit=1.0)  # collision's config deadline: 1.5 s
    assert state.wake_unannounced
    # Served from idle 0.05 s later; its consumer says it allowed 0.8 s: tightened, no late wake.
    state = _step(core, state, 10.05, AccelState.ACTIVE, crit=1.0, served_reports=(0.8,))
    cal = state.calibration
    assert cal.budget_s == pytest.approx(0.7) and cal.late_wakes == 0 and cal.first_late_at == 10.05
    # One that allowed the whole configured deadline teaches no budget: it confirms the configured one.
    fits = core.initial_state(0.0, AccelState.IDLE)
    fits = _step(core, fits, 10.0, AccelState.IDLE, crit=1.0)
    fits = _step(core, fits, 10.05, AccelState.ACTIVE, crit=1.0, served_reports=(1.5,))
    assert fits.calibration == Calibration(trusted=True)


def _timers(core: CerebellumFirst, state: PolicyState, now: float, until: float) -> list[float]:
    """The times `next_timer` names from `now` on with unchanged state (rounded to the ms)."""
    out: list[float] = []
    t = core.next_timer(state, now)
    while t is not None and t <= until:
        out.append(round(t, 3))
        t = core.next_timer(state, t)
    return out


def _on_probation(probation_s: float = 60.0) -> CerebellumFirst:
    return CerebellumFirst(params(release_s=1.0, calibration=CalibrationParams(probation_s=probation_s),
                                  entry_risk=EntryRiskParams(late_share=0.0)), model())


def test_probation_rests_at_idle_for_its_seconds_of_rest_then_trusts_the_budget() -> None:
    core = _on_probation(60.0)
    state = core.initial_state(0.0, AccelState.IDLE)
    state = _step(core, state, 0.0, AccelState.IDLE)  # sleep would pay off, but the budget is not confirmed yet
    assert state.target is AccelState.IDLE and state.reason == "cap:probation" and state.probation_since == 0.0
    assert 60.0 in _timers(core, state, 0.0, 100.0)  # the evaluator steps when it runs out
    # A demand in between: its active time is no probation time.
    state = _step(core, state, 30.0, AccelState.IDLE, norm=1.0)
    state = _step(core, state, 30.3, AccelState.IDLE, norm=1.0)
    # (rest until the demand is confirmed: 30.3 s)
    assert state.target is AccelState.ACTIVE and state.calibration.probation_used_s == pytest.approx(30.3)
    state = _step(core, state, 30.35, AccelState.ACTIVE, norm=1.0)  # on time: nothing learned
    assert state.calibration.budget_s is None and not state.calibration.trusted  # (its 1.0 s tests no budget)
    state = _step(core, state, 40.0, AccelState.ACTIVE)
    state = _step(core, state, 41.0, AccelState.ACTIVE)  # released
    assert state.reason == "cap:probation" and not state.calibration.trusted
    assert 70.7 in _timers(core, state, 41.0, 100.0)
    state = _step(core, state, 70.0, AccelState.IDLE)
    assert state.calibration.probation_used_s == pytest.approx(59.3) and state.target is AccelState.IDLE
    state = _step(core, state, 70.7, AccelState.IDLE)
    assert state.calibration.trusted and state.target is AccelState.SLEEP and state.reason == "rest:sleep"
    # Off (0 s, the library default): sleep from the start, as before probation existed.
    off = _on_probation(0.0)
    plain = _step(off, off.initial_state(0.0, AccelState.IDLE), 1.0, AccelState.IDLE)  # after the dwell
    assert plain.target is AccelState.SLEEP and plain.probation_since is None


def test_an_unannounced_challenge_met_on_probation_ends_it_and_its_report_teaches() -> None:
    core = _on_probation(600.0)
    state = core.initial_state(0.0, AccelState.IDLE)
    state = _step(core, state, 0.0, AccelState.IDLE)
    assert state.reason == "cap:probation"
    # A surprise met from idle 50 ms later, its consumer saying it allowed the configured 1.5 s:
    # the budget is confirmed and sleep follows at the next rest.
    ok = _step(core, state, 110.0, AccelState.IDLE, crit=1.0)
    ok = _step(core, ok, 110.05, AccelState.ACTIVE, crit=1.0, served_reports=(1.5,))
    assert ok.calibration.trusted and ok.calibration.budget_s is None
    ok = _step(core, _step(core, ok, 115.0, AccelState.ACTIVE), 300.0, AccelState.IDLE)
    assert ok.target is AccelState.SLEEP
    # The same surprise allowing 0.8 s: tightened before any wake from sleep came late.
    tight = _step(core, state, 110.0, AccelState.IDLE, crit=1.0)
    tight = _step(core, tight, 110.05, AccelState.ACTIVE, crit=1.0, served_reports=(0.8,))
    assert tight.calibration.trusted and tight.calibration.budget_s == pytest.approx(0.7)
    tight = _step(core, _step(core, tight, 115.0, AccelState.ACTIVE), 300.0, AccelState.IDLE)
    assert tight.target is AccelState.IDLE and tight.reason == "rest:idle" and tight.calibration.late_wakes == 0
    # A challenge whose own deadline is under the budget (perception: 1.0 s) confirms nothing.
    short = _step(core, state, 110.0, AccelState.IDLE, norm=1.0)
    short = _step(core, short, 110.3, AccelState.IDLE, norm=1.0)
    short = _step(core, short, 110.35, AccelState.ACTIVE, norm=1.0)
    assert short.wake_onset is None and not short.calibration.trusted


def test_probation_is_persisted_so_a_car_pays_it_once() -> None:
    core = _on_probation(60.0)
    state = core.initial_state(0.0, AccelState.IDLE)
    for t in (0.0, 30.0):
        state = _step(core, state, t, AccelState.IDLE)
    saved = state.calibration.to_dict(now=30.0)
    assert saved["probation_used_s"] == pytest.approx(30.0) and saved["trusted"] is False
    restored = parse_calibration(saved, 0.0)  # another boot: the other 30 s are left
    assert restored is not None and restored.probation_used_s == pytest.approx(30.0)
    again = _step(core, core.initial_state(0.0, AccelState.IDLE, calibration=restored), 0.0, AccelState.IDLE)
    assert again.reason == "cap:probation" and 30.0 in _timers(core, again, 0.0, 100.0)
    assert _step(core, again, 30.0, AccelState.IDLE).target is AccelState.SLEEP
    done = parse_calibration({**saved, "trusted": True}, 0.0)
    fresh = core.initial_state(0.0, AccelState.IDLE, calibration=done)
    assert _step(core, fresh, 1.0, AccelState.IDLE).target is AccelState.SLEEP  # after the dwell
    assert parse_calibration({**saved, "trusted": "yes"}, 0.0) is None
    assert parse_calibration({**saved, "probation_used_s": -1.0}, 0.0) is None
    assert parse_calibration({**saved, "probation_used_s": float("inf")}, 0.0) is None
    # What an older daemon saved (neither key): the probation starts over, once.
    old = parse_calibration({"budget_s": None, "late_wakes": 0, "worst_lateness_s": 0.0}, 0.0)
    assert old is not None and not old.trusted and old.probation_used_s == 0.0


def test_learned_budget_bounds_the_depth_during_anticipation() -> None:
    # An anticipation whose deadline (1.5 s) lets sleep's exit (1.0 s) fit.
    slow = DemandSpec("slow", compile_expression("ant == 1", frozenset(SIGNALS)), DemandClass.ANTICIPATORY, 0.0, 1.5)
    base = params()
    core = CerebellumFirst(params(demands=(*base.demands[:2], slow)), model())
    state = core.initial_state(0.0, AccelState.IDLE)
    state = _step(core, state, 0.0, AccelState.IDLE)
    state = _step(core, state, 100.0, AccelState.IDLE, ant=1.0)
    assert state.target is AccelState.SLEEP and state.reason == "anticipate:slow"
    learned = core.initial_state(0.0, AccelState.IDLE, calibration=Calibration(budget_s=0.7))
    learned = _step(core, learned, 0.0, AccelState.IDLE)
    learned = _step(core, learned, 100.0, AccelState.IDLE, ant=1.0)
    assert learned.target is AccelState.IDLE and learned.reason == "anticipate:slow"
    learned = _step(core, learned, 101.0, AccelState.IDLE)  # the anticipation's warm hold
    assert learned.target is AccelState.IDLE and learned.reason == "anticipate:release"


@pytest.fixture(scope="module")
def config():  # type: ignore[no-untyped-def]
    return parse_config(builtin_example())


def test_tight_world_is_learned_and_served_after_adaptation(config) -> None:  # type: ignore[no-untyped-def]
    tight = EventModel(surprise_rate_per_h=30.0, surprise_deadline_ms=800)
    result = evaluate(config, build_scenario(load_cycle("udds"), 101, tight, name="tight"), causal_baselines=False)
    cal = result["calibration"]
    assert cal["learned"] and cal["budget_s"] < 1.0  # below sleep's exit: idle while unannounced
    assert cal["late_reports"] >= 1 and cal["adapted_at_s"] is not None and cal["trusted"]
    assert cal["events_after_adaptation"] > 10 and cal["readiness_after_adaptation"] == 1.0
    # A restored calibration (as the daemon persists it) serves the drive from the start.
    learned = Calibration(budget_s=cal["budget_s"])
    warm = run_evaluation(
        config, build_scenario(load_cycle("udds"), 102, tight, name="tight"), causal_baselines=False,
        calibration=learned,
    ).result
    assert warm["results"][0]["readiness"] == 1.0


def _demo_on_probation(probation_s: float) -> Config:
    """The demo config with `[policy] budget_probation_s` set."""
    return parse_config(builtin_example().replace("[policy]\n", f"[policy]\nbudget_probation_s = {probation_s}\n", 1))


def test_a_probation_serves_the_first_surprise_of_a_tight_world_and_learns_from_it(config) -> None:  # type: ignore[no-untyped-def]
    """`[policy] budget_probation_s`: the drive's first surprise finds the accelerator at idle,
    not asleep, so it is served, and its consumer's report teaches the 800 ms before any miss."""
    on_probation = _demo_on_probation(54)
    assert policy_params(on_probation).calibration.probation_s == 54.0
    assert policy_params(config).calibration.probation_s == 0.0  # off by default
    tight = EventModel(surprise_rate_per_h=30.0, surprise_deadline_ms=800)
    scenario = build_scenario(load_cycle("udds"), 1, tight, name="tight")
    before = evaluate(config, scenario, causal_baselines=False)
    after = evaluate(on_probation, scenario, causal_baselines=False)
    assert before["results"][0]["readiness"] < 1.0 and before["calibration"]["late_reports"] >= 1
    assert after["results"][0]["readiness"] == 1.0
    cal = after["calibration"]
    assert cal["learned"] and cal["late_wakes"] == 0 and cal["late_reports"] == 0 and cal["trusted"]
    assert 0 < cal["probation_used_s"] < 54.0  # ended by the surprise, before its time ran out
    # The price: idle instead of sleep for at most those seconds of rest.
    extra_j = after["results"][0]["accelerator_energy_j"] - before["results"][0]["accelerator_energy_j"]
    assert extra_j > 0


def test_default_world_without_late_wakes_learns_nothing(config) -> None:  # type: ignore[no-untyped-def]
    result = evaluate(config, build_scenario(load_cycle("hwfet"), 101), causal_baselines=False)
    assert result["calibration"]["late_wakes"] == 0 and not result["calibration"]["learned"]
    assert result["calibration"]["adapted_at_s"] is None
    assert math.isclose(result["calibration"]["budget_s"], 1.5)


@pytest.mark.parametrize(("seed", "probation_s"), [(1, 0), (2, 0), (1, 20), (3, 20)])
def test_event_driven_equals_plain_loop_with_late_reports(config, seed: int, probation_s: int) -> None:  # type: ignore[no-untyped-def]
    """The evaluator steps only at input changes and `next_timer`: the probation's end is one."""
    from .test_evaluate import _short_cycle

    if probation_s:
        config = _demo_on_probation(probation_s)
    model_ = EventModel(surprise_rate_per_h=240.0, surprise_deadline_ms=300, false_precursor_rate_per_h=60.0)
    scenario = build_scenario(_short_cycle(), seed, model_)
    fast = evaluate(config, scenario, causal_baselines=False)
    assert fast == evaluate(config, scenario, event_driven=False, causal_baselines=False)
    assert fast["calibration"]["probation_used_s"] <= probation_s


def test_consumers_report_challenges_served_on_time_by_a_wake_and_how_late_the_rest() -> None:
    from cerebellumd.sim.accelerator import SimAccelerator
    from cerebellumd.sim.evaluate import _LateReporter

    # (start, due, end): one served on time by the wake at 1.0, one that began while active,
    # one served late by the wake from sleep at 20.0.
    reporter = _LateReporter([(1.0, 1.8, 5.0), (2.0, 2.8, 3.0), (20.0, 20.8, 30.0)])
    acc = SimAccelerator(model(), AccelState.IDLE)
    acc.command(1.0, AccelState.ACTIVE)
    acc.advance(1.05)
    assert reporter.reports(acc) == ((), (pytest.approx(0.8),))
    assert reporter.reports(acc) == ((), ())  # once per active period
    acc.command(10.0, AccelState.SLEEP)
    acc.advance(19.0)
    acc.command(20.0, AccelState.ACTIVE)
    acc.advance(21.0)
    late, served = reporter.reports(acc)
    assert late == (pytest.approx(0.2),) and served == ()


def test_tight_world_learns_from_a_surprise_served_on_time(config) -> None:  # type: ignore[no-untyped-def]
    tight = EventModel(surprise_rate_per_h=30.0, surprise_deadline_ms=800)
    result = evaluate(config, build_scenario(load_cycle("us06"), 5, tight, name="tight"), causal_baselines=False)
    cal = result["calibration"]
    assert cal["learned"] and cal["late_wakes"] == 0 and cal["late_reports"] == 0
    assert result["results"][0]["readiness"] == 1.0
