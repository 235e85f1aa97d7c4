"""The Gymnasium env: registration, checkers, action masks, info keys, splits and reward."""
from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest

from envs import ENV_ID, Scenario, ScenarioError, make_env, scenario_trace
from envs.env import OBS_HIGH
from runtime.codec import ObservationEncoder
from runtime.control import Plan

INFO_KEYS = {"slo_attainment", "gpus", "energy_j", "ttft_p99_s", "tbt_p99_s", "plan", "requests_finished",
             "requests_queued", "requests_rejected"}


def test_registered_and_passes_gymnasium_check_env():
    from gymnasium.utils.env_checker import check_env

    env = gymnasium.make(ENV_ID, episode_intervals=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checker warning either
        check_env(env.unwrapped, skip_render_check=True)


def test_passes_sb3_check_env():
    from stable_baselines3.common.env_checker import check_env

    check_env(make_env(episode_intervals=12), warn=True)


def test_observation_layout_is_the_codec_and_action_space_is_its_nvec():
    env = make_env()
    enc = ObservationEncoder(env.scenario.codec_config)
    obs, info = env.reset(seed=3)
    assert obs.shape == (enc.size,)
    np.testing.assert_allclose(obs, np.clip(enc.encode(env.state), 0, 100))
    np.testing.assert_array_equal(env.action_space.nvec, env.decoder.nvec)


def test_random_actions_never_crash_and_info_carries_raw_metrics():
    env = make_env(episode_intervals=30, seed=0)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        # out-of-range entries are clipped by the decoder, never a crash
        a = rng.integers(-2, 9, size=env.action_space.shape)
        obs, r, term, trunc, info = env.step(a)
        assert INFO_KEYS <= set(info)
        assert np.all(np.isfinite(obs)) and np.isfinite(r)
        assert info["gpus"] <= env.scenario.max_gpus
        assert 0.0 <= info["slo_attainment"] <= 1.0
        assert env.observation_space.contains(obs)
    assert trunc and not term


def test_action_masks_match_codec_and_block_leaving_replica_bounds():
    env = make_env()
    env.reset(seed=1)
    mask = env.action_masks()
    assert mask.shape == (int(env.decoder.nvec.sum()),) and mask.dtype == bool
    np.testing.assert_array_equal(mask, env.decoder.action_mask(env.sim.timeline.target_plan))


def test_tp_follows_placement_when_a_group_leaves_the_instance():
    env = make_env()
    env.reset(seed=1)
    a = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)
    a[3 * 3 + 2] = 1  # mlp -> dedicated
    env.step(a)
    plan = env.sim.timeline.target_plan
    assert plan["mlp"].placement == "dedicated" and plan["mlp"].tp == env.scenario.tp["mlp"]
    assert plan["attn"].placement == "model" and plan["attn"].tp == env.scenario.model_tp


def test_reward_is_the_documented_weighted_sum():
    env = make_env(w_slo=2.0, w_gpu=0.25, w_energy=0.5, w_miss=0.0)
    env.reset(seed=2)
    zero = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)
    _, r, _, _, info = env.step(zero)
    sc = env.scenario
    want = 2.0 * info["slo_attainment"] - 0.25 * info["gpus"] / sc.max_gpus \
        - 0.5 * info["energy_j"] / (sc.max_gpus * env.pred.gpu.peak_w * sc.interval_s)
    assert r == pytest.approx(want)


def test_reward_charges_the_shortfall_below_the_attainment_target():
    base = make_env(w_miss=0.0)
    miss = make_env(w_miss=3.0)
    rewards = []
    for env in (base, miss):
        env.reset(seed=4)
        keep = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)
        # sub-action 0 everywhere: the largest replica cuts, so that intervals miss the SLO
        worst = np.zeros(len(env.action_space.nvec), dtype=np.int64)
        rs, infos = [], []
        for _ in range(12):
            _, r, _, _, info = env.step(worst if len(rs) < 3 else keep)
            rs.append(r)
            infos.append(info)
        rewards.append((rs, infos))
    target = miss.scenario.attainment_target
    assert any(i["slo_attainment"] < target for i in rewards[1][1])  # the term was exercised
    for r0, r1, info in zip(rewards[0][0], rewards[1][0], rewards[1][1]):
        assert r1 == pytest.approx(r0 - 3.0 * max(0.0, target - info["slo_attainment"]))


