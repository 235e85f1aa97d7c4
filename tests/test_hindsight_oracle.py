"""agents/hindsight.py (bench/hindsight_oracle.py's building blocks and the hindsight teacher): a
cloned fast simulator is independent of its original, the schedule controller replays its plans,
the greedy choice takes the cheapest plan that holds, the causal rule covers its window."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from agents.hindsight import (HindsightTeacher, ScheduleController, clone, greedy_schedule, pack_plan,  # noqa: E402
                              reactive_schedule, worst_of)


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


def test_a_clone_continues_exactly_as_its_original(setup):
    sc, trace, small, big = setup
    a = make_sim(sc, trace, "fast", 0)
    a.reset(big)
    _trajectory(a, [big, small, big, small, small])
    c = clone(a)
    plans = [small, big, big, small, big, small]
    assert _trajectory(c, plans) == _trajectory(a, plans)
    assert c.ttft_rec == a.ttft_rec and c.ttft_rec is not a.ttft_rec


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


def test_worst_of_and_the_reactive_schedule_cover_the_past_window(setup):
    sc, _, small, big = setup
    mixed = pack_plan(sc, 8, 16, 5, 4, 4, 4)          # big's projection count, small's attention and MLP
    assert worst_of([small, mixed]) == pack_plan(sc, 8, 16, 5, 4, 4, 4)   # embed/head from the last plan
    assert worst_of([mixed, small]) == pack_plan(sc, 8, 16, 5, 4, 2, 2)
    # hand case: interval k runs the worst of the oracle's plans for k-2 and k-1 (the first: plan 0)
    sched = [small, big, small, small]
    assert reactive_schedule(sched, 2) == [small, small, worst_of([small, big]), worst_of([big, small])]
    assert reactive_schedule(sched, 1) == [small, small, big, small]
    with pytest.raises(ValueError, match="at least one interval"):
        reactive_schedule(sched, 0)


def test_hindsight_teacher_learns_each_interval_after_it_and_leaves_the_sim_alone(setup):
    sc, trace, small, big = setup
    window = trace.window(0.0, 60.0)
    sim, twin = make_sim(sc, window, "fast", 0), make_sim(sc, window, "fast", 0)
    sim.reset(big)
    twin.reset(big)
    lenient = HindsightTeacher(lambda: sim, [small, big], tau=0.0, lookahead=1, window=2)
    strict = HindsightTeacher(lambda: sim, [small, big], tau=1.01, lookahead=1, window=2)
    lenient.reset(None)
    strict.reset(None)
    for _ in range(5):
        assert lenient.decide(None) is small     # every interval holds tau 0 with the small plan
        assert strict.decide(None) == big                       # nothing holds tau > 1: the largest plan
        plan = small
        assert _trajectory(sim, [plan]) == _trajectory(twin, [plan])   # deciding did not move the simulator
    assert len(lenient.past) == 2 and all(p is small for p in lenient.past)
    with pytest.raises(ValueError, match="window 0"):
        HindsightTeacher(lambda: sim, [small], window=0)


def test_hindsight_demonstrations_move_the_training_env_to_menu_plans(setup):
    from agents.envtools import env_prev_plan, env_state
    from agents.hyperparams import HindsightTeacherConfig, load_hyperparams
    from agents.imitation import collect_demonstrations
    from agents.training import _env_factory, hindsight_teacher
    from runtime.codec import ActionDecoder

    sc = setup[0].replace(episode_intervals=6)
    hp = load_hyperparams()
    env = _env_factory(sc, "train", 3, None, {"initial_plan": hp.initial_plan, "freeze_layout": True})()
    cfg = HindsightTeacherConfig(attn=[8, 16], proj=[2, 5], mlp=[4, 8], window=1)
    teacher = hindsight_teacher(cfg, sc, env.unwrapped.pred, lambda: env.unwrapped.sim)
    assert [p["attn"].replicas for p in teacher.menu][-1] == 16 and len(teacher.menu) == 8
    demos = collect_demonstrations(env, teacher, ActionDecoder(sc.codec_config), 1, env_state, seed=0,
                                   prev_plan_of=env_prev_plan)
    assert len(demos) == 6
    target = env.unwrapped.sim.timeline.target_plan      # the last demonstrated action's plan
    assert (target["attn"].replicas, target["proj"].replicas, target["mlp"].replicas) in {
        (a, p, m) for a in (8, 16) for p in (2, 5) for m in (4, 8)}
    with pytest.raises(ValueError, match="bc.hindsight.attn"):
        HindsightTeacherConfig(attn=[])
