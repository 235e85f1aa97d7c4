"""Controllers and queueing math: hand-computed values and plan invariants."""
import math

import numpy as np
import pytest

from agents.baselines import ModelLevelConfig, ModelLevelController, StaticController, peak_rate
from agents.context import ControllerContext, LinearLatency
from agents.operator_queueing import OperatorQueueingConfig, OperatorQueueingController
from agents.queueing import erlang_b, erlang_c, min_servers, mmc_sojourn, mmc_wait, mmc_wait_quantile
from agents.sizing import instance_capacity, replicas_for_rate
from runtime.control import SLO, ClusterState, OperatorState, Plan
from runtime.models import OPERATOR_GROUPS, get_model

GB = 10**9


# ----------------------------------------------------------------------------- queueing
def test_erlang_b_and_c_hand_values():
    assert erlang_b(1, 1.0) == pytest.approx(0.5)
    assert erlang_b(2, 1.0) == pytest.approx(0.2)  # (1 * 0.5) / (2 + 0.5)
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # 0.2 / (1 - 0.5 * 0.8)
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(3, 3.0) == 1.0 and erlang_c(3, 0.0) == 0.0


def test_mm1_reduces_to_rho_over_mu_minus_lambda():
    lam, mu = 3.0, 5.0
    assert mmc_wait(lam, mu, 1) == pytest.approx((lam / mu) / (mu - lam))
    assert mmc_sojourn(lam, mu, 1) == pytest.approx(1 / (mu - lam))
    assert mmc_wait(1.0, 1.0, 2) == pytest.approx(1 / 3)  # C = 1/3, c mu - lambda = 1
    assert math.isinf(mmc_wait(2.0, 1.0, 2))


def test_wait_quantile_hand_value():
    # M/M/1, lambda 1, mu 2: P(W > t) = 0.5 exp(-t) = 0.01  =>  t = ln 50.
    assert mmc_wait_quantile(1.0, 2.0, 1, 0.99) == pytest.approx(math.log(50))
    assert mmc_wait_quantile(0.1, 10.0, 4, 0.9) == 0.0  # P(wait) is tiny


def test_erlang_c_stable_for_many_servers():
    c = erlang_c(800, 760.0)
    assert 0.0 < c < 1.0 and math.isfinite(c)
    # More servers never raise the wait.
    waits = [mmc_wait(90.0, 1.0, n) for n in range(91, 140)]
    assert all(a >= b for a, b in zip(waits, waits[1:]))


def test_queueing_rejects_bad_input():
    with pytest.raises(ValueError, match="offered_load"):
        erlang_b(2, -1.0)
    with pytest.raises(ValueError, match="service_rate"):
        mmc_wait(1.0, 0.0, 1)
    assert min_servers(9.0, 1.0, 0.9) == 10 and min_servers(10.0, 1.0) == 11


# ----------------------------------------------------------------------------- fixtures
def simple_ctx(**kw) -> ControllerContext:
    """Only the MLP costs time: 10 ms + 0.1 ms per token (hand-computable)."""
    lat = LinearLatency({"mlp": 10.0}, {"mlp": 0.1})
    return ControllerContext(get_model("llama-2-7b"), SLO(ttft_s=1.0, tbt_s=0.05), lat, 80 * GB, **kw)


def realistic_ctx() -> ControllerContext:
    lat = LinearLatency({"embed": 0.05, "attn": 1.0, "proj": 2.0, "mlp": 5.0, "head": 0.5},
                        {"embed": 0.0005, "attn": 0.01, "proj": 0.01, "mlp": 0.03, "head": 0.005},
                        {"attn": 1e-5})
    return ControllerContext(get_model("llama-2-7b"), SLO(ttft_s=2.0, tbt_s=0.1), lat, 80 * GB,
                             prefill_chunk_tokens=256)


