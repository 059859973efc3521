"""Entry risk: entries whose first seconds would make an unannounced challenge late are spaced
out so that such challenges stay under `late_share` of all, given the unannounced share learned
from the challenges seen."""

from __future__ import annotations

import math

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import ConfigError, builtin_example, parse_config, policy_params
from cerebellumd.policies.cerebellum import CerebellumFirst, PolicyState
from cerebellumd.policies.entry_risk import (
    REMEMBERED,
    EntryRisk,
    EntryRiskParams,
    count_challenge,
    entry_window_s,
    parse_entry_risk,
    spend,
)
from cerebellumd.policies.types import Inputs

from .policy_helpers import model, params, samples

P = EntryRiskParams(late_share=0.01, burst_s=2.0, prior_challenges=10.0, prior_unannounced_share=0.5)


def test_the_window_is_the_part_of_an_entry_that_a_challenge_cannot_wait_for() -> None:
    m = model()  # sleep: 1.5 s in, 1.0 s out
    assert entry_window_s(m, AccelState.SLEEP, 1.5) == pytest.approx(1.0)
    assert entry_window_s(m, AccelState.SLEEP, 2.5) == 0.0
    assert entry_window_s(m, AccelState.SLEEP, 0.5) == pytest.approx(1.5)  # the whole entry, no more
    assert entry_window_s(m, AccelState.IDLE, 1.5) == 0.0


def test_the_bucket_refills_at_the_late_share_over_the_unannounced_share() -> None:
    risk = EntryRisk()
    assert risk.available_s(0.0, P) == 2.0  # full before the first entry
    assert risk.unannounced_share(P) == pytest.approx(0.5)
    risk = spend(risk, 100.0, 1.0, P)
    risk = spend(risk, 100.0, 1.0, P)
    assert risk.available_s(100.0, P) == pytest.approx(0.0)
    # 0.01 / 0.5 = 0.02 window seconds per second: 1.0 s again after 50 s.
    assert risk.available_s(125.0, P) == pytest.approx(0.5)
    assert risk.available_at(1.0, 100.0, P) == pytest.approx(150.0)
    assert risk.available_s(1e6, P) == 2.0  # never more than the burst
    # Ten announced challenges halve the share (5 of 20): twice the refill from then on.
    for t in range(100, 110):
        risk = count_challenge(risk, float(t), unannounced=False, p=P)
    assert risk.unannounced_share(P) == pytest.approx(0.25)
    assert risk.refill_per_s(P) == pytest.approx(0.04)
    settled = risk.available_s(109.0, P)
    # Each second refilled at the share then in force: 0.01 / (5 / (10 + k)), k = 1 .. 9.
    assert settled == pytest.approx(sum(0.01 * (10 + k) / 5 for k in range(1, 10)))
    assert risk.available_at(1.0, 109.0, P) == pytest.approx(109.0 + (1.0 - settled) / 0.04)
    # A window longer than the bucket holds is paid from a full one (a debt), never ruled out.
    assert risk.available_at(3.0, 109.0, P) == pytest.approx(109.0 + (2.0 - settled) / 0.04)
    full = EntryRisk()
    assert full.allows(3.0, 0.0, P) and not risk.allows(3.0, 109.0, P)
    debt = spend(full, 0.0, 3.0, P)
    assert debt.available_s(0.0, P) == pytest.approx(-1.0)
    assert debt.available_at(1.0, 0.0, P) == pytest.approx(2.0 / 0.02)


def test_disabled_it_changes_nothing() -> None:
    off = EntryRiskParams(late_share=0.0)
    risk = spend(EntryRisk(), 0.0, 1.0, off)
    assert risk == EntryRisk() and risk.available_s(0.0, off) == math.inf
    assert count_challenge(risk, 0.0, True, off) == EntryRisk()


def _step(core: CerebellumFirst, state: PolicyState, t: float, actual: AccelState, **kw: float) -> PolicyState:
    return core.step(state, Inputs(samples=samples(t, **kw), actual=actual), t)[0]


