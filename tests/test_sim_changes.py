"""Plan changes in both fidelities: draining attention units, the load they leave on shared
pools, the utilisation they report, the KV hand-over of removed units (kv_migration), and the
changing-plan check of envs.validate."""
from __future__ import annotations

import math

import numpy as np
import pytest

from envs import Scenario, make_simulator
from traces import Trace


def steady_trace(n: int = 240, every_s: float = 0.25, prompt: int = 300, output: int = 200) -> Trace:
    return Trace(np.arange(n) * every_s, np.full(n, prompt), np.full(n, output), name="steady",
                 duration_s=n * every_s)


def packed(sc: Scenario, attn: int):
    return sc.disaggregated_plan({"embed": 1, "attn": attn, "proj": 3, "mlp": 6, "head": 1}, 64, "pack")


def test_first_step_scale_down_retires_the_empty_units_at_once():
    """Units of the initial plan exist from t=0: removing some in the first step frees their GPUs
    within the step (they hold no sequences) instead of paying for them for the whole run."""
    sc = Scenario.from_yaml()
    late = Trace(np.array([100.0]), np.array([100]), np.array([10]), name="late", duration_s=120.0)
    sim = make_simulator(sc, late, fidelity="reference")
    sim.reset(packed(sc, 8))
    state = sim.step(packed(sc, 4))
    assert sim.timeline.draining_units == 0
    assert state.gpus_in_use == sim.placer.place(packed(sc, 4)).n_gpus
    assert sum(1 for u in sim.units if not u.gone) == 4


def test_retired_units_no_longer_load_the_shared_pools():
    sc = Scenario.from_yaml(kv_migration=False)
    sim = make_simulator(sc, steady_trace(), fidelity="reference")
    sim.reset(packed(sc, 6))
    for _ in range(3):
        sim.step(None)
    sim.step(packed(sc, 2))           # four busy units drain
    for _ in range(6):
        sim.step(None)
    assert any(u.gone for u in sim.units)
    live = [u for u in sim.units if not u.gone]
    assert sim._tot_tokens == pytest.approx(sum(u.last_tokens for u in live))
    assert sim._tot_seqs == pytest.approx(sum(u.last_seqs for u in live))


def test_utilisation_averages_over_every_unit_that_iterated():
    """Draining units' iterations count in the busy sum, so they count among the units averaged
    over: a scale-down does not inflate the reported utilisation (long outputs: the six removed
    units drain for the whole interval; without the hand-over, which would empty them)."""
    sc = Scenario.from_yaml(kv_migration=False)
    utils = {}
    for name, second in (("kept", None), ("scale-down", packed(sc, 2))):
        sim = make_simulator(sc, steady_trace(60, 1.0, output=2000), fidelity="reference")
        sim.reset(packed(sc, 8))
        for _ in range(3):
            sim.step(None)
        state = sim.step(second)
        utils[name] = state.operators["attn"].utilisation
    assert 0.0 < utils["kept"] < 0.5
    # the same work is done in the interval (the drained sequences finish on their units)
    assert utils["scale-down"] == pytest.approx(utils["kept"], rel=0.3)


def test_random_walk_is_seeded_bounded_and_changes_at_the_given_rate():
    from envs.validate import WALK_BOUNDS, changes_per_interval, random_walk_plans

    sc = Scenario.from_yaml()
    a = random_walk_plans(sc, 400, seed=3)
    assert a == random_walk_plans(sc, 400, seed=3)
    assert a != random_walk_plans(sc, 400, seed=4)
    assert a[0] == packed(sc, 8)
    for p in a:
        for g, (lo, hi) in WALK_BOUNDS.items():
            assert lo <= p[g].replicas <= hi
            assert p[g].placement == "pack" and p[g].tp == sc.tp[g] and p[g].max_batch == 64
    # a move at a bound can be clipped to no change: slightly under p_change
    assert 0.35 <= changes_per_interval(a) <= 0.5
    assert changes_per_interval([a[0], a[0], packed(sc, 4), packed(sc, 4)]) == pytest.approx(1 / 3)


def test_run_sequence_drives_both_fidelities_with_the_same_plans():
    from envs.validate import markdown_changing, run_sequence

    sc = Scenario.from_yaml()
    plans = [packed(sc, 8), packed(sc, 4), packed(sc, 4), packed(sc, 6)]
    c = run_sequence(sc, steady_trace(80, 0.5), plans, "four plans")
    for out in (c.reference, c.fast):
        assert out["requests"] == 80
        assert 0.0 <= out["slo_attainment"] <= 1.0
        assert out["gpu_seconds"] > 0
    c.reference["changes"] = 2 / 3
    row = markdown_changing([c]).splitlines()[-1]
    assert row.startswith("| four plans | 0.67 | ")
    diff = c.fast["slo_attainment"] - c.reference["slo_attainment"]
    assert f"({diff:+.3f})" in row