def state(t: float, rate: float, plan: Plan, slo: SLO, **kw) -> ClusterState:
    ops = {g: OperatorState(plan[g].replicas, plan[g].max_batch, plan[g].placement, plan[g].tp)
           for g in OPERATOR_GROUPS}
    kw.setdefault("prompt_tokens_mean", 1000.0)
    kw.setdefault("output_tokens_mean", 200.0)
    return ClusterState(t, 1.0, ops, slo, plan, request_rate_history=np.full(8, rate), **kw)


# ----------------------------------------------------------------------------- sizing / static
def test_instance_capacity_hand_computed():
    ctx = simple_ctx()
    cap = instance_capacity(ctx, prompt_tokens=100, output_tokens=100)
    # step(b) = 10 + 0.1 b ms <= 0.8 * 50 ms  =>  b <= 300  =>  largest level 256, 35.6 ms.
    assert cap.max_batch == 256
    assert cap.decode_step_s == pytest.approx(0.0356)
    assert cap.prefill_s == pytest.approx(0.020)  # 10 + 0.1 * 100 ms
    assert cap.rate == pytest.approx(1 / (0.020 + 100 * 0.0356 / 256))
    assert replicas_for_rate(100.0, cap, 0.8) == math.ceil(100 / (cap.rate * 0.8))


def test_peak_rate_and_static_plan():
    arrivals = np.array([0.0, 1.0, 2.0, 3.0, 50.0, 100.0])
    assert peak_rate(arrivals, 10.0) == pytest.approx(0.4)
    ctx = simple_ctx()
    arr = np.arange(0, 600, 0.01)  # 100 req/s
    ctl = StaticController.for_trace(ctx, arr, np.full(arr.size, 100), np.full(arr.size, 100))
    cap = instance_capacity(ctx, 100, 100)
    plan = ctl.decide(state(1.0, 5.0, ctl.plan, ctx.slo))
    assert plan["mlp"].replicas == math.ceil(100 / (cap.rate * 0.8)) == 5
    assert {plan[g].placement for g in OPERATOR_GROUPS} == {"model"}
    assert len({plan[g].replicas for g in OPERATOR_GROUPS}) == 1


# ----------------------------------------------------------------------------- model-level
def test_model_level_waits_out_upscale_delay_then_scales():
    ctx = realistic_ctx()
    ctl = ModelLevelController(ctx, ModelLevelConfig(upscale_delay_s=20, downscale_delay_s=20))
    plan = Plan.model_level(1, 64, 1)
    seen = []
    for t in range(1, 40):
        plan = ctl.decide(state(float(t), 40.0, plan, ctx.slo))
        seen.append(plan["mlp"].replicas)
        assert {plan[g].placement for g in OPERATOR_GROUPS} == {"model"}
    assert seen[:18] == [1] * 18  # still inside the 20 s delay
    assert seen[-1] > 1
    first_up = seen.index(seen[-1]) + 1
    assert 19 <= first_up <= 21


def test_model_level_ongoing_mode_and_downscale():
    ctx = realistic_ctx()
    ctl = ModelLevelController(ctx, ModelLevelConfig(mode="ongoing", target_ongoing=10,
                                                     upscale_delay_s=2, downscale_delay_s=5))
    plan = Plan.model_level(1, 64, 1)
    for t in range(1, 5):
        plan = ctl.decide(state(float(t), 1.0, plan, ctx.slo, running_requests=45, queued_requests=5))
    assert plan["mlp"].replicas == 5  # ceil(50 / 10)
    for t in range(5, 9):
        plan = ctl.decide(state(float(t), 1.0, plan, ctx.slo, running_requests=10))
    assert plan["mlp"].replicas == 5  # 4 s of lower demand < 5 s delay
    for t in range(9, 12):
        plan = ctl.decide(state(float(t), 1.0, plan, ctx.slo, running_requests=10))
    assert plan["mlp"].replicas == 1
    with pytest.raises(ValueError, match="mode"):
        ModelLevelConfig(mode="magic")


