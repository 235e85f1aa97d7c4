"""Controllers drive the live engine through observe() -> decide() -> apply()."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from runtime.codec import ObservationEncoder
from runtime.control import ClusterState, Controller, Plan
from runtime.controllers import ControlLoop, make_controller, measure_latency
from runtime.engine import Engine
from runtime.model import build_model, generate_split
from runtime.models import OPERATOR_GROUPS, get_model

TINY = get_model("tiny")


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, dtype=torch.float64, seed=3)


@pytest.fixture
def engine(model):
    eng = Engine(model, Plan.model_level(1, 8, 1)).start()
    yield eng
    eng.stop()


class ScaleMlpOnSecondCall(Controller):
    """Test double: keeps the plan, then asks for 3 mlp replicas and dedicated attention."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls = 0
        self.states: list[ClusterState] = []

    def decide(self, state: ClusterState) -> Plan:
        self.calls += 1
        self.states.append(state)
        if self.calls < 2:
            return state.plan
        return state.plan.with_op("mlp", replicas=3, placement="pack").with_op("attn", placement="dedicated")


class Broken(Controller):
    name = "broken"

    def decide(self, state: ClusterState) -> Plan:
        raise RuntimeError("policy exploded")


def test_make_controller_errors_name_the_choices(engine):
    with pytest.raises(ValueError, match="unknown controller 'magic'; choose one of static, model-level"):
        make_controller("magic", engine)
    with pytest.raises(ValueError, match="needs --checkpoint"):
        make_controller("ppo", engine)


def test_control_loop_applies_decisions_while_serving(engine, model):
    ps = [[(i * 7 + j) % 256 for j in range(4 + i % 5)] for i in range(16)]
    refs = [generate_split(model, p, 10) for p in ps]
    ctrl = ScaleMlpOnSecondCall()
    loop = ControlLoop(engine, ctrl, interval_s=0.05).start()
    try:
        seqs = [engine.submit(p, 10) for p in ps]
        for s in seqs:
            assert s.finished.wait(30)
        deadline = time.perf_counter() + 10
        while ctrl.calls < 3 and time.perf_counter() < deadline:
            time.sleep(0.01)
    finally:
        loop.stop()
    assert [s.generated for s in seqs] == refs
    assert engine.plan["mlp"].replicas == 3 and engine.plan["attn"].placement == "dedicated"
    engine.wait_ready(30)
    assert len(engine.replicas["mlp"]) == 3
    # the controller saw ClusterStates the shared encoder accepts
    enc = ObservationEncoder()
    for st in ctrl.states:
        v = enc.encode(st)
        assert v.shape == (enc.size,) and np.isfinite(v).all()
    assert any(st.operators["mlp"].arrival_rate > 0 for st in ctrl.states)
    assert all(d.error is None for d in loop.history)


def test_control_loop_survives_a_raising_controller(engine):
    before = engine.plan
    loop = ControlLoop(engine, Broken(), interval_s=0.05)
    d = loop.step()
    assert d.error == "RuntimeError: policy exploded" and d.plan == before
    assert engine.generate([1, 2, 3], 3) == engine.generate([1, 2, 3], 3)


def test_measured_latency_grows_with_tokens(engine):
    lat = measure_latency(engine, tokens=(1, 64), contexts=(16, 256), repeats=3)
    for g in OPERATOR_GROUPS:
        assert lat.group_s(g, 64, 128, 64, 1, "decode") >= lat.group_s(g, 1, 128, 1, 1, "decode") >= 0
    assert lat.per_token_ms["mlp"] > 0


@pytest.mark.parametrize("name", ["static", "model-level", "operator-queueing"])
def test_named_controllers_return_plans_on_live_state(engine, name):
    ctrl = make_controller(name, engine, interval_s=0.1)
    loop = ControlLoop(engine, ctrl, interval_s=0.1)
    ctrl.reset(engine.observe())
    for s in [engine.submit([5, 6, 7, 8], 6) for _ in range(6)]:
        s.finished.wait(30)
    d = loop.step()
    assert d.error is None
    assert set(d.plan.ops) == set(OPERATOR_GROUPS)
    assert all(1 <= d.plan[g].replicas <= engine.config.max_replicas for g in OPERATOR_GROUPS)
    assert engine.plan == d.plan
    if name == "static":
        assert d.plan == Plan.model_level(1, 8, 1)


