"""bench/hindsight_oracle.py's building blocks: a cloned fast simulator is independent of its
original, and the schedule controller replays its plans."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from bench.hindsight_oracle import ScheduleController, clone, greedy_schedule  # noqa: E402
from bench.pack_frontier import pack_plan  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    sc = load_scenario()
    trace = load_split(sc, "test")
    small = pack_plan(sc, 8, 16, 2, 4, 2, 2)
    big = pack_plan(sc, 16, 16, 5, 8, 4, 4)
    return sc, trace, small, big


def _trajectory(sim, plans):
    return [(s.slo_attainment, s.gpus_in_use, s.queued_requests, s.energy_j) for s in map(sim.step, plans)]


def test_stepping_a_clone_leaves_the_original_untouched(setup):
    sc, trace, small, big = setup
    a, b = make_sim(sc, trace, "fast", 0), make_sim(sc, trace, "fast", 0)
    a.reset(big)
    b.reset(big)
    _trajectory(a, [big] * 20)
    _trajectory(b, [big] * 20)
    c = clone(a)
    _trajectory(c, [small] * 6)              # the clone runs ahead on another plan ...
    after = _trajectory(a, [small, big, big])
    assert after == _trajectory(b, [small, big, big])   # ... and the original is as if it never did
    assert c.now > b.now - 1e-9


def test_schedule_controller_replays_then_holds_the_last_plan(setup):
    _, _, small, big = setup
    ctl = ScheduleController([small, big])
    assert [ctl.decide(None) for _ in range(4)] == [small, big, big, big]
    ctl.reset()
    assert ctl.decide(None) is small
    with pytest.raises(ValueError, match="at least one plan"):
        ScheduleController([])


def test_greedy_schedule_takes_the_cheapest_plan_that_holds(setup):
    sc, trace, small, big = setup
    sim = make_sim(sc, trace.window(0.0, 60.0), "fast", 0)
    sim.reset(big)
    plans, fallbacks = greedy_schedule(sim, [small, big], tau=0.0, lookahead=1)
    assert plans and all(p is small for p in plans) and fallbacks == 0   # everything holds tau 0
    sim = make_sim(sc, trace.window(0.0, 60.0), "fast", 0)
    sim.reset(big)
    plans, fallbacks = greedy_schedule(sim, [small, big], tau=1.01, lookahead=1)
    assert all(p is big for p in plans) and fallbacks == len(plans)      # nothing holds: largest plan
