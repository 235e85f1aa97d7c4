"""World model: hand-computed iteration times, a single request through an idle instance,
placement and GPU-seconds, memory repair/refusal messages, plan-change timing."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from envs import Scenario, make_simulator, predictor_for
from envs.predictor import ExecutionPredictor, quantise
from envs.world import Placer, StepModel
from runtime.control import OperatorPlan, Plan, PlanError, SLO
from traces import Trace


class FakeDB:
    """Linear latencies (ms) so every iteration time can be computed by hand; no overhead."""

    def group_latency(self, group, gpu, model, tokens, context=0, batch=1, tp=1, phase="decode"):
        if group == "attn":
            return 0.01 * batch * context / 100 if phase == "decode" else 0.002 * tokens
        per = {"embed": 0.001, "proj": 0.01, "mlp": 0.02, "head": 0.005}[group]
        return 1.0 + per * tokens

    def send_recv_ms(self, gpu, nbytes):
        return 0.001 * nbytes / 1e6

    def power_w(self, gpu, u):
        return 100.0 + 300.0 * u

    def gpu(self, gpu):
        return SimpleNamespace(memory_bytes=80_000_000_000, idle_w=100.0, peak_w=400.0)


def fake_pred() -> ExecutionPredictor:
    return ExecutionPredictor(FakeDB(), "llama-2-70b", "h100")


def test_quantise_is_exact_on_small_and_power_of_two_grids():
    assert [quantise(x) for x in (0, 1, 17, 64)] == [0, 1, 17, 64]
    assert quantise(96) == 96 and quantise(2048) == 2048
    assert quantise(1000) in (992, 1008)


def test_monolithic_iteration_is_the_sum_of_group_times():
    p = fake_pred()
    # decode of 8 sequences at context 1024: embed 1.008 + proj 1.08 + mlp 1.16 + head 1.04 + attn 0.8192
    assert p.decode_ms(4, 8, 1024) == pytest.approx(1.008 + 1.08 + 1.16 + 1.04 + 0.8192)
    # prefill of 2 prompts x 48 tokens: 96 tokens through embed/proj/mlp, 2 rows of head, attn 0.192
    assert p.prefill_ms(4, 2, 48) == pytest.approx(1.096 + 1.96 + 2.92 + 1.01 + 0.192)


def test_calibrated_overhead_formula():
    db = FakeDB()
    db.overhead = SimpleNamespace(floor_ms_per_layer=0.5, base_ms=2.0, per_seq_ms=0.25, prefill_base_ms=1.0,
                                  prefill_kernel_scale=0.1)
    p = ExecutionPredictor(db, "llama-2-70b", "h100")
    floor = 0.5 * 80
    assert p.step_ms(10.0, decode_seqs=4) == pytest.approx(floor + 2.0 + 1.0)
    assert p.step_ms(60.0, decode_seqs=0, prefill_kernel_ms=50.0) == pytest.approx(60.0 + 1.0 + 5.0)


def one_request_trace(prompt=96, output=4, at=1.0) -> Trace:
    return Trace(np.array([at]), np.array([prompt]), np.array([output]), name="one", duration_s=10.0)


def test_single_request_through_idle_instance_ttft_is_prefill_and_tbt_is_decode():
    pred = fake_pred()
    sc = Scenario(interval_s=5.0, initial_replicas=1)
    sim = make_simulator(sc, one_request_trace(), fidelity="reference", slo=SLO(10.0, 10.0), pred=pred)
    sim.reset(Plan.model_level(1, 64, 4))
    while not sim.done:
        sim.step(None)
    ttft = sim.ttft[0]
    assert ttft == pytest.approx(pred.mono_iteration_ms(4, 0, 0, 96, 96, 1) / 1000)
    gaps = [g for (_, g, w) in sim.iter_log]
    # three decode iterations of one sequence, context 97, 98, 99 tokens
    want = [pred.decode_ms(4, 1, c) / 1000 for c in (97, 98, 99)]
    assert gaps == pytest.approx(want)
    assert sim.finish_t[0] == pytest.approx(1.0 + ttft + sum(want))
    s = sim.summary()
    assert s["finished"] == 1 and s["slo_attainment"] == 1.0


def test_gpu_seconds_and_idle_energy_of_a_hand_built_placement():
    pred = fake_pred()
    sc = Scenario(interval_s=5.0)
    placer = Placer(sc, pred)
    plan = sc.disaggregated_plan({"embed": 1, "attn": 2, "proj": 1, "mlp": 1, "head": 1}, 8, "dedicated")
    plan = plan.with_op("embed", placement="pack").with_op("head", placement="pack")
    layout = placer.place(plan)
    # attn 2 x tp1 + proj 1 x tp1 + mlp 1 x tp2 dedicated; embed and head packed together on one new GPU
    assert layout.n_gpus == 2 + 1 + 2 + 1
    assert layout.peers["embed"] == {"head": 1.0} and layout.peers["mlp"] == {}
    empty = Trace(np.array([]), np.array([], dtype=np.int64), np.array([], dtype=np.int64), name="empty",
                  duration_s=15.0)
    sim = make_simulator(sc, empty, fidelity="reference", slo=SLO(1.0, 1.0), pred=pred)
    sim.reset(plan)
    for _ in range(3):
        sim.step(None)
    assert sim.gpu_seconds == pytest.approx(6 * 15.0)
    assert sim.energy_j == pytest.approx(6 * 15.0 * 100.0)  # idle power: nothing ran


def test_memory_repair_raises_tp_with_a_message():
    sc = Scenario()
    placer = Placer(sc, predictor_for(sc.model, sc.gpu))
    plan = sc.disaggregated_plan({"embed": 1, "attn": 2, "proj": 1, "mlp": 1, "head": 1}).with_op("mlp", tp=1)
    layout = placer.place(plan)
    assert layout.plan["mlp"].tp == 2
    assert any("mlp replica needs 11" in r and "tp -> 2" in r for r in layout.repairs)
    mono = placer.place(Plan.model_level(1, 64, 1))
    assert mono.plan["attn"].tp == 2 and any("whole-model instance needs" in r for r in mono.repairs)
    for c in layout.gpus + mono.gpus:
        assert c.used_bytes <= placer.cap


def test_plan_over_max_gpus_is_repaired_or_refused():
    sc = Scenario(max_gpus=8)
    placer = Placer(sc, predictor_for(sc.model, sc.gpu))
    layout = placer.place(Plan.model_level(5, 64, 4))
    assert layout.n_gpus == 8 and layout.plan["attn"].replicas == 2
    assert "more than max_gpus=8" in layout.repairs[0]
    tiny = Scenario(max_gpus=2)
    with pytest.raises(PlanError, match="max_gpus=2"):
        Placer(tiny, predictor_for(sc.model, sc.gpu)).place(Plan.model_level(1, 64, 4))
    sim = make_simulator(sc, one_request_trace(), fidelity="fast")
    sim.reset(Plan.model_level(2, 64, 4))
    sim.step(sc.disaggregated_plan({"embed": 1, "attn": 8, "proj": 8, "mlp": 8, "head": 1}).with_op("mlp", tp=8))
    assert sim.last_repairs  # repaired, never silently allowed
    assert sim.timeline.gpus(sim.now) <= 8


def test_new_replicas_serve_only_after_their_weights_load_and_removed_units_drain():
    sc = Scenario()
    trace = Trace(np.arange(0, 60, 0.5), np.full(120, 500), np.full(120, 400), name="steady", duration_s=60.0)
    sim = make_simulator(sc, trace, fidelity="reference")
    sim.reset(Plan.model_level(2, 64, 4))
    load_s = sim.placer.place(Plan.model_level(3, 64, 4)).load_s["attn"]
    # 70B / tp4 = 34.5 GB per GPU at 3 GB/s + 1 s start-up
    assert load_s == pytest.approx(1.0 + 137.96e9 / 4 / 3.0e9, rel=0.01)
    st = sim.step(Plan.model_level(3, 64, 4))
    assert st.operators["attn"].replicas == 2 and st.operators["attn"].pending_replicas == 1
    assert st.gpus_in_use == 12  # loading GPUs are paid for
    while sim.now < load_s:
        st = sim.step(None)
    assert st.operators["attn"].replicas == 3 and st.operators["attn"].pending_replicas == 0
    assert sim.drain_gpu_seconds == 0.0  # nothing drained yet
    t_down = sim.now
    st = sim.step(Plan.model_level(1, 64, 4))
    assert st.operators["attn"].replicas == 1
    draining = sum(1 for u in sim.units if u.draining and not u.gone)
    assert draining >= 1
    drained_at = None
    while not sim.done and sim.now < 200:
        st = sim.step(None)
        if drained_at is None and sim.timeline.draining_units == 0:
            drained_at = sim.now
    assert drained_at is not None and st.gpus_in_use == 4
    # the draining instances' 4 GPUs each, paid from the scale-down until each is empty
    assert 0.0 < sim.drain_gpu_seconds <= draining * 4 * (drained_at - t_down)
    assert sim.summary()["drain_gpu_seconds"] == sim.drain_gpu_seconds < sim.gpu_seconds


def test_equal_serving_plans_are_one_object_shared_through_the_placer():
    """The timeline's serving plans come from ``Placer.plan_for``: equal contents give the same
    (immutable) Plan object, equal to one built directly, so identity caches downstream hit."""
    sc = Scenario()
    placer = Placer(sc, predictor_for(sc.model, sc.gpu))
    fields = ((2, 64, "model", 4),) * 5
    a = placer.plan_for(fields)
    assert a is placer.plan_for(tuple(fields)) and a == Plan.model_level(2, 64, 4)
    assert placer.plan_for(((3, 64, "model", 4),) * 5) == Plan.model_level(3, 64, 4)
    from envs.cluster import ClusterTimeline

    start = Plan.model_level(2, 64, 4)
    tl = ClusterTimeline(placer, start)
    served = tl.serving_plan(0.0)
    assert served == start and served is placer.plan_for(fields)
    # the layout comes with it (Placer.serving): the placement of that very plan
    assert tl.serving(0.0) == (served, placer.place(served)) and placer.serving(fields)[0] is served
    assert tl.next_ready(0.0) is None  # nothing loads (a span the timeline keeps until it changes)
    tl.apply(Plan.model_level(3, 64, 4), 10.0)
    load = placer.place(Plan.model_level(3, 64, 4)).load_s["attn"]
    assert tl.next_ready(10.0) == 10.0 + load  # the kept span was dropped with the change
    loading = tl.serving_plan(10.0)  # the third instance still loads: two serve
    assert loading is served
    done = tl.serving_plan(1e6)
    assert done == Plan.model_level(3, 64, 4) and done is placer.plan_for(((3, 64, "model", 4),) * 5)
    assert tl.next_ready(1e6) is None and tl.serving(1e6)[1] is placer.serving(((3, 64, "model", 4),) * 5)[1]
    # a second timeline on the same placer gets the same objects
    assert ClusterTimeline(placer, Plan.model_level(2, 64, 4)).serving_plan(5.0) is served


def test_switching_placement_is_blue_green_and_switching_back_cancels():
    sc = Scenario()
    from envs.cluster import ClusterTimeline

    placer = Placer(sc, predictor_for(sc.model, sc.gpu))
    base = Plan.model_level(2, 64, 4)
    tl = ClusterTimeline(placer, base)
    moved = base.with_op("mlp", placement="dedicated", tp=2)
    tl.apply(moved, now=0.0)
    load = placer.place(moved).load_s["mlp"]
    # until the dedicated MLP replicas are loaded the MLP inside the instances serves; the new
    # MLP GPUs are paid from the start, leaving the instances frees nothing
    assert tl.serving_plan(1.0)["mlp"].placement == "model"
    assert tl.gpus(1.0) == placer.place(moved).n_gpus == 8 + 2 * 2
    assert tl.serving_plan(load + 0.1)["mlp"].placement == "dedicated"
    # replacing the instances by pools: the old instances serve and are paid until the pools load
    pools = sc.disaggregated_plan({"embed": 1, "attn": 2, "proj": 1, "mlp": 2, "head": 1})
    tl3 = ClusterTimeline(placer, base)
    tl3.apply(pools, now=0.0)
    assert tl3.serving_plan(0.5)["attn"].placement == "model"
    assert tl3.gpus(0.5) == placer.place(pools).n_gpus + 8
    tl2 = ClusterTimeline(placer, base)
    tl2.apply(moved, now=0.0)
    tl2.apply(base, now=1.0)  # back to what still serves: no reload
    assert tl2.serving_plan(1.5) == tl2.target_plan and tl2.pending("mlp", 1.5) == 0


class WeightBoundDB(FakeDB):
    """A proj call costs 0.5 ms per layer, an MLP call 2 ms per layer whatever the tokens,
    plus 0.5 ms per token (all 80 layers): a small batch reads weights, a big chunk computes."""

    def group_latency(self, group, gpu, model, tokens, context=0, batch=1, tp=1, phase="decode"):
        if group in ("proj", "mlp"):
            return (40.0 if group == "proj" else 160.0) + 0.5 * tokens
        return super().group_latency(group, gpu, model, tokens, context, batch, tp, phase)


def weight_bound_step_model(**scenario) -> StepModel:
    """Two dedicated attention units and one replica per pool, timed by :class:`WeightBoundDB`."""
    pred = ExecutionPredictor(WeightBoundDB(), "llama-2-70b", "h100")
    plan = Scenario().disaggregated_plan({"embed": 1, "attn": 2, "proj": 1, "mlp": 1, "head": 1}, 8, "dedicated")
    sc = Scenario(**scenario)
    return StepModel(Placer(sc, pred).place(plan), pred, sc)


def test_adaptive_micro_batching_picks_the_faster_count_per_iteration():
    """A decode-only batch of a memory-bound pool runs whole (a half batch costs about as much
    as a whole one), a big prefill chunk is split so the pools overlap; the busy shares are
    those of the count chosen, so an unsplit decode reads each pool's weights once."""
    def model(mode: str, m: int) -> StepModel:
        return weight_bound_step_model(micro_batches=m, micro_batching=mode)

    adaptive, one, two = model("adaptive", 2), model("fixed", 1), model("fixed", 2)
    assert adaptive.m_choices == (1, 2) and one.m_choices == (1,) and two.m_choices == (2,)
    # decode, 8 sequences per unit, 2 units: one layer takes ~2.5 ms whole, 2 x 2 ms split
    dec = (8, 1000, 0, 0, 0, 16, 16)
    d1, d2, da = one.iteration(*dec), two.iteration(*dec), adaptive.iteration(*dec)
    assert d1.ms < d2.ms and (da.ms, da.busy) == (d1.ms, d1.busy)
    assert da.busy["mlp"] < d2.busy["mlp"]
    # prefill: a 1024-token chunk on each unit; the per-token cost dominates, splitting overlaps the pools
    pre = (0, 0, 1024, 1024, 1, 2048, 2)
    p1, p2, pa = one.iteration(*pre), two.iteration(*pre), adaptive.iteration(*pre)
    assert p2.ms < p1.ms and (pa.ms, pa.busy) == (p2.ms, p2.busy)


