"""bench/drain_share.py: both drain accountings on a scale-down the test can follow."""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.drain_share import packed_drain_gpus, replay  # noqa: E402
from envs import Scenario, make_simulator  # noqa: E402
from runtime.control import Plan  # noqa: E402
from traces import Trace  # noqa: E402


class Scripted:
    """Plans by interval index: 8 packed attention replicas, then 1 from the fourth interval."""

    def __init__(self, sc: Scenario) -> None:
        self.plans = [sc.disaggregated_plan({"embed": 1, "attn": a, "proj": 3, "mlp": 6, "head": 1}, 64, "pack")
                      for a in (8, 1)]
        self.k = 0

    def reset(self, state) -> None:
        self.k = 0

    def decide(self, state) -> Plan:
        self.k += 1
        return self.plans[0 if self.k < 4 else 1]


def test_packing_the_draining_units_never_costs_more_than_charging_each_its_gpus():
    sc = Scenario.from_yaml()
    n = 240
    trace = Trace(np.arange(n) * 0.25, np.full(n, 300), np.full(n, 400), name="steady", duration_s=n * 0.25)
    sim = make_simulator(sc, trace, fidelity="reference")
    ctl = Scripted(sc)
    r = replay(sim, ctl, ctl.plans[0])
    # the scale-down to one replica leaves units draining; each is charged its GPU until empty
    assert r["drain_charged_s"] > 0.0 and r["drain_charged_s"] == sim.drain_gpu_seconds
    assert 0.0 <= r["drain_packed_s"] <= r["drain_charged_s"]
    # the packed price of d draining replicas is what the target plan with d more replicas adds
    layout = sim.placer.place(ctl.plans[1])
    for d in (0, 1, 3, 7):
        more = sim.placer.place(ctl.plans[1].with_op("attn", replicas=1 + d)).n_gpus - layout.n_gpus
        assert packed_drain_gpus(sim, layout, d) == max(more, 0) <= d * layout.unit_tp
    # whole-model instances have nothing to pack: each draining instance keeps its tp GPUs
    whole = sim.placer.place(Plan.model_level(2, 64, 4))
    assert packed_drain_gpus(sim, whole, 3) == 12