def test_splits_are_disjoint_windows_in_time_order():
    """train [0, 55 %), val [55 %, 70 %), test [70 %, 100 %] of the trace; trainval = train + val."""
    sc = Scenario.from_yaml()
    whole = scenario_trace(sc, "all")
    parts = {s: scenario_trace(sc, s) for s in ("train", "val", "trainval", "test")}
    d = whole.duration_s
    assert parts["train"].duration_s == pytest.approx(0.55 * d)
    assert parts["val"].duration_s == pytest.approx(0.15 * d)
    assert parts["trainval"].duration_s == pytest.approx(0.70 * d)
    assert parts["test"].duration_s == pytest.approx(0.30 * d)
    # every request in exactly one of train / val / test, in time order
    assert len(parts["train"]) + len(parts["val"]) + len(parts["test"]) == len(whole)
    assert len(parts["train"]) + len(parts["val"]) == len(parts["trainval"])
    assert np.array_equal(np.concatenate([parts[s].prompt_tokens for s in ("train", "val", "test")]),
                          whole.prompt_tokens)
    assert parts["train"].arrival_s.max() < 0.55 * d
    assert parts["val"].arrival_s.max() < 0.15 * d          # re-based at its start
    env = make_env(split="test", seed=5)
    env.reset(seed=5)
    assert 0.0 <= env.window_start_s <= parts["test"].duration_s
    with pytest.raises(ValueError, match="split must be one of"):
        scenario_trace(sc, "validation")


def test_val_frac_is_checked():
    with pytest.raises(ScenarioError, match="val_frac"):
        Scenario(val_frac=0.7)
    with pytest.raises(ScenarioError, match="val_frac"):
        Scenario(val_frac=0.0)


def test_a_split_shorter_than_an_episode_is_one_episode():
    env = make_env(split="val", seed=0)
    assert env.trace.duration_s < env.episode_s
    env.reset(seed=0)
    assert env.window_start_s == 0.0
    steps, done = 0, False
    while not done:
        _, _, term, trunc, _ = env.step(np.zeros(len(env.decoder.nvec), dtype=np.int64) + 2)
        steps, done = steps + 1, term or trunc
    assert env.trace.duration_s / env.scenario.interval_s <= steps <= env.scenario.episode_intervals


def test_same_seed_same_episode():
    def run(seed):
        env = make_env(seed=seed, episode_intervals=10)
        env.reset(seed=seed)
        out = []
        for _ in range(10):
            out.append(env.step(np.zeros(len(env.decoder.nvec), dtype=np.int64) + 2)[1])
        return out

    assert run(7) == run(7)


def test_scenario_overrides_reach_the_env():
    env = gymnasium.make(ENV_ID, interval_s=2.0, slo_ttft_s=1.5, slo_tbt_s=0.3).unwrapped
    assert env.scenario.interval_s == 2.0
    assert (env.slo.ttft_s, env.slo.tbt_s) == (1.5, 0.3)
    with pytest.raises(Exception, match="unknown scenario fields"):
        make_env(not_a_field=1)


def test_fast_encoder_and_decoder_twins_equal_the_codec():
    from runtime.codec import ActionDecoder, ObservationEncoder

    env = make_env(seed=4, episode_intervals=40)
    env.reset(seed=4)
    enc = ObservationEncoder(env.scenario.codec_config)
    dec = ActionDecoder(env.scenario.codec_config)
    rng = np.random.default_rng(4)
    for _ in range(40):
        prev = env.sim.timeline.target_plan
        a = rng.integers(0, env.action_space.nvec)
        assert env._fast_decoder.decode(a, prev) == dec.decode(a, prev)
        assert env._fast_decoder.decode(a, prev) == dec.decode(a, prev)  # cached answer
        obs, *_ = env.step(a)
        np.testing.assert_allclose(env._fast_encoder.encode(env.state), enc.encode(env.state), rtol=1e-6,
                                   atol=1e-7)
        # what the env returns: the encoder's vector, NaN to 0 and clipped into the box, bit for bit
        want = np.clip(np.nan_to_num(env._fast_encoder.encode(env.state), nan=0.0), 0.0, OBS_HIGH)
        assert obs.dtype == np.float32 and obs.view(np.uint32).tolist() == want.view(np.uint32).tolist()
    # equal decoded plans are one object (the env's identity caches hit when a policy revisits one),
    # also when the previous plan is an equal copy rather than the same object
    prev = env.sim.timeline.target_plan
    twin = Plan({g: prev[g] for g in prev.ops})
    a = rng.integers(0, env.action_space.nvec)
    assert env._fast_decoder.decode(a, twin) is env._fast_decoder.decode(a, prev) == dec.decode(a, prev)