def _surprise_then_rest(core: CerebellumFirst, state: PolicyState, t: float) -> PolicyState:
    """A surprise at `t` served from wherever the accelerator rests; quiet from t + 1."""
    state = _step(core, state, t, AccelState.SLEEP, crit=1.0)
    assert state.target is AccelState.ACTIVE
    state = _step(core, state, t + 0.9, AccelState.ACTIVE, crit=1.0)
    return _step(core, state, t + 1.0, AccelState.ACTIVE)


#: A bucket of one window (sleep's 1.0 s) refilled at 0.01 / share; a prior share of 1.
SPACED = EntryRiskParams(late_share=0.01, burst_s=1.0, prior_challenges=1.0, prior_unannounced_share=1.0)


def _asleep_after_the_first_entry(risk_p: EntryRiskParams) -> tuple[CerebellumFirst, PolicyState]:
    """Active at 0, released into sleep at 2 s (a long idle predicted: sleep pays off)."""
    core = CerebellumFirst(params(release_s=1.0, initial_idle_prediction_s=1000.0, entry_risk=risk_p), model())
    state = core.initial_state(0.0, AccelState.ACTIVE)
    state = _step(core, state, 0.0, AccelState.ACTIVE)
    state = _step(core, state, 2.0, AccelState.ACTIVE)
    assert state.target is AccelState.SLEEP  # the first entry: the bucket was full
    return core, state


def test_surprises_space_out_the_entries_into_sleep_and_the_timer_names_when_sleep_is_allowed() -> None:
    risk_p = SPACED
    core, state = _asleep_after_the_first_entry(risk_p)
    assert state.entry_risk.available_s(2.0, risk_p) == pytest.approx(0.0)
    state = _surprise_then_rest(core, state, 10.0)  # unannounced: the share stays 1, refill 0.01/s
    assert state.entry_risk.challenges == 1 and state.entry_risk.unannounced == 1
    state = _step(core, state, 12.0, AccelState.ACTIVE)
    assert state.target is AccelState.IDLE and state.reason == "cap:entry_risk"  # 0.1 s of the 1.0 needed
    at = core.next_timer(state, 12.0)
    assert at is not None and at <= 102.0 + 1e-6  # the window is back 100 s after the entry
    state = _step(core, state, 101.0, AccelState.IDLE)
    assert state.target is AccelState.IDLE
    state = _step(core, state, 102.0, AccelState.IDLE)
    assert state.target is AccelState.SLEEP and state.reason == "rest:sleep"


def test_announced_challenges_leave_entries_as_they_were() -> None:
    core, state = _asleep_after_the_first_entry(SPACED)
    t = 10.0
    for _ in range(20):  # announced (a precursor first), each served from idle
        state = _step(core, state, t, AccelState.SLEEP, ant=1.0)
        state = _step(core, state, t + 0.5, AccelState.IDLE, ant=1.0, norm=1.0)
        state = _step(core, state, t + 0.8, AccelState.IDLE, ant=1.0, norm=1.0)
        state = _step(core, state, t + 0.9, AccelState.ACTIVE, norm=1.0)
        state = _step(core, state, t + 1.0, AccelState.ACTIVE)
        t += 5.0
    assert state.entry_risk.challenges == 20 and state.entry_risk.unannounced == 0
    # Share 1/21: the refill is 0.21 window s per s, so 5 s after the last entry sleep is allowed.
    state = _step(core, state, t + 5.0, AccelState.ACTIVE)
    assert state.target is AccelState.SLEEP


def test_without_entry_risk_every_entry_may_go_to_sleep() -> None:
    core, state = _asleep_after_the_first_entry(EntryRiskParams(late_share=0.0))
    state = _surprise_then_rest(core, state, 10.0)
    state = _step(core, state, 12.0, AccelState.ACTIVE)
    assert state.target is AccelState.SLEEP


