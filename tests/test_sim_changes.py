"""Plan changes in both fidelities: draining attention units, the load they leave on shared
pools, the utilisation they report, and the changing-plan check of envs.validate."""
from __future__ import annotations

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
    sc = Scenario.from_yaml()
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
    units drain for the whole interval)."""
    sc = Scenario.from_yaml()
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