def test_fast_scale_down_leaves_sequences_on_draining_units():
    """Without the hand-over, removed attention units keep their sequences (outside the serving
    units' batch slots and KV) until those finish, as in the reference; empty units are freed at once."""
    sc = Scenario.from_yaml(kv_migration=False)
    sim = make_simulator(sc, steady_trace(), fidelity="fast")
    sim.reset(packed(sc, 8))
    st = sim.step(packed(sc, 4))                    # first step: nothing runs yet, freed at once
    assert sim.timeline.draining_units == 0 and sim.d_n == 0.0
    assert st.gpus_in_use == sim.placer.place(packed(sc, 4)).n_gpus
    for _ in range(3):
        st = sim.step(None)
    running = sim.n_dec
    assert running > 10
    st = sim.step(packed(sc, 1))                    # three of four units drain
    assert sim.timeline.draining_units == 3 or sim.d_n == 0.0
    assert st.running_requests >= round(sim.n_dec + sim.n_pre)
    for _ in range(30):
        sim.step(None)
    assert sim.d_n == 0.0 and sim.d_units == 0.0
    assert sim.timeline.draining_units == 0


def test_fast_drain_share_is_hand_computable():
    sc = Scenario.from_yaml(kv_migration=False)
    sim = make_simulator(sc, steady_trace(), fidelity="fast")
    sim.reset(packed(sc, 4))
    for _ in range(3):
        sim.step(None)
    n_dec, U = sim.n_dec, sim._U
    assert U == 4.0
    sim.timeline.apply(packed(sc, 1), sim.now)
    sim._on_drain(3)
    assert sim.d_n == pytest.approx(0.75 * n_dec)
    assert sim.n_dec == pytest.approx(0.25 * n_dec)
    assert sim.d_units == 3


def test_fast_drain_time_is_drain_residual_times_the_p99_output_in_iterations():
    """Removed units give their GPUs back after drain_residual x the recent p99 output length
    decode iterations (steady trace: every output is 200 tokens)."""
    ends = {}
    for f in (1.0, 0.5):
        sc = Scenario.from_yaml(drain_residual=f, kv_migration=False)
        sim = make_simulator(sc, steady_trace(), fidelity="fast")
        sim.reset(packed(sc, 4))
        for _ in range(3):
            sim.step(None)
        sim.timeline.apply(packed(sc, 1), sim.now)
        sim._on_drain(3)
        (t_end, units), = sim.drain_until
        assert units == 3
        assert t_end == pytest.approx(sim.now + f * 200 * sim._last_T)
        ends[f] = t_end - sim.now
    assert ends[0.5] == pytest.approx(0.5 * ends[1.0])
    with pytest.raises(ValueError, match="'drain_residual' must be in \\(0, 1\\], got 1.5"):
        Scenario.from_yaml(drain_residual=1.5)


def test_fast_counts_a_bursts_misses_when_its_requests_finish():
    """A burst of long prompts onto one instance: most first tokens come late. The fast model
    charges the misses to the requests of the burst (not to whatever finishes in the burst's
    interval), so its attainment matches the reference's."""
    sc = Scenario.from_yaml()
    n = 60
    burst = Trace(np.linspace(0.0, 2.0, n), np.full(n, 3000), np.full(n, 50), name="burst", duration_s=30.0)
    out = {}
    for fid in ("reference", "fast"):
        sim = make_simulator(sc, burst, fidelity=fid)
        sim.reset(sc.initial_plan().model_level(1, 64, 4))
        while not sim.done:
            sim.step(None)
        out[fid] = sim.summary()["slo_attainment"]
    assert out["reference"] < 0.5
    assert out["fast"] == pytest.approx(out["reference"], abs=0.1)


