"""Session-3 speed work on the fast env: the table-driven StepModel.iteration must equal the
documented step formula bit for bit, its contention cache must follow the busy shares' values,
and the bench's training stream must send what train.py's envs receive."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from agents import training
from agents.envtools import load_scenario
from agents.wrappers import PlanRestriction
from envs import make_env
from envs.world import StepModel
from runtime.control import OperatorPlan, Plan
from runtime.models import OPERATOR_GROUPS

BENCH = Path(__file__).resolve().parents[1] / "bench"


def formula(sm: StepModel, n_dec, ctx_dec, p_tok, ctx_pre, n_pre, tot_tokens, tot_seqs, util):  # noqa: ANN001, ANN201
    """docs/SIMULATOR.md "Step model", written out stage by stage from the predictor's public calls."""
    p = sm.p
    tokens = n_dec + p_tok
    tot_tokens = max(tot_tokens, tokens)
    tot_seqs = max(tot_seqs, n_dec + n_pre)
    L = sm.layers

    def layers(m: int) -> tuple[float, dict[str, float]]:  # all layers cut into m micro-batches
        def group_time(g: str) -> tuple[float, float]:
            """(ms of group g, all layers, for one micro-batch; busy share per replica of it)"""
            if g == "attn":
                t = 0.0
                if n_dec > 0:
                    t += p.group_ms("attn", n_dec / m, ctx_dec, n_dec / m, sm.tp[g], "decode")
                if p_tok > 0:
                    t += p.group_ms("attn", p_tok / m, ctx_pre, max(n_pre / m, 1), sm.tp[g], "prefill")
                return t, 1.0
            if sm.site[g] == "local":
                return p.group_ms(g, tokens / m, tp=sm.tp[g]), 1.0
            r, mb = sm.replicas[g], sm.max_batch[g]
            k = r  # pool_dispatch fill: a decode-only call on the fewest replicas of max_batch sequences
            if sm.fill and tot_tokens <= tot_seqs and tot_seqs < r * mb:
                k = min(r, max(1, math.ceil(tot_seqs / mb)))
            calls = max(1.0, tot_seqs / k / mb)
            return p.group_ms(g, tot_tokens / k / calls / m, tp=sm.tp[g]) * calls, k / r

        busy: dict[str, float] = {}
        stage_ms = []
        for site, ops in sm.stages:
            proc = sm.local_proc if site == "local" else site
            times = [(frac * gt / L, share) for (gt, share), frac in ((group_time(g), frac) for g, frac in ops)]
            t = sum(x for x, _ in times) * sm.contention(proc, util)
            b = sum(x * share for x, share in times) * sm.contention(proc, util)
            stage_ms.append(t)
            busy[proc] = busy.get(proc, 0.0) + b * m * L
        if sm.hops:
            ring = stage_ms + [p.send_ms(tokens / m)] * sm.hops
            layer = max(m * max(ring), sum(ring))
        else:
            layer = sum(stage_ms)
        return L * layer, busy

    # the fastest allowed micro-batch count (the first of equals: fewer)
    total, busy = min((layers(m) for m in sm.m_choices), key=lambda r: r[0])
    for g in ("embed", "head"):
        tok = tokens if g == "embed" else n_dec + n_pre
        if sm.site[g] == "local":
            proc = sm.local_proc
            t = p.group_ms(g, tok, tp=sm.tp[g]) * sm.contention(proc, util)
        else:
            proc = sm.L.proc_of(g)
            load = tot_tokens if g == "embed" else tot_seqs
            t = p.group_ms(g, load / sm.replicas[g], tp=sm.tp[g]) * sm.contention(proc, util) + p.send_ms(tok)
        total += t
        busy[proc] = busy.get(proc, 0.0) + t
    ms = p.step_ms(total, n_dec, total * p_tok / tokens)
    return ms, {k: min(v / ms, 1.0) for k, v in busy.items()}


def _plans() -> dict[str, Plan]:
    def plan(**ops: tuple[int, int, str, int]) -> Plan:
        return Plan({g: OperatorPlan(*ops[g]) for g in OPERATOR_GROUPS})

    return {
        "whole model": Plan.model_level(6, 64, 4),
        "attention disaggregated": plan(embed=(1, 256, "model", 4), attn=(6, 64, "dedicated", 1),
                                        proj=(4, 256, "model", 4), mlp=(4, 256, "model", 4),
                                        head=(1, 256, "model", 4)),
        "packed pools": plan(embed=(1, 256, "pack", 1), attn=(8, 64, "pack", 1), proj=(3, 256, "pack", 1),
                             mlp=(6, 256, "pack", 2), head=(1, 256, "pack", 1)),
        "instance + dedicated mlp": plan(embed=(4, 64, "model", 4), attn=(4, 64, "model", 4),
                                         proj=(4, 64, "model", 4), mlp=(3, 128, "dedicated", 2),
                                         head=(4, 64, "model", 4)),
        "attention packed, rest dedicated": plan(embed=(1, 256, "pack", 1), attn=(5, 32, "pack", 1),
                                                 proj=(2, 256, "dedicated", 1), mlp=(3, 256, "dedicated", 2),
                                                 head=(2, 128, "dedicated", 1)),
    }


@pytest.fixture(scope="module")
def sim():  # noqa: ANN201
    env = make_env(seed=0)
    env.reset(seed=0)
    return env.sim


