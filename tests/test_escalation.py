"""Wake watchdog ladder: failures injected at each rung (table), per-backend defaults, and
properties: rungs are never skipped and every watched wake ends in success or give-up."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cerebellumd.accel import AccelState
from cerebellumd.config.escalation import EscalationConfig, RungConfig
from cerebellumd.policies.escalation import (
    DEFAULT_LADDERS,
    SEVERITY,
    Action,
    Ladder,
    LadderSpec,
    LadderState,
    Phase,
    Rung,
    RungSpec,
)

FULL = LadderSpec(
    "test", 1.0,
    (RungSpec(Rung.RETRY, 2.0), RungSpec(Rung.REBIND, 3.0), RungSpec(Rung.PCI_RESCAN, 4.0),
     RungSpec(Rung.RAIL_CYCLE, 5.0)),
    AccelState.SLEEP,
)
WAKING = AccelState.WAKING


def run_until_active(spec: LadderSpec, active_after_rung: int | None) -> tuple[LadderState, list[Action]]:
    """Walk the deadlines; the accelerator comes up right after rung `active_after_rung`
    (0 = the wake itself works; None = never)."""
    ladder = Ladder(spec)
    state = ladder.begin(LadderState(), 0.0)
    actions: list[Action] = []
    while (deadline := ladder.next_deadline(state)) is not None:
        up = active_after_rung is not None and len(actions) >= active_after_rung
        state, action = ladder.step(state, AccelState.ACTIVE if up else WAKING, deadline)
        if action is not None:
            actions.append(action)
    return state, actions


@pytest.mark.parametrize(
    ("recover_at", "rungs", "phase", "counter"),
    [
        (0, [], Phase.SUCCEEDED, "succeeded"),
        (1, [Rung.RETRY], Phase.SUCCEEDED, "recovered_by:retry"),
        (2, [Rung.RETRY, Rung.REBIND], Phase.SUCCEEDED, "recovered_by:rebind"),
        (3, [Rung.RETRY, Rung.REBIND, Rung.PCI_RESCAN], Phase.SUCCEEDED, "recovered_by:pci_rescan"),
        (4, [Rung.RETRY, Rung.REBIND, Rung.PCI_RESCAN, Rung.RAIL_CYCLE], Phase.SUCCEEDED,
         "recovered_by:rail_cycle"),
        (None, [Rung.RETRY, Rung.REBIND, Rung.PCI_RESCAN, Rung.RAIL_CYCLE, Rung.GIVE_UP],
         Phase.GAVE_UP, "give_up"),
    ],
    ids=["wake-ok", "retry", "rebind", "rescan", "rail", "give-up"],
)
def test_failure_injected_at_each_rung(
    recover_at: int | None, rungs: list[Rung], phase: Phase, counter: str
) -> None:
    state, actions = run_until_active(FULL, recover_at)
    assert [a.rung for a in actions] == rungs
    assert state.phase is phase
    assert state.count(counter) == 1
    for a in actions[:-1] if phase is Phase.GAVE_UP else actions:
        assert state.count(a.rung.value) == 1


def test_deadlines_and_reasons() -> None:
    ladder = Ladder(FULL)
    state = ladder.begin(LadderState(), 10.0)
    state, action = ladder.step(state, WAKING, 10.99)
    assert action is None  # not yet
    state, action = ladder.step(state, WAKING, 11.0)
    assert action is not None and action.rung is Rung.RETRY and action.attempt == 1
    assert action.deadline == 13.0 and action.reason.startswith("wake timed out")
    state, action = ladder.step(state, AccelState.UNKNOWN, 13.0)
    assert action is not None and action.rung is Rung.REBIND
    assert action.reason.startswith("retry timed out (unknown after 3.0 s)")


def test_give_up_carries_the_safe_state_and_is_terminal() -> None:
    state, actions = run_until_active(FULL, None)
    assert actions[-1].safe_state is AccelState.SLEEP and actions[-1].deadline is None
    again, action = Ladder(FULL).step(state, AccelState.ACTIVE, 1e9)
    assert again == state and action is None  # stays given up until a new wake is begun
    restarted = Ladder(FULL).begin(state, 100.0)
    assert restarted.phase is Phase.WATCHING and restarted.count("give_up") == 1


def test_second_wake_command_does_not_reset_the_ladder() -> None:
    ladder = Ladder(FULL)
    state = ladder.begin(LadderState(), 0.0)
    state, _ = ladder.step(state, WAKING, 1.0)  # retry issued
    assert ladder.begin(state, 1.5) == state


def test_cancel_is_not_a_failure() -> None:
    ladder = Ladder(FULL)
    state = ladder.cancel(ladder.begin(LadderState(), 0.0))
    assert state.phase is Phase.IDLE and state.count("cancelled") == 1
    assert ladder.step(state, WAKING, 100.0)[1] is None


@pytest.mark.parametrize("backend", sorted(DEFAULT_LADDERS))
def test_backend_defaults_escalate_and_end_in_give_up(backend: str) -> None:
    spec = DEFAULT_LADDERS[backend]
    _, actions = run_until_active(spec, None)
    assert [a.rung for a in actions] == [*(r.rung for r in spec.rungs), Rung.GIVE_UP]


@pytest.mark.parametrize(
    ("backend", "absent"),
    [("jetson", {Rung.REBIND, Rung.PCI_RESCAN}), ("gpio_rail", {Rung.REBIND, Rung.PCI_RESCAN}),
     ("pcie_runtime_pm", {Rung.RAIL_CYCLE})],
)
def test_backends_without_a_mechanism_never_use_it(backend: str, absent: set[Rung]) -> None:
    assert not absent & {r.rung for r in DEFAULT_LADDERS[backend].rungs}


def test_coral_waits_longer_than_a_reset() -> None:
    # Coral resets of 12 s have been seen: no rung may give up on it sooner.
    coral = DEFAULT_LADDERS["coral_pcie"]
    assert coral.wake_timeout_s > 12 and all(r.timeout_s > 12 for r in coral.rungs)


@pytest.mark.parametrize(
    "rungs",
    [(RungSpec(Rung.RAIL_CYCLE, 1), RungSpec(Rung.RETRY, 1)),
     (RungSpec(Rung.RETRY, 0),),
     (RungSpec(Rung.GIVE_UP, 1),)],
    ids=["descending", "zero-timeout", "explicit-give-up"],
)
def test_invalid_ladders_are_refused(rungs: tuple[RungSpec, ...]) -> None:
    with pytest.raises(ValueError):
        LadderSpec("bad", 1.0, rungs)


def test_config_overrides_and_validation() -> None:
    spec = EscalationConfig(backend="coral_pcie").spec()
    assert spec == DEFAULT_LADDERS["coral_pcie"]
    custom = EscalationConfig(
        backend="hailo_pcie", wake_timeout_ms=500, safe_state=AccelState.OFF,
        rungs=[RungConfig(rung=Rung.RETRY, timeout_ms=700), RungConfig(rung=Rung.REBIND, timeout_ms=900)],
    ).spec()
    assert (custom.wake_timeout_s, custom.safe_state) == (0.5, AccelState.OFF)
    assert [(r.rung, r.timeout_s) for r in custom.rungs] == [(Rung.RETRY, 0.7), (Rung.REBIND, 0.9)]
    for bad in ({"backend": "tpu9000"}, {"rungs": [{"rung": "rail_cycle", "timeout_ms": 5},
                                                   {"rung": "retry", "timeout_ms": 5}]},
                {"safe_state": "waking"}, {"retries": 3}):
        with pytest.raises(ValidationError):
            EscalationConfig.model_validate(bad)


# -- properties ---------------------------------------------------------------------------------

rung_lists = st.lists(st.sampled_from(SEVERITY), max_size=6).map(
    lambda rs: tuple(RungSpec(r, 1.0 + i) for i, r in enumerate(sorted(rs, key=SEVERITY.index)))
)
observations = st.lists(
    st.tuples(st.floats(0.0, 5.0), st.sampled_from([WAKING, AccelState.UNKNOWN, AccelState.IDLE,
                                                   AccelState.ACTIVE])),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(rungs=rung_lists, obs=observations, wake_s=st.floats(0.1, 5.0))
def test_never_skips_a_rung_and_always_terminates(
    rungs: tuple[RungSpec, ...], obs: list[tuple[float, AccelState]], wake_s: float
) -> None:
    spec = LadderSpec("p", wake_s, rungs)
    ladder = Ladder(spec)
    state = ladder.begin(LadderState(), 0.0)
    now = 0.0
    emitted: list[Rung] = []
    for gap, seen in obs:
        now += gap
        state, action = ladder.step(state, seen, now)
        if action is not None:
            emitted.append(action.rung)
    # Then the device stays dead: the ladder must finish on its own.
    for _ in range(len(rungs) + 2):
        deadline = ladder.next_deadline(state)
        if deadline is None:
            break
        state, action = ladder.step(state, WAKING, max(now, deadline))
        if action is not None:
            emitted.append(action.rung)
    assert state.phase in (Phase.SUCCEEDED, Phase.GAVE_UP)
    expected = [r.rung for r in rungs]
    if state.phase is Phase.GAVE_UP:
        assert emitted == [*expected, Rung.GIVE_UP]
    else:
        assert emitted == expected[: len(emitted)]  # a prefix, in order, nothing skipped
