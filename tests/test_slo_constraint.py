"""The Lagrangian SLO constraint: the env's SLO weight, the multiplier update, the training wiring."""
from __future__ import annotations

import numpy as np
import pytest

from agents.callbacks import SLOConstraintCallback
from agents.hyperparams import PPOHyperparams, SLOConstraintConfig, load_hyperparams
from envs import make_env


def _worst_then_keep(env, n: int = 10) -> list[tuple[float, dict]]:
    env.reset(seed=4)
    keep = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)
    worst = np.zeros(len(env.action_space.nvec), dtype=np.int64)  # largest replica cuts: intervals miss
    out = []
    for i in range(n):
        _, r, _, _, info = env.step(worst if i < 3 else keep)
        out.append((r, info))
    return out


def test_slo_weight_scales_only_the_slo_terms():
    base = _worst_then_keep(make_env(w_miss=3.0))
    env = make_env(w_miss=3.0)
    env.set_slo_weight(2.5)
    scaled = _worst_then_keep(env)
    sc = env.scenario
    assert any(info["slo_attainment"] < sc.attainment_target for _, info in scaled)  # shortfall exercised
    for (r0, i0), (r1, i1) in zip(base, scaled):
        assert i0["slo_attainment"] == i1["slo_attainment"] and i0["gpus"] == i1["gpus"]
        slo = sc.w_slo * i1["slo_attainment"] - 3.0 * max(0.0, sc.attainment_target - i1["slo_attainment"])
        assert r1 == pytest.approx(r0 + 1.5 * slo)


def test_slo_weight_must_be_a_finite_non_negative_number():
    env = make_env()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="slo_weight must be a finite number >= 0"):
            env.set_slo_weight(bad)


def test_multiplier_update_hand_computed():
    cb = SLOConstraintCallback(target=0.98, lr=5.0, init=1.0, min_weight=1.0, max_weight=2.0, max_step=0.25)
    assert cb.update(0.96) == pytest.approx(1.1)        # 5 x (0.98 - 0.96)
    assert cb.update(0.50) == pytest.approx(1.35)       # step clipped to 0.25
    assert cb.update(1.00) == pytest.approx(1.25)       # above target: 5 x -0.02
    for _ in range(10):
        cb.update(0.0)
    assert cb.weight == pytest.approx(2.0)              # bounded above
    for _ in range(20):
        cb.update(1.0)
    assert cb.weight == pytest.approx(1.0)              # and below


def test_bad_constraint_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="target must be in"):
        SLOConstraintCallback(target=1.5)
    with pytest.raises(ValueError, match="min_weight <= init <= max_weight"):
        SLOConstraintCallback(target=0.9, init=0.5, min_weight=1.0)
    with pytest.raises(ValueError, match=r"slo_constraint: unknown keys \['tgt'\]"):
        PPOHyperparams(slo_constraint={"tgt": 0.9})
    assert PPOHyperparams(slo_constraint={"target": 0.97}).slo_constraint == SLOConstraintConfig(target=0.97)
    assert PPOHyperparams().slo_constraint.target is None  # off unless configured
    bad = tmp_path / "ppo.yaml"
    bad.write_text("opscale/OperatorScaling-v0:\n  slo_constraint: {target: 0.97, lrate: 1.0}\n")
    with pytest.raises(ValueError, match=r"ppo.yaml: block 'opscale/OperatorScaling-v0': slo_constraint: "
                                         r"unknown keys \['lrate'\]"):
        load_hyperparams(bad)


def test_callback_drives_the_training_envs_weight():
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv([lambda: make_env(episode_intervals=16)])
    model = MaskablePPO("MlpPolicy", venv, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
    # an unreachable target: every rollout falls short, so the weight climbs by lr x shortfall
    cb = SLOConstraintCallback(target=1.0, lr=50.0, max_weight=3.0, max_step=0.25)
    model.learn(total_timesteps=96, callback=cb)
    assert len(cb.history) == 3
    w = 1.0
    for att, after in cb.history:
        assert 0.0 <= att < 1.0
        w = min(w + min(50.0 * (1.0 - att), 0.25), 3.0)
        assert after == pytest.approx(w)
    assert venv.envs[0].unwrapped.slo_weight == pytest.approx(cb.weight)


def test_no_update_before_the_warmup_ends():
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv([lambda: make_env(episode_intervals=16)])
    model = MaskablePPO("MlpPolicy", venv, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
    cb = SLOConstraintCallback(target=1.0, lr=50.0, max_weight=3.0, max_step=0.25, warmup_steps=64)
    model.learn(total_timesteps=96, callback=cb)
    # rollouts end at 32, 64 and 96 steps: the first falls inside the warm-up
    assert len(cb.history) == 2 and cb.weight == pytest.approx(1.5)
    assert venv.envs[0].unwrapped.slo_weight == pytest.approx(1.5)


def test_training_split_and_selection_settings_are_checked():
    assert (PPOHyperparams().train_split, PPOHyperparams().select) == ("train", "best")
    assert PPOHyperparams(train_split="trainval", select="final").train_split == "trainval"
    with pytest.raises(ValueError, match="train_split must be train or trainval, got 'test'"):
        PPOHyperparams(train_split="test")
    with pytest.raises(ValueError, match="select must be best or final, got 'last'"):
        PPOHyperparams(select="last")
    with pytest.raises(ValueError, match="chosen on training data: use select: final"):
        PPOHyperparams(train_split="trainval", select="best")
    default = load_hyperparams()
    choice = load_hyperparams("agents/configs/ppo-valselect.yaml")
    assert (default.train_split, default.select) == ("trainval", "final")
    assert (choice.train_split, choice.select) == ("train", "best")
    # the choice stage is the default recipe otherwise
    choice.train_split, choice.select = default.train_split, default.select
    assert choice == default


def test_scenario_overrides_give_the_training_world_and_name_bad_fields():
    from envs import Scenario

    sc = Scenario.from_yaml()
    assert sc.kv_migration is True and sc.pool_dispatch == "fill"
    hp = load_hyperparams()
    world = hp.training_world(sc)
    assert world.kv_migration is False and world.pool_dispatch == "spread"  # ppo.yaml trains with drains charged
    assert world.replace(kv_migration=True, pool_dispatch="fill") == sc     # and changes nothing else
    assert PPOHyperparams().training_world(sc) is sc
    with pytest.raises(ValueError, match=r"unknown scenario fields \['kv_migraton'\]"):
        PPOHyperparams(scenario_overrides={"kv_migraton": False}).training_world(sc)
    with pytest.raises(ValueError, match="scenario_overrides must map scenario fields to values"):
        PPOHyperparams(scenario_overrides=[1])