def test_observation_box_edges_as_numpy_clips_them():
    """The encoder's clip into [0, high] (per value, in Python) equals the env's former numpy
    calls, sign of zero included, at every edge: NaN, infinities, float32 overflow, values that
    float32 rounds to 0 or to ``high``, negatives."""
    from envs.obs import _in_box

    xs = [-0.0, 0.0, 5.0, -3.0, 150.0, float("nan"), float("inf"), float("-inf"), 3e39, -3e39, -1e-50, 1e-50,
          OBS_HIGH, 99.999999999, 100.0000001, -1e-45, 1e-45, 2e-45, -2e-45]
    with np.errstate(over="ignore"):  # (3e39 overflows float32: the env's former path made it inf)
        want = np.clip(np.nan_to_num(np.asarray(xs, dtype=np.float64).astype(np.float32), nan=0.0), 0.0, OBS_HIGH)
    got = np.asarray([x if 0.0 <= x < OBS_HIGH else _in_box(x, OBS_HIGH) for x in xs], dtype=np.float32)
    assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()


def test_reference_fidelity_env_passes_check_env_and_reports_the_same_keys():
    from gymnasium.utils.env_checker import check_env

    env = gymnasium.make(ENV_ID, fidelity="reference", episode_intervals=6, trace="azure-conv").unwrapped
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    _, _, _, _, info = env.step(env.action_space.sample())
    assert INFO_KEYS <= set(info) and env.sim.fidelity == "reference"


def test_rate_multiplier_replays_a_longer_window_compressed_into_the_episode():
    env = make_env(seed=3, rate_mults=(2.0,))
    _, info = env.reset(seed=3)
    assert info["rate_mult"] == 2.0
    start = info["window_start_s"]
    # 2 x episode_s seconds of the split, arrivals divided by 2: twice the recorded rate
    src = env.trace.window(start, start + 2 * env.episode_s)
    assert len(env.sim.trace) == len(src) > 0
    np.testing.assert_allclose(env.sim.trace.arrival_s, src.arrival_s / 2.0)
    assert env.sim.trace.duration_s == pytest.approx(env.episode_s)
    np.testing.assert_array_equal(env.sim.trace.prompt_tokens, src.prompt_tokens)


def test_rate_multipliers_are_drawn_per_episode_and_default_to_the_recorded_rate():
    mixed = make_env(seed=0, rate_mults=(1.0, 2.0))
    drawn = {mixed.reset()[1]["rate_mult"] for _ in range(12)}
    assert drawn == {1.0, 2.0}
    # default = one multiplier 1.0, and the same episodes as before the option existed
    a, b = make_env(seed=5), make_env(seed=5, rate_mults=(1.0,))
    oa, ia = a.reset(seed=5)
    ob, ib = b.reset(seed=5)
    assert ia["rate_mult"] == 1.0 and ia["window_start_s"] == ib["window_start_s"]
    np.testing.assert_array_equal(oa, ob)
    with pytest.raises(ValueError, match="rate_mults must be finite numbers > 0"):
        make_env(seed=0, rate_mults=(1.0, 0.0))


def test_scenario_file_extends_another_and_merges_codec(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("max_gpus: 40\nw_gpu: 2.0\ncodec:\n  replica_levels: [1, 2, 4]\n  max_replicas: 4\n")
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text("extends: ../base.yaml\nw_gpu: 0.0\ncodec:\n  max_gpus: 64\n")
    sc = Scenario.from_yaml(child)
    assert sc.max_gpus == 40 and sc.w_gpu == 0.0
    assert dict(sc.codec) == {"replica_levels": [1, 2, 4], "max_replicas": 4, "max_gpus": 64}
    assert sc.codec_config.max_gpus == 64 and sc.codec_config.replica_levels == (1, 2, 4)
    # the shipped budget scenario: the default one with only what it names changed
    shipped = Scenario.from_yaml(Path(__file__).resolve().parents[1] / "envs" / "configs" / "budget24.yaml")
    default, budget = Scenario.from_yaml().to_dict(), shipped.to_dict()
    assert {k for k in default if default[k] != budget[k]} == {"max_gpus", "w_gpu", "w_energy", "codec"}
    assert shipped.codec_config == Scenario.from_yaml().codec_config  # policies load in either


def test_scenario_extends_errors_name_the_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ScenarioError, match="cycle"):
        Scenario.from_yaml(a)
    c = tmp_path / "c.yaml"
    c.write_text("extends: missing.yaml\n")
    with pytest.raises(ScenarioError, match=r"missing\.yaml: no such scenario file \(extended by .*c\.yaml\)"):
        Scenario.from_yaml(c)
    c.write_text("extends: 3\n")
    with pytest.raises(ScenarioError, match="'extends' must name another scenario file"):
        Scenario.from_yaml(c)
