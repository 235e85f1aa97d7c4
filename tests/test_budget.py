"""Fixed-budget mode (agents/budget.py): filled plans fit the budget as the simulator places
them, never take a replica away, keep the plan's proportions, and leave alone what they
cannot count."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.budget import BudgetFill, cap_plan, fill_by_utilisation, fill_plan, pack_gpu_counter, scale_plan
from runtime.control import SLO, ClusterState, Controller, OperatorPlan, OperatorState, Plan
from runtime.models import OPERATOR_GROUPS


@pytest.fixture(scope="module")
def world():
    from agents.registry import controller_context, profile_db
    from envs import Scenario, default_slo, predictor_for
    from envs.world import Placer

    sc = Scenario.from_yaml()
    pred = predictor_for(sc.model, sc.gpu)
    ctx = controller_context(sc, default_slo(sc, pred), profile_db())
    return sc, Placer(sc, pred), pack_gpu_counter(ctx), int(sc.codec_config.max_replicas)


def pack_plan(sc, reps: dict[str, int], attn_batch: int = 16) -> Plan:
    return Plan({g: OperatorPlan(reps[g], attn_batch if g == "attn" else 256, "pack", int(sc.tp[g]))
                 for g in OPERATOR_GROUPS})


START = {"embed": 1, "attn": 16, "proj": 3, "mlp": 6, "head": 1}  # agents/configs/ppo.yaml's start plan


def test_whole_model_plans_fill_to_budget_over_tp_instances(world):
    sc, _, count, max_r = world
    plan = Plan.model_level(3, 64, 4)
    assert count(plan) == 12
    filled = fill_plan(plan, 24, count, max_r)
    assert filled == Plan.model_level(6, 64, 4)
    assert fill_plan(plan, 27, count, max_r) == Plan.model_level(6, 64, 4)  # 27 // 4
    assert fill_plan(Plan.model_level(8, 64, 4), 24, count, max_r) == Plan.model_level(8, 64, 4)  # over: unchanged


def test_start_plan_fills_24_gpus_as_the_simulator_places_it(world):
    sc, placer, count, max_r = world
    plan = pack_plan(sc, START)
    assert count(plan) == placer.place(plan).n_gpus == 14
    filled = fill_plan(plan, 24, count, max_r)
    layout = placer.place(filled)
    assert layout.repairs == [] and layout.n_gpus == count(filled) == 24
    assert {g: filled[g].replicas for g in OPERATOR_GROUPS} == {"embed": 2, "attn": 32, "proj": 6, "mlp": 10,
                                                                 "head": 2}


def test_plans_it_cannot_count_pass_through(world):
    sc, _, count, max_r = world
    mixed = pack_plan(sc, START).with_op("mlp", placement="dedicated")
    assert count(mixed) is None
    assert fill_plan(mixed, 24, count, max_r) is mixed
    other_tp = pack_plan(sc, START).with_op("attn", tp=2)
    assert count(other_tp) is None and fill_plan(other_tp, 24, count, max_r) is other_tp


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reps=st.fixed_dictionaries({g: st.integers(1, 12) for g in OPERATOR_GROUPS}),
       attn_batch=st.sampled_from([16, 32, 64]), budget=st.integers(8, 40))
def test_filled_plans_fit_keep_replicas_and_proportions(world, reps, attn_batch, budget):
    sc, placer, count, max_r = world
    plan = pack_plan(sc, reps, attn_batch)
    filled = fill_plan(plan, budget, count, max_r)
    used = count(plan)
    if used >= budget:
        assert filled is plan
        return
    n = count(filled)
    assert used <= n <= budget
    assert placer.place(filled).n_gpus == n  # the controller's count is the simulator's
    ratios = [filled[g].replicas / plan[g].replicas for g in OPERATOR_GROUPS]
    assert min(ratios) >= 1.0
    for g in OPERATOR_GROUPS:
        f = filled[g]
        assert (f.max_batch, f.placement, f.tp) == (plan[g].max_batch, plan[g].placement, plan[g].tp)
        assert f.replicas <= max_r
    # proportions: no group is scaled past what the largest rounding of one common factor gives
    top = max(ratios)
    for g in OPERATOR_GROUPS:
        assert filled[g].replicas <= max(plan[g].replicas, int(plan[g].replicas * top + 0.5))


def test_scale_plan_rounds_half_up_and_never_shrinks():
    p = Plan.from_dict({g: {"replicas": r, "max_batch": 32, "placement": "pack", "tp": 1}
                        for g, r in zip(OPERATOR_GROUPS, (1, 2, 3, 4, 5))})
    s = scale_plan(p, 1.5)
    assert [s[g].replicas for g in OPERATOR_GROUPS] == [2, 3, 5, 6, 8]  # 1.5, 3, 4.5, 6, 7.5
    assert scale_plan(p, 1.0) == p


def _toy_count(plan: Plan) -> int:
    """A hand-checkable GPU count: one per attention or projection replica, two per MLP replica."""
    return plan["attn"].replicas + plan["proj"].replicas + 2 * plan["mlp"].replicas


def test_utilisation_fill_water_fills_hand_computed():
    plan = Plan.from_dict({g: {"replicas": r, "max_batch": 32, "placement": "pack", "tp": 1}
                           for g, r in zip(OPERATOR_GROUPS, (1, 8, 3, 2, 1))})
    assert _toy_count(plan) == 15
    # busy replicas' worth: attn 8 x 0.5, proj 3 x 1.0, mlp 2 x 1.0; embed and head idle
    busy = {"embed": 0.0, "attn": 4.0, "proj": 3.0, "mlp": 2.0, "head": 0.0}
    out = fill_by_utilisation(plan, 19, _toy_count, 32, busy)
    # proj (1.0, first of the tie) -> 4, mlp (1.0) -> 3, proj (0.75) -> 5 = 19 GPUs; then mlp
    # (0.667, +2), proj (0.6) and attn (0.5) no longer fit
    assert [out[g].replicas for g in OPERATOR_GROUPS] == [1, 8, 5, 3, 1]
    assert _toy_count(out) == 19
    # nothing measured yet: proportional fill
    assert fill_by_utilisation(plan, 19, _toy_count, 32, {}) == fill_plan(plan, 19, _toy_count, 32)
    # at or over budget: unchanged
    assert fill_by_utilisation(plan, 15, _toy_count, 32, busy) is plan


def test_cap_shrinks_plans_over_budget_hand_computed():
    plan = Plan.from_dict({g: {"replicas": r, "max_batch": 32, "placement": "pack", "tp": 1}
                           for g, r in zip(OPERATOR_GROUPS, (1, 8, 4, 4, 1))})
    assert _toy_count(plan) == 20
    # f = 0.5: attn 4, proj 2, mlp 2 = 10 GPUs; f just under 0.75: attn 5, proj 2, mlp 2 = 11
    out = cap_plan(plan, 11, _toy_count)
    assert [out[g].replicas for g in OPERATOR_GROUPS] == [1, 5, 2, 2, 1] and _toy_count(out) == 11
    assert cap_plan(plan, 20, _toy_count) is plan
    assert [cap_plan(plan, 2, _toy_count)[g].replicas for g in OPERATOR_GROUPS] == [1] * 5  # nothing fits


class Fixed(Controller):
    name = "fixed"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.resets = 0

    def reset(self, state=None) -> None:
        self.resets += 1

    def decide(self, state: ClusterState) -> Plan:
        return self.plan


def _state(plan: Plan) -> ClusterState:
    ops = {g: OperatorState(plan[g].replicas, plan[g].max_batch, plan[g].placement, plan[g].tp) for g in OPERATOR_GROUPS}
    return ClusterState(0.0, 5.0, ops, SLO(ttft_s=1.0, tbt_s=0.1), plan, request_rate_history=np.zeros(4))


def test_budget_fill_wraps_any_controller(world):
    sc, _, count, max_r = world
    inner = Fixed(pack_plan(sc, START))
    ctl = BudgetFill(inner, 24, count, max_r, rule="proportional")
    assert ctl.name == "fixed" and BudgetFill(inner, 24, count, max_r).rule == "utilisation"
    plan = ctl.decide(_state(inner.plan))
    assert count(plan) == 24 and plan == fill_plan(inner.plan, 24, count, max_r)
    ctl.reset(None)
    assert inner.resets == 1
    with pytest.raises(ValueError, match="budget_gpus must be >= 1, got 0"):
        BudgetFill(inner, 0, count, max_r)
    with pytest.raises(ValueError, match="fill rule must be one of .*got 'greedy'"):
        BudgetFill(inner, 24, count, max_r, rule="greedy")
    # the utilisation rule reads the busy shares the state reports
    state = _state(inner.plan)
    for g, b in (("attn", 0.9), ("mlp", 0.8)):
        state.operators[g] = OperatorState(inner.plan[g].replicas, inner.plan[g].max_batch, "pack",
                                           inner.plan[g].tp, utilisation=b)
    by_util = BudgetFill(inner, 24, count, max_r, rule="utilisation").decide(state)
    busy = {g: state.operators[g].utilisation * state.operators[g].replicas for g in OPERATOR_GROUPS}
    assert by_util == fill_by_utilisation(inner.plan, 24, count, max_r, busy)
    assert count(by_util) <= 24 and by_util["proj"].replicas == inner.plan["proj"].replicas
    # over budget: left to the simulator's repair unless cap is on
    big = Fixed(pack_plan(sc, {"embed": 1, "attn": 32, "proj": 8, "mlp": 16, "head": 1}))
    assert count(BudgetFill(big, 24, count, max_r).decide(state)) > 24
    assert count(BudgetFill(big, 24, count, max_r, cap=True).decide(state)) <= 24


@pytest.mark.parametrize("name,rule", [("model-level", "proportional"), ("ppo", "proportional"),
                                       ("ppo", "utilisation")])
def test_fixed_budget_mode_runs_on_the_whole_budget(name, rule):
    """In fixed-budget mode a whole-model controller runs budget // tp instances and the PPO
    policy's pack plans hold the budget (never more), through plan changes. The proportional
    rule keeps the plan's proportions, so it may stop a few GPUs short (the shipped session-14
    policy's small plans: 20 of 24); the utilisation rule fills to within one GPU."""
    from agents.envtools import load_scenario, load_split, make_sim
    from agents.evaluate import budget_filled, run_timeline
    from agents.registry import make_controller

    sc = load_scenario()
    capped = sc.replace(max_gpus=24)  # the simulator holds the budget; controllers see the scenario
    trace = load_split(capped, "test", 120.0)
    sim = make_sim(capped, trace, "fast", 0)
    ctl, plan0 = make_controller(name, sc, slo=sim.slo, trace=trace, checkpoint="checkpoints/ppo-default",
                                 budget_gpus=24, fidelity="fast")
    ctl, plan0 = budget_filled(ctl, plan0, sc, sim.slo, 24, rule)
    summary, tl = run_timeline(sim, ctl, plan0)
    assert summary["finished"] + summary["rejected"] + summary["queued"] == summary["requests"]
    assert max(tl.gpus) <= 24
    if name == "model-level":
        assert set(tl.replicas["attn"]) == {6}
    else:
        full = 23 if rule == "utilisation" else 20
        assert sum(g >= full for g in tl.gpus) >= 0.8 * len(tl.gpus)
        assert len({tuple(tl.replicas[g][i] for g in OPERATOR_GROUPS) for i in range(len(tl.gpus))}) > 1