def test_micro_batch_slack_trades_a_bounded_slowdown_for_fewer_weight_reads():
    """With ``micro_batch_slack`` the engine runs the fewest micro-batches whose time is within
    (1 + slack) of the fastest: just above the prefill chunk's measured gain it runs the chunk
    whole (the one-micro-batch time and busy shares), just below it still splits."""
    model = weight_bound_step_model
    pre = (0, 0, 1024, 1024, 1, 2048, 2)
    p1 = model(micro_batches=1, micro_batching="fixed").iteration(*pre)
    p2 = model(micro_batches=2, micro_batching="fixed").iteration(*pre)
    gain = p1.ms / p2.ms - 1.0
    assert 0.0 < gain < 1.0
    above = model(micro_batch_slack=gain * 1.01).iteration(*pre)
    below = model(micro_batch_slack=gain * 0.99).iteration(*pre)
    assert (above.ms, above.busy) == (p1.ms, p1.busy)
    assert (below.ms, below.busy) == (p2.ms, p2.busy)
    assert above.busy["mlp"] < below.busy["mlp"]  # the whole chunk reads the MLP weights once
    # fixed micro-batching has one count to run: the slack changes nothing
    fixed = model(micro_batching="fixed", micro_batch_slack=0.5)
    assert fixed.slack == 0.0 and fixed.iteration(*pre).ms == p2.ms