def test_changing_plan_check_random_walk_within_targets():
    """The issue's target on the changing-plan check, on its random-walk stream (test split):
    the median error over four seeds of the walk (since session 16: with the KV hand-over, seed
    0's run-level TBT p99 is +25 %, because one interval just past half mixed gaps moves its
    fitted median from the decode-only to the mixed iteration time; seeds 1-3 are within 10 %,
    docs/SIMULATOR.md). Attainment and GPU-seconds hold on every seed."""
    from envs import scenario_trace
    from envs.validate import CHANGING_TARGETS, random_walk_plans, run_sequence

    sc = Scenario.from_yaml()
    tr = scenario_trace(sc, "test")
    cells = [run_sequence(sc, tr, random_walk_plans(sc, 250, seed=seed), "walk") for seed in range(4)]
    for c in cells:
        assert abs(c.fast["slo_attainment"] - c.reference["slo_attainment"]) <= CHANGING_TARGETS["slo_attainment"]
        assert abs(c.error("gpu_seconds")) <= 0.05
    for m in ("ttft_p99_s", "tbt_p99_s"):
        errors = [c.error(m) for c in cells]
        assert abs(float(np.median(errors))) <= CHANGING_TARGETS[m], (m, errors)


# ---- the KV hand-over of removed attention units (kv_migration, session 16) --------------

def _warmed(sc: Scenario, fidelity: str, attn: int, trace: Trace | None = None, steps: int = 3):
    """A simulator started on ``packed(sc, attn)`` that has served ``steps`` intervals."""
    sim = make_simulator(sc, trace or steady_trace(), fidelity=fidelity)
    sim.reset(packed(sc, attn))
    for _ in range(steps):
        sim.step(None)
    return sim


def _scale_down_run(sc: Scenario, trace: Trace, before: int, after: int):
    sim = _warmed(sc, "reference", before, trace)
    running = sum(u.seqs for u in sim.units if not u.gone)
    sim.step(packed(sc, after))
    return sim, running


def test_reference_hand_over_frees_removed_units_and_loses_no_token():
    """6 -> 2 attention units under light load: the survivors have room, so every sequence moves
    at the removed units' next iteration boundary and they free their GPUs then (each paid for
    at most one iteration), where without the hand-over they drain and are paid for until their
    last sequence ends; either way every request finishes with exactly its output tokens."""
    out = {}
    for mig in (True, False):
        sc = Scenario.from_yaml(kv_migration=mig)
        sim, running = _scale_down_run(sc, steady_trace(), 6, 2)
        assert running > 10
        target = sim.placer.place(packed(sc, 2)).n_gpus
        out[mig] = (sim.timeline.draining_units, sim.drain_gpu_seconds, sim.timeline.gpus(sim.now) - target)
        while not sim.done:
            sim.step(None)
        t = sim.request_table()
        assert (t["state"] == 3).all()
        assert (t["generated"] == sim.output).all()
        assert sim.summary()["finished"] == len(sim.output)
    assert out[True][0] == 0 and out[True][2] == 0
    assert 0.0 <= out[True][1] < 4 * 0.2          # four units, under one iteration each
    assert out[False][0] > 0 and out[False][2] > 0
    assert out[False][1] > 20 * out[True][1]


def test_reference_hand_over_respects_batch_slots():
    """Every slot full (arrivals well beyond 4 units of batch 2): the survivor has no free slot, so
    the removed units keep their sequences and drain, and no unit ever holds more than max_batch;
    every request ends done with all its tokens or rejected with a reason (the queue overflows)."""
    sc = Scenario.from_yaml(kv_migration=True)
    tiny = lambda n: sc.disaggregated_plan({"embed": 1, "attn": n, "proj": 3, "mlp": 6, "head": 1}, 2, "pack")  # noqa: E731
    sim = make_simulator(sc, steady_trace(200, 0.1, output=400), fidelity="reference")
    sim.reset(tiny(4))
    for _ in range(2):
        sim.step(None)
    assert all(u.seqs == 2 for u in sim.units if not u.gone)
    sim.step(tiny(1))
    assert sim.timeline.draining_units == 3
    assert all(u.seqs <= 2 for u in sim.units if not u.gone)
    while not sim.done:
        sim.step(None)
        assert all(u.seqs <= 2 for u in sim.units if not u.gone)
    t = sim.request_table()
    done, rejected = t["state"] == 3, t["state"] == 4
    assert (done | rejected).all() and done.sum() > 10
    assert (t["generated"][done] == sim.output[done]).all()
    assert (t["reason"][rejected] > 0).all()


def test_reference_hand_over_records_the_copy_and_wait_as_one_gap():
    sc = Scenario.from_yaml(kv_migration=True)
    sim, running = _scale_down_run(sc, steady_trace(), 6, 2)
    moved = [g for (t, g) in sim.gap_log if sim.now - sc.interval_s <= t < sim.now]
    assert moved, "the moved decoding sequences record their wait"
    # a KV copy of a few hundred tokens plus at most one iteration of the target in flight
    assert all(sim.pred.kv_send_ms(300, 1) / 1e3 <= g <= 0.5 for g in moved)