@pytest.mark.parametrize("name", list(_plans()))
def test_iteration_equals_the_step_formula_bit_for_bit(sim, name):  # noqa: ANN001
    layout = sim.placer.place(_plans()[name])
    rng = np.random.default_rng(11)
    procs = sorted(layout.proc_gpus)
    checked = 0
    for _ in range(150):
        sm = StepModel(layout, sim.pred, sim.sc)  # fresh: no slowdown cache carried between draws
        n_dec = float(rng.integers(0, 80)) + (0.5 if rng.random() < 0.3 else 0.0)
        p_tok = float(rng.choice([0, 1024, rng.integers(1, 1024)]))
        n_pre = float(rng.integers(0, 5)) if p_tok else 0.0
        if n_dec + p_tok <= 0:
            continue
        load = float(rng.integers(1, 8))
        util = {proc: float(rng.random()) for proc in procs} if rng.random() < 0.7 else {}
        args = (n_dec, float(rng.integers(1, 4096)), p_tok, float(rng.integers(1, 4096)), n_pre,
                (n_dec + p_tok) * load, (n_dec + n_pre) * load, util)
        got = sm.iteration(*args)
        ms, busy = formula(sm, *args)
        assert got.ms == ms, (name, args)
        assert got.busy == busy and list(got.busy) == list(busy), (name, args)
        checked += 1
    assert checked > 100
    assert sm.iteration(0, 100, 0, 0, 0, 0, 0).ms == 0.0  # no tokens: no iteration


def test_contention_cache_follows_the_busy_shares_not_the_dict(sim):  # noqa: ANN001
    layout = sim.placer.place(_plans()["packed pools"])
    assert any(layout.peers.values()), "the packed plan must co-locate processes"
    sm = StepModel(layout, sim.pred, sim.sc)
    args = (24.0, 1500.0, 512.0, 900.0, 1.0, 24.0 * 8 + 512, 25.0 * 8)
    util = {proc: 0.2 for proc in layout.proc_gpus}
    low = sm.iteration(*args, util)
    util.update({proc: 0.9 for proc in layout.proc_gpus})  # same dict object, new values
    high = sm.iteration(*args, util)
    assert high.ms > low.ms  # busier neighbours slow the unit down
    assert (high.ms, high.busy) == formula(StepModel(layout, sim.pred, sim.sc), *args, util)
    assert sm.iteration(*args, {proc: 0.2 for proc in layout.proc_gpus}).ms == low.ms
    assert sm.iteration(*args, None).ms == sm.iteration(*args, {}).ms < low.ms  # no busy shares: no slowdown


def test_placer_keeps_a_plan_that_fits_and_copies_a_repaired_one(sim):  # noqa: ANN001
    plan = _plans()["packed pools"]
    assert sim.placer._place(plan).plan is plan
    too_big = plan.with_op("mlp", tp=1, max_batch=4096)  # one TP1 MLP replica of 70B does not fit
    layout = sim.placer._place(too_big)
    assert layout.plan is not too_big and layout.plan["mlp"].tp > 1
    assert too_big["mlp"].tp == 1 and layout.repairs


def test_bench_train_stream_sends_what_train_py_envs_receive(monkeypatch):  # noqa: ANN001
    monkeypatch.syspath_prepend(str(BENCH))
    import env_speed

    mask = np.zeros(9, dtype=bool)
    mask[[1, 3, 4, 8]] = True  # allowed: sub-action 1 of the first 3, 0 or 1 of the next 3, 2 of the last 3
    rng = np.random.default_rng(0)
    draws = np.array([env_speed._masked_random(rng, mask, np.array([3, 3, 3])) for _ in range(200)])
    assert set(draws[:, 0]) == {1} and set(draws[:, 1]) == {0, 1} and set(draws[:, 2]) == {2}

    env = env_speed._train_env(seed=0)
    env.reset(seed=0)
    from agents.hyperparams import load_hyperparams

    first = Plan.from_dict(load_hyperparams().initial_plan)
    for _ in range(15):
        env.step(env_speed._masked_random(rng, env.action_masks(), env.action_space.nvec))
    target = env.unwrapped.sim.timeline.target_plan
    # only the replica sub-action varies: batch limits and placements stay as ppo.yaml sets them
    assert all((target[g].max_batch, target[g].placement) == (first[g].max_batch, first[g].placement)
               for g in OPERATOR_GROUPS)
    # and not for the groups ppo.yaml freezes (embed and head), on train.py's split and world:
    # the env agents.training builds for its rollouts, wrapper settings and all
    hp = load_hyperparams()
    assert hp.freeze_replicas and all(target[g].replicas == first[g].replicas for g in hp.freeze_replicas)
    restrict = {"initial_plan": hp.initial_plan, "freeze_layout": hp.freeze_layout,
                "freeze_replicas": list(hp.freeze_replicas), "fidelity": hp.fidelity,
                "rate_mults": list(hp.rate_mults)}
    ref = training._env_factory(hp.training_world(load_scenario()), hp.train_split, 0, None, restrict)()
    while not isinstance(ref, PlanRestriction):
        ref = ref.env
    assert (env.unwrapped.split, env.fixed_replicas, env.freeze_layout) == \
        (ref.unwrapped.split, ref.fixed_replicas, ref.freeze_layout)
    assert env.unwrapped.scenario == ref.unwrapped.scenario
    assert env.unwrapped.rate_mults == ref.unwrapped.rate_mults
    assert env_speed.env_rate("train", 10, warmup=5) > 0


def test_bench_learner_rate_is_positive(monkeypatch):  # noqa: ANN001
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", ["env_speed.py"])
    import env_speed

    assert env_speed.learner_rate(rollouts=1) > 0