# ----------------------------------------------------------------------------- operator-queueing
@pytest.mark.parametrize("rate", [0.5, 5.0, 20.0, 40.0])
def test_operator_queueing_plan_meets_its_own_slo_estimate(rate):
    ctx = realistic_ctx()
    ctl = OperatorQueueingController(ctx)
    qp = ctl.plan_for(rate, 1000, 200)
    assert qp.feasible
    assert qp.tbt_s <= 0.8 * ctx.slo.tbt_s + 1e-12 and qp.ttft_s <= 0.8 * ctx.slo.ttft_s + 1e-12
    # Each group's utilisation stays within the bound.
    for g in OPERATOR_GROUPS:
        load = ctl.group_load(g, qp.batch[g], rate, 1000, 200)
        assert load.offered / qp.replicas[g] <= ctl.config.max_utilisation + 1e-9


def test_operator_queueing_scales_groups_unevenly_with_load():
    ctx = realistic_ctx()
    ctl = OperatorQueueingController(ctx)
    lo, hi = ctl.plan_for(2.0, 1000, 200), ctl.plan_for(30.0, 1000, 200)
    assert all(hi.replicas[g] >= lo.replicas[g] for g in OPERATOR_GROUPS)
    assert len(set(hi.replicas.values())) > 1  # groups scale independently
    assert hi.gpus > lo.gpus


def test_operator_queueing_decide_scales_up_at_once_and_down_after_delay():
    ctx = realistic_ctx()
    ctl = OperatorQueueingController(ctx, OperatorQueueingConfig(downscale_delay_s=5.0))
    plan = Plan.model_level(1, 64, 1)
    plan = ctl.decide(state(1.0, 60.0, plan, ctx.slo))
    high = {g: plan[g].replicas for g in OPERATOR_GROUPS}
    assert {plan[g].placement for g in OPERATOR_GROUPS} == {"pack"}
    assert high["mlp"] > 1
    held = []
    for t in range(2, 12):
        plan = ctl.decide(state(float(t), 1.0, plan, ctx.slo))
        held.append(plan["mlp"].replicas)
    assert held[0] == high["mlp"]  # not yet: the high target is in the window
    assert held[-1] < high["mlp"]


def test_operator_queueing_margin_grows_on_slo_miss():
    ctx = realistic_ctx()
    ctl = OperatorQueueingController(ctx, OperatorQueueingConfig(margin_up=1.15))
    plan = Plan.model_level(1, 64, 1)
    base = ctl.decide(state(1.0, 30.0, plan, ctx.slo))
    for t in range(2, 6):
        plan = ctl.decide(state(float(t), 30.0, plan, ctx.slo, ttft_p99_s=5.0, slo_attainment=0.5))
    assert ctl.margin > 1.5
    grown = [g for g in OPERATOR_GROUPS if plan[g].replicas > base[g].replicas]
    assert grown and all(plan[g].replicas >= base[g].replicas for g in OPERATOR_GROUPS)


def test_registry_gives_operator_queueing_the_fixed_budget():
    from agents.envtools import load_scenario
    from agents.registry import make_controller

    sc = load_scenario()
    free, _ = make_controller("operator-queueing", sc)
    capped, _ = make_controller("operator-queueing", sc, budget_gpus=24)
    assert capped.config.max_gpus == 24
    assert free.config.max_gpus != 24


def test_registry_mirrors_the_scenarios_step_model_in_operator_queueing():
    from agents.envtools import load_scenario
    from agents.registry import make_controller

    sc = load_scenario(micro_batches=3, micro_batching="fixed", contention=0.25, micro_batch_slack=0.2)
    ctl, _ = make_controller("operator-queueing", sc)
    assert (ctl.config.micro_batches, ctl.config.micro_batching, ctl.config.contention) == (3, "fixed", 0.25)
    assert ctl.config.micro_batch_slack == 0.2
    assert ctl.model.m_choices == (3,)
    # settings still win over the scenario
    ctl, _ = make_controller("operator-queueing", sc, settings={"operator-queueing": {"micro_batching": "adaptive"}})
    assert ctl.config.micro_batching == "adaptive"