def test_fast_hand_over_is_hand_computable():
    """4 -> 1 units: the survivor's free slots and KV bound what moves; the rest drains on the
    fewest removed units that can hold it."""
    sc = Scenario.from_yaml(kv_migration=True)
    sim = _warmed(sc, "fast", 4)
    n_dec, n_pre, kv = sim.n_dec, sim.n_pre, sim.kv
    c = sim.r_prompt + 0.5 * sim.r_output
    sim.timeline.apply(packed(sc, 1), sim.now)
    lay = sim.serving_layout(sim.now)
    # what fits on the one survivor (batch 64, KV of its slots)
    room = min(64 - (0.25 * n_dec + n_pre), (lay.unit_kv_tokens - (kv - 0.75 * n_dec * c)) / (c + 1.0))
    sim._on_drain(3)
    left = 0.75 * n_dec - min(max(room, 0.0), 0.75 * n_dec)
    assert sim.d_n == pytest.approx(left if left >= 0.5 else 0.0)
    assert sim.n_dec == pytest.approx(n_dec - sim.d_n)
    if left >= 0.5:
        assert sim.d_units == math.ceil(3 * left / (0.75 * n_dec) - 1e-9)
    assert sim.timeline.draining_units == sim.d_units


def test_fast_hand_over_with_room_frees_every_removed_unit():
    sc = Scenario.from_yaml(kv_migration=True)
    sim = _warmed(sc, "fast", 8)
    n_dec = sim.n_dec
    assert n_dec > 10
    st = sim.step(packed(sc, 4))
    assert sim.d_n == 0.0 and sim.timeline.draining_units == 0
    assert st.gpus_in_use == sim.placer.place(packed(sc, 4)).n_gpus
    assert sim.n_dec + sim.n_pre > 0.5 * n_dec  # the moved sequences kept running


def test_kv_migration_must_be_a_bool():
    with pytest.raises(ValueError, match="'kv_migration' must be true or false, got 'yes'"):
        Scenario.from_yaml(kv_migration="yes")


def test_fast_placement_switch_hands_sequences_to_the_new_units():
    """Attention pack -> dedicated (a blue/green switch): when the new units take over, the old
    ones hand them what fits (everything, under this light load); without the hand-over every
    old unit drains with all its decoding sequences."""
    out = {}
    for mig in (True, False):
        sc = Scenario.from_yaml(kv_migration=mig)
        sim = _warmed(sc, "fast", 4)
        before = sim.n_dec
        sim.step(sc.disaggregated_plan({"embed": 1, "attn": 4, "proj": 3, "mlp": 6, "head": 1}, 64, "pack")
                 .with_op("attn", placement="dedicated"))
        sim.step(None)
        out[mig] = (before, sim.d_n, sim.d_units, sim.n_dec)
    before, d_n, d_units, n_dec = out[True]
    assert before > 10 and d_n == 0.0 and d_units == 0.0 and n_dec > 0.5 * before
    assert out[False][1] > 0.0 and out[False][2] == 4.0


def test_cached_serving_plans_equal_a_fresh_computation_at_any_query_time():
    """The timeline caches each serving plan for the span between the loads or switches completed
    before and after the query (session 21); queried out of order (accounting catches up from the
    last accounted time), between plan changes and placement switches, it must always answer
    what the replicas serving at that time are."""
    from envs.cluster import ClusterTimeline
    from runtime.control import OperatorPlan, Plan
    from runtime.models import OPERATOR_GROUPS

    sim = make_simulator(Scenario.from_yaml(), fidelity="fast")
    rng = np.random.default_rng(3)
    base = Scenario.from_yaml().initial_plan()
    tl = ClusterTimeline(sim.placer, base)
    now = 0.0
    checked = 0
    for _ in range(60):
        now += float(rng.uniform(0.5, 20.0))
        tl.advance(now)
        if rng.random() < 0.5:
            ops = {g: OperatorPlan(int(rng.integers(1, 12)), base[g].max_batch,
                                   str(rng.choice(["pack", "pack", "dedicated"])), base[g].tp)
                   for g in OPERATOR_GROUPS}
            tl.apply(Plan(ops), now)
        for t in sorted(rng.uniform(now - 30.0, now + 60.0, 6), key=lambda _: rng.random()):
            t = max(float(t), 0.0)
            fresh = Plan({g: tl.serving_op(g, t) for g in OPERATOR_GROUPS})
            assert tl.serving_plan(t) == fresh, (now, t)
            checked += 1
    assert checked == 360
