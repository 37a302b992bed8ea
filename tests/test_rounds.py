"""The re-solve rounds' decisions (latprune.pipeline.better_round, round_is_final): plans that
meet the budget beat misses, a plan that uses too little of its budget is re-solved upward,
and the best meeting plan is kept when a looser round misses."""
from __future__ import annotations

from types import SimpleNamespace

from latprune.pipeline import BUDGET_USE, better_round, round_is_final


def _round(objective: float, measured: float, budget: float = 10.0) -> tuple:
    return (SimpleNamespace(objective=objective), None, measured, measured, None, budget)


def test_a_plan_far_under_budget_is_loosened_and_one_near_it_stops():
    assert not round_is_final(5.0, 10.0, last_round=False, repeated_plan=False)  # 50% used
    assert round_is_final(BUDGET_USE * 10.0, 10.0, last_round=False, repeated_plan=False)
    assert round_is_final(9.99, 10.0, last_round=False, repeated_plan=False)
    assert not round_is_final(10.5, 10.0, last_round=False, repeated_plan=False)  # a miss tightens
    assert round_is_final(5.0, 10.0, last_round=True, repeated_plan=False)
    assert round_is_final(5.0, 10.0, last_round=False, repeated_plan=True)  # nothing more to gain
    assert not round_is_final(10.5, 10.0, last_round=False, repeated_plan=True)


def test_the_best_meeting_plan_survives_a_looser_round_that_misses():
    under = _round(objective=-3.0, measured=6.0)  # meets, uses 60%
    looser = _round(objective=-1.0, measured=10.4)  # better objective but misses
    assert better_round(under, looser) is under
    closer = _round(objective=-2.0, measured=9.2)  # meets, higher objective
    assert better_round(under, closer) is closer
    assert better_round(closer, under) is closer
    # while nothing meets, the miss nearest its budget is kept
    far, near = _round(-1.0, 14.0), _round(-2.0, 11.0)
    assert better_round(far, near) is near and better_round(near, far) is near
    assert better_round(near, under) is under
    assert better_round(None, far) is far


def test_budget_use_note_says_why_a_plan_stays_under_the_budget():
    from latprune.pipeline import budget_use_note

    def rnd(i, measured, budget=10.0):
        return {"round": i, "measured_ms": measured, "budget_ms": budget}

    # enough of the budget used, or a miss: nothing to explain
    assert budget_use_note([rnd(1, 9.5)], 9.5, 10.0, "") == ""
    assert budget_use_note([rnd(1, 10.5)], 10.5, 10.0, "") == ""
    # the looser round missed: that is the reason, whatever stopped the rounds
    note = budget_use_note([rnd(1, 6.0), rnd(2, 10.4)], 6.0, 10.0, "the 2 re-solve rounds (--rounds) ran out")
    assert "60%" in note and "round(s) 2" in note and "missed" in note
    # no looser round missed: the stop reason is given
    note = budget_use_note([rnd(1, 6.0), rnd(2, 6.0)], 6.0, 10.0, "the solver repeated a plan already measured")
    assert "repeated" in note and "under 90%" in note