def test_pool_dispatch_fill_puts_decodes_on_the_fewest_replicas_and_spreads_prompts():
    """Four MLP replicas of max_batch 8, two units of 8 decodes (16 sequences merged), one
    micro-batch. Spread: each replica takes 4 tokens (160 + 0.5 x 4 = 162 ms over the layers),
    all four busy for it. Fill: ceil(16 / 8) = 2 replicas take 8 tokens each (164 ms), the
    other two idle: the iteration is 2 ms longer and the MLP's busy time per replica halves
    (x 164 / 162). A call carrying prompt tokens is spread either way."""
    pred = ExecutionPredictor(WeightBoundDB(), "llama-2-70b", "h100")
    plan = Scenario().disaggregated_plan({"embed": 1, "attn": 2, "proj": 1, "mlp": 4, "head": 1}, 8, "dedicated")

    def model(dispatch: str) -> StepModel:
        sc = Scenario(micro_batches=1, pool_dispatch=dispatch)
        return StepModel(Placer(sc, pred).place(plan), pred, sc)

    spread, fill = model("spread"), model("fill")
    assert spread.signature != fill.signature  # memo tables never mix the two rules
    dec = (8, 1000, 0, 0, 0, 16, 16)
    s, f = spread.iteration(*dec), fill.iteration(*dec)
    assert f.ms - s.ms == pytest.approx(2.0)
    assert f.busy["mlp"] * f.ms == pytest.approx(0.5 * 164 / 162 * s.busy["mlp"] * s.ms)
    assert f.busy["proj"] * f.ms == pytest.approx(s.busy["proj"] * s.ms)  # one replica: nothing to fill
    pre = (0, 0, 1024, 1024, 1, 2048, 2)
    assert (fill.iteration(*pre).ms, fill.iteration(*pre).busy) == (spread.iteration(*pre).ms, spread.iteration(*pre).busy)


def test_scenario_rejects_an_unknown_pool_dispatch():
    from envs.scenario import ScenarioError

    with pytest.raises(ScenarioError, match="pool_dispatch.*round-robin"):
        Scenario(pool_dispatch="round-robin")


def test_scenario_rejects_a_micro_batch_slack_out_of_range():
    from envs.scenario import ScenarioError

    with pytest.raises(ScenarioError, match="micro_batch_slack.*1.5"):
        Scenario(micro_batch_slack=1.5)


def test_scenario_rejects_an_unknown_micro_batching_mode():
    from envs.scenario import ScenarioError

    with pytest.raises(ScenarioError, match="micro_batching.*'sometimes'"):
        Scenario(micro_batching="sometimes")
