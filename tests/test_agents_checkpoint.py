"""Checkpoint folders: a saved policy loads and acts through the shared codec; other specs are refused."""
import json

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from agents.checkpoint import CheckpointError, ObsNormaliser, load_checkpoint, load_normaliser, write_metadata
from agents.ppo import PPOController
from runtime.codec import SPEC_VERSION, ActionDecoder, CodecConfig, ObservationEncoder
from runtime.control import SLO, ClusterState, OperatorState, Plan
from runtime.models import OPERATOR_GROUPS

CODEC = CodecConfig(max_gpus=32)


class CodecShapedEnv(gym.Env):
    """An env with the codec's spaces and random observations (only the shapes matter here)."""

    def __init__(self, codec: CodecConfig = CODEC) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (ObservationEncoder(codec).size,), np.float32)
        self.action_space = gym.spaces.MultiDiscrete(ActionDecoder(codec).nvec)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self.np_random.normal(size=self.observation_space.shape).astype(np.float32) + 3.0, {}

    def step(self, action):
        self._t += 1
        obs = self.np_random.normal(size=self.observation_space.shape).astype(np.float32) + 3.0
        return obs, 0.0, False, self._t >= 16, {}


def cluster_state(plan: Plan) -> ClusterState:
    ops = {g: OperatorState(plan[g].replicas, plan[g].max_batch, plan[g].placement, plan[g].tp)
           for g in OPERATOR_GROUPS}
    return ClusterState(10.0, 5.0, ops, SLO(1.0, 0.1), plan, request_rate_history=np.full(8, 4.0),
                        gpus_in_use=16, running_requests=40)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    venv = VecNormalize(DummyVecEnv([CodecShapedEnv]), norm_reward=False)
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(64)
    model.save(folder / "policy.zip")
    venv.save(str(folder / "vecnormalize.pkl"))
    write_metadata(folder, CODEC, {"model": "llama-2-70b", "gpu": "h100"}, "PPO")
    return folder


def test_checkpoint_loads_and_acts(checkpoint_dir):
    meta = json.loads((checkpoint_dir / "metadata.json").read_text())
    assert meta["spec_version"] == SPEC_VERSION and meta["codec"]["max_gpus"] == 32 and meta["git_rev"]
    ctl = PPOController(checkpoint_dir, codec=CODEC, scenario={"model": "llama-2-70b"})
    prev = Plan.model_level(4, 64, 4)
    plan = ctl.decide(cluster_state(prev))
    assert set(plan.ops) == set(OPERATOR_GROUPS)
    for g in OPERATOR_GROUPS:
        assert CODEC.min_replicas <= plan[g].replicas <= CODEC.max_replicas
        assert plan[g].max_batch in CODEC.batch_levels
        assert plan[g].tp == 4  # kept from the previous plan
    # deterministic: same state, same plan
    assert ctl.decide(cluster_state(prev)) == plan


def test_normaliser_matches_vecnormalize(checkpoint_dir):
    norm = load_normaliser(checkpoint_dir)
    assert isinstance(norm, ObsNormaliser)
    import pickle

    with open(checkpoint_dir / "vecnormalize.pkl", "rb") as f:
        vn = pickle.load(f)
    obs = np.linspace(-2, 5, norm.mean.size).astype(np.float32)
    np.testing.assert_allclose(norm(obs), vn.normalize_obs(obs), rtol=1e-5, atol=1e-5)
    assert norm.mean.mean() > 1.0  # statistics were fitted to the +3-shifted observations


def _copy_with_metadata(src, dst, edit) -> dict:
    """Copy the checkpoint ``src`` to ``dst`` with its metadata changed by ``edit(meta)``."""
    dst.mkdir()
    for f in ("policy.zip", "vecnormalize.pkl"):
        (dst / f).write_bytes((src / f).read_bytes())
    meta = json.loads((src / "metadata.json").read_text())
    edit(meta)
    (dst / "metadata.json").write_text(json.dumps(meta))
    return meta


def test_wrong_spec_version_is_refused(checkpoint_dir, tmp_path):
    bad = tmp_path / "old"
    _copy_with_metadata(checkpoint_dir, bad, lambda m: m.update(spec_version="opscale-codec-0"))
    with pytest.raises(CheckpointError, match="opscale-codec-0.*" + SPEC_VERSION):
        PPOController(bad)


def test_wrong_codec_and_scenario_are_refused(checkpoint_dir):
    with pytest.raises(CheckpointError, match="max_gpus: checkpoint 32 vs expected 64"):
        load_checkpoint(checkpoint_dir, codec=CodecConfig(max_gpus=64))
    with pytest.raises(CheckpointError, match="another scenario.*gpu: checkpoint 'h100' vs expected 'a100'"):
        load_checkpoint(checkpoint_dir, scenario={"gpu": "a100"})


def test_codec_fields_added_later_compare_at_their_defaults(checkpoint_dir, tmp_path):
    old = tmp_path / "old"
    # written before level mode existed: no replica_levels field, i.e. delta mode
    meta = _copy_with_metadata(checkpoint_dir, old, lambda m: m["codec"].pop("replica_levels"))
    codec = CodecConfig.from_dict(meta["codec"])
    load_checkpoint(old, codec=codec)
    with pytest.raises(CheckpointError, match="replica_levels: checkpoint \\[\\] vs expected \\[1, 2\\]"):
        load_checkpoint(old, codec=CodecConfig.from_dict({**meta["codec"], "replica_levels": [1, 2]}))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no metadata.json"):
        load_checkpoint(tmp_path)
    write_metadata(tmp_path, CODEC, {}, "PPO")
    with pytest.raises(CheckpointError, match="no policy.zip"):
        load_checkpoint(tmp_path)


def test_metadata_records_the_host_numerics(tmp_path, monkeypatch):
    """A policy's last bits depend on the CPU path torch's kernels take: the metadata says which."""
    import torch

    monkeypatch.setenv("MKL_CBWR", "AVX2")
    meta = write_metadata(tmp_path, CODEC, {"model": "x"}, "PPO")
    host = json.loads((tmp_path / "metadata.json").read_text())["host"]
    assert host == meta["host"]
    assert host["torch"] == torch.__version__
    assert host["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert host["numerics_env"]["MKL_CBWR"] == "AVX2" and host["cpu"]