def test_the_config_sets_the_share_and_refuses_one_out_of_range() -> None:
    text = builtin_example("demo.toml")
    assert policy_params(parse_config(text)).entry_risk.late_share == 0.005
    tuned = text.replace('deepest_state = "off"\n', 'deepest_state = "off"\nmid_entry_late_share = 0.02\n', 1)
    assert policy_params(parse_config(tuned)).entry_risk.late_share == 0.02
    broken = text.replace('deepest_state = "off"\n', 'deepest_state = "off"\nmid_entry_late_share = 1.5\n', 1)
    with pytest.raises(ConfigError) as err:
        parse_config(broken, "car.toml")
    assert "policy.mid_entry_late_share" in str(err.value) and "car.toml" in str(err.value)


def test_the_config_sets_the_burst_and_the_prior_and_they_pace_the_entries() -> None:
    text = builtin_example("demo.toml")
    default = policy_params(parse_config(text)).entry_risk
    assert (default.burst_s, default.prior_challenges, default.prior_unannounced_share) == (2.0, 5.0, 0.3)
    tuned_text = text.replace('deepest_state = "off"\n', 'deepest_state = "off"\nmid_entry_burst_ms = 500\n'
                              'mid_entry_prior_challenges = 20\nmid_entry_prior_unannounced_share = 0.8\n', 1)
    tuned = policy_params(parse_config(tuned_text)).entry_risk
    assert (tuned.burst_s, tuned.prior_challenges, tuned.prior_unannounced_share) == (0.5, 20.0, 0.8)
    # A 0.5 s bucket holds half a sleep window (1.0 s): the first entry is paid from a full
    # bucket, the next waits for it to refill at 0.005 / 0.8 window s per s.
    first = spend(EntryRisk(), 0.0, 1.0, tuned)
    assert first.available_s(0.0, tuned) == pytest.approx(-0.5)
    assert first.available_at(1.0, 0.0, tuned) == pytest.approx(1.0 / (0.005 / 0.8))
    assert spend(EntryRisk(), 0.0, 1.0, default).available_at(1.0, 0.0, default) is None  # 1.0 s left of 2.0
    for key, bad in (("mid_entry_burst_ms", "0"), ("mid_entry_prior_challenges", "0"),
                     ("mid_entry_prior_unannounced_share", "1.5"), ("mid_entry_burst_ms", '"2s"')):
        broken = text.replace('deepest_state = "off"\n', f'deepest_state = "off"\n{key} = {bad}\n', 1)
        with pytest.raises(ConfigError) as err:
            parse_config(broken, "car.toml")
        assert f"policy.{key}" in str(err.value) and "car.toml" in str(err.value)


def test_the_counts_persist_scaled_to_what_is_remembered_and_bad_ones_do_not_read_back() -> None:
    risk = EntryRisk(challenges=40.0, unannounced=10.0, tokens_s=-0.5, at=100.0)
    back = parse_entry_risk(risk.to_dict())
    assert back == EntryRisk(challenges=40.0, unannounced=10.0)  # the bucket restarts full
    many = parse_entry_risk(EntryRisk(challenges=1000.0, unannounced=600.0).to_dict())
    assert many is not None and many.challenges == REMEMBERED and many.unannounced_share(P) == pytest.approx(
        (120.0 + 0.5 * 10) / (200.0 + 10))
    for bad in ("x", {"challenges": -1, "unannounced": 0}, {"challenges": 2, "unannounced": 3},
                {"challenges": True, "unannounced": 0}, {"challenges": float("nan"), "unannounced": 0}, {}):
        assert parse_entry_risk(bad) is None


def test_the_counts_fade_past_what_is_remembered_so_that_a_new_world_is_learned() -> None:
    risk = EntryRisk()
    for t in range(1000):  # a world of announced challenges
        risk = count_challenge(risk, float(t), unannounced=False, p=P)
    assert risk.challenges == pytest.approx(REMEMBERED) and risk.unannounced_share(P) < 0.03
    for t in range(1000, 1200):  # then one of surprises: the share follows within 200 challenges
        risk = count_challenge(risk, float(t), unannounced=True, p=P)
    assert risk.challenges == pytest.approx(REMEMBERED) and risk.unannounced_share(P) > 0.6
