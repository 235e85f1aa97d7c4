"""Co-residence of replica shards on GPUs: hand-computed tables, and what the simulator's power
model and step model make of replicas of one group packed onto one GPU."""
from __future__ import annotations

import numpy as np
import pytest

from envs import Scenario, make_simulator
from envs.world import Placer, StepModel
from runtime.colocation import co_residence, gpu_busy
from runtime.control import SLO
from tests.test_sim_world import fake_pred
from traces import Trace


def test_co_residence_counts_shards_of_the_same_group():
    # one GPU with 3 attention replicas; 2 GPUs each with an attention and an MLP shard;
    # one GPU with 2 projection replicas and an attention replica
    gpus = [(1, {"attn": 3}), (2, {"attn": 1, "mlp": 1}), (1, {"proj": 2, "attn": 1})]
    peers = co_residence(gpus)
    # attn has 6 shards: 3 x 2 attn co-residents, 2 x 1 mlp, 1 x 2 proj
    assert peers["attn"] == pytest.approx({"attn": 6 / 6, "mlp": 2 / 6, "proj": 2 / 6})
    assert peers["mlp"] == pytest.approx({"attn": 1.0})
    # each of the 2 proj shards: one other proj shard and one attention shard
    assert peers["proj"] == pytest.approx({"proj": 1.0, "attn": 1.0})


def test_a_process_alone_on_its_gpus_has_no_co_residents():
    assert co_residence([(4, {"model": 1}), (2, {"mlp": 1})]) == {"model": {}, "mlp": {}}


def test_gpu_busy_sums_every_shard():
    assert gpu_busy({"attn": 3}, {"attn": 0.3}) == pytest.approx(0.9)
    assert gpu_busy({"attn": 1, "mlp": 2}, {"attn": 0.2, "mlp": 0.25}) == pytest.approx(0.7)
    assert gpu_busy({"proj": 1}, {}) == 0.0


def _three_attention_replicas_on_one_gpu():
    sc = Scenario(interval_s=5.0, kv_reserve_tokens=16, contention=0.5)
    pred = fake_pred()
    plan = sc.disaggregated_plan({"embed": 1, "attn": 3, "proj": 1, "mlp": 1, "head": 1}, 8, "dedicated")
    for g in ("embed", "attn", "head"):
        plan = plan.with_op(g, placement="pack")
    return sc, pred, plan


def test_packed_replicas_of_one_group_slow_each_other():
    sc, pred, plan = _three_attention_replicas_on_one_gpu()
    layout = Placer(sc, pred).place(plan)
    shared = [c for c in layout.gpus if c.procs.get("attn", 0) == 3]
    assert len(shared) == 1 and shared[0].count == 1, layout.gpus
    # each attention shard sees the two others (plus embed and head on the same GPU)
    assert layout.peers["attn"]["attn"] == pytest.approx(2.0)
    sm = StepModel(layout, pred, sc)
    assert sm.contention("attn", {"attn": 0.4}) == pytest.approx(1.0 + 0.5 * 2 * 0.4)


def test_power_charges_every_packed_replica():
    sc, pred, plan = _three_attention_replicas_on_one_gpu()
    empty = Trace(np.array([]), np.array([], dtype=np.int64), np.array([], dtype=np.int64), name="empty",
                  duration_s=15.0)
    sim = make_simulator(sc, empty, fidelity="reference", slo=SLO(1.0, 1.0), pred=pred)
    sim.reset(plan)
    layout = sim.serving_layout(0.0)
    n = layout.n_gpus
    # busy shares as the step model would report them: each attention replica busy 0.2 of the time
    sim.account(10.0, {"attn": 0.2})
    # FakeDB power: 100 + 300 u per GPU; the shared GPU carries 3 x 0.2, the others idle
    assert sim.energy_j == pytest.approx(10.0 * (n * 100.0 + 300.0 * 3 * 0.2))
    # three shards busy 0.5 each: the GPU's load caps at 1 (full power), the others stay idle
    sim.account(15.0, {"attn": 0.5})
    assert sim.energy_j - 10.0 * (n * 100.0 + 300.0 * 3 * 0.2) == pytest.approx(5.0 * (n * 100.0 + 300.0))