def _tiny_checkpoint(folder):
    envs = pytest.importorskip("envs")
    if not hasattr(envs, "make_env"):
        pytest.skip("envs.make_env is not available yet: cannot train a PPO checkpoint in the simulator")
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from agents.envtools import load_scenario, make_env
    from agents.training import save_checkpoint

    sc = load_scenario()
    venv = VecNormalize(DummyVecEnv([lambda: make_env(sc, split="train", seed=0)]))
    ppo = PPO("MlpPolicy", venv, n_steps=8, batch_size=8, n_epochs=1, seed=0, device="cpu", verbose=0)
    ppo.learn(total_timesteps=16)
    save_checkpoint(ppo, venv, folder, sc, "PPO", {"timesteps": 16})
    return folder


def test_ppo_checkpoint_drives_the_control_loop(engine, model, tmp_path):
    folder = _tiny_checkpoint(tmp_path / "ppo")
    ctrl = make_controller("ppo", engine, checkpoint=str(folder))
    loop = ControlLoop(engine, ctrl, interval_s=0.1)
    ctrl.reset(engine.observe())
    ps = [[(3 * i + j) % 256 for j in range(5)] for i in range(8)]
    refs = [generate_split(model, p, 8) for p in ps]
    seqs = [engine.submit(p, 8) for p in ps]
    decisions = []
    while not all(s.finished.is_set() for s in seqs):
        decisions.append(loop.step())
        time.sleep(0.05)
    decisions.append(loop.step())
    assert all(d.error is None for d in decisions)
    assert [s.generated for s in seqs] == refs
    # what the policy asked for (clipped to the runtime's replica bound) is what is in force
    want = ctrl.decide(decisions[-1].state)
    for g in OPERATOR_GROUPS:
        assert engine.plan[g].max_batch == want[g].max_batch
        assert engine.plan[g].placement == want[g].placement
        assert engine.plan[g].replicas == min(want[g].replicas, engine.config.max_replicas)


def test_fixed_budget_mode_fills_the_live_engine(model):
    """A static controller in fixed-budget mode tops a 1-slot packed plan up to 3 slots, and the
    engine serves on them with unchanged outputs; a budget below the plan shrinks it."""
    from runtime.controllers import slot_count, with_budget

    plan = Plan.from_dict({g: {"replicas": 1, "max_batch": 8, "placement": "pack", "tp": 1} for g in OPERATOR_GROUPS})
    eng = Engine(model, plan).start()
    try:
        ref = eng.generate([3, 1, 4, 1, 5], 6)
        assert slot_count(plan) == 1
        loop = ControlLoop(eng, with_budget(make_controller("static", eng), eng, 3, "proportional"), interval_s=0.1)
        d = loop.step()
        assert d.error is None
        assert {g: d.plan[g].replicas for g in OPERATOR_GROUPS} == {g: 3 for g in OPERATOR_GROUPS}
        eng.wait_ready(30)
        assert slot_count(eng.plan) == 3 and eng.observe().gpus_in_use == 3
        assert eng.generate([3, 1, 4, 1, 5], 6) == ref
        # the utilisation rule gives spare slots only to groups that were busy, never past the budget
        busy = with_budget(make_controller("static", eng), eng, 4)
        d = ControlLoop(eng, busy, interval_s=0.1).step()
        assert d.error is None and slot_count(d.plan) <= 4
        # a plan over the budget is shrunk to it (the live engine has no budget of its own)
        small = with_budget(make_controller("static", eng), eng, 2, "proportional")
        d = ControlLoop(eng, small, interval_s=0.1).step()
        assert d.error is None and slot_count(d.plan) == 2 and slot_count(eng.plan) == 2
    finally:
        eng.stop()