def test_grid_sustained_rate_is_the_last_point_before_the_first_miss():
    from agents.evaluate import parse_grid, sustained_from_curve

    pts = [{"k": 1.3, "attainment": 0.991}, {"k": 1.0, "attainment": 0.995}, {"k": 1.1, "attainment": 0.992},
           {"k": 1.2, "attainment": 0.989}]
    assert sustained_from_curve(pts, 0.99) == 1.1  # x1.3 passes again, but x1.2 missed first
    assert sustained_from_curve(pts, 0.999) == 0.0
    assert parse_grid("1.0,1.2,0.05") == [1.0, 1.05, 1.1, 1.15, 1.2]
    with pytest.raises(ValueError, match="wants LO,HI,STEP, got '1,2'"):
        parse_grid("1,2")
    with pytest.raises(ValueError, match="needs 0 < LO <= HI and STEP > 0, got '2,1,0.1'"):
        parse_grid("2,1,0.1")
    from agents.evaluate import main
    assert main(["--controllers", "model-level", "--budget-gpus", "24", "--budget-grid", "a,b,c"]) == 2


def test_budget_curve_plot_is_written(tmp_path):
    from agents.plots import plot_budget_curves

    pts = [{"k": 1.0, "attainment": 0.999}, {"k": 1.1, "attainment": 0.985}]
    out = plot_budget_curves({"a": pts, "b": pts[::-1]}, tmp_path / "sub" / "curve.png")
    assert out.is_file() and out.stat().st_size > 1000


def test_budget_curves_label_ppo_by_the_checkpoint_it_scored(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import budget_curves

    tried = {"tried": [{"k": 1.3, "attainment": 0.999}]}
    new = tmp_path / "grid.json"
    new.write_text(json.dumps({"checkpoint": "checkpoints/ppo-budget24",
                               "fixed_budget": {"fill": "utilisation", "controllers": {"ppo": tried, "model-level": tried}}}))
    old = tmp_path / "grid_lean.json"  # written before evaluate recorded the checkpoint
    old.write_text(json.dumps({"fixed_budget": {"fill": None, "controllers": {"ppo": tried}}}))
    assert set(budget_curves.curves_from([new, old])) == {
        "ppo (ppo-budget24), filled (utilisation)", "model-level, filled (utilisation)", "ppo (ppo-lean), as deployed"}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="no fixed_budget block"):
        budget_curves.curves_from([tmp_path / "bad.json"])
