"""A 2k-step training run: TensorBoard scalars, a checkpoint that loads and acts, evaluation JSON."""
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # ~80 s on 2 shared cores (a 2k-step training run and four evaluations)
pytest.importorskip("envs")
from agents.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from agents.ppo import PPOController  # noqa: E402
from agents.training import TrainArgs, train  # noqa: E402
from runtime.codec import SPEC_VERSION  # noqa: E402
from runtime.models import OPERATOR_GROUPS  # noqa: E402

CUSTOM = ("episode/slo_attainment", "episode/avg_gpus", "episode/energy_kwh", "episode/ttft_p99_s",
          "episode/tbt_p99_s")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    out = train(TrainArgs(timesteps=2000, n_envs=2, save=str(root / "ckpt"), logdir=str(root / "tb"),
                          bc_episodes=1, eval_freq=1000, progress_bar=False), log=lambda s: None)
    return root, out


def _scalar_tags(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for ev in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_training_writes_custom_scalars(trained):
    root, out = trained
    assert out["timesteps"] >= 2000
    tags = _scalar_tags(root / "tb")
    missing = [t for t in CUSTOM if t not in tags]
    assert not missing, f"TensorBoard lacks {missing}; has {sorted(tags)}"
    assert "rollout/ep_rew_mean" in tags and "train/value_loss" in tags
    # hyperparameters are recorded (the HPARAMS plugin writes its own event)
    assert any(b"hparams" in ev.read_bytes() for ev in (root / "tb").rglob("events.out.tfevents.*"))


def test_checkpoint_loads_and_acts_in_the_simulator(trained):
    root, out = trained
    folder = Path(out["checkpoint"])
    for f in ("policy.zip", "vecnormalize.pkl", "metadata.json"):
        assert (folder / f).is_file(), f
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["spec_version"] == SPEC_VERSION and meta["scenario"]["model"] == "llama-2-70b"
    scenario = load_scenario()
    ctl = PPOController(folder, codec=scenario.codec_config)
    sim = make_sim(scenario, load_split(scenario, "test", 120.0), "fast", 0)
    state = sim.reset(scenario.initial_plan())
    for _ in range(5):
        plan = ctl.decide(state)
        assert set(plan.ops) == set(OPERATOR_GROUPS)
        assert all(1 <= plan[g].replicas <= scenario.codec_config.max_replicas for g in OPERATOR_GROUPS)
        state = sim.step(plan)


def test_checkpoint_for_another_spec_is_refused(trained, tmp_path):
    _, out = trained
    src = Path(out["checkpoint"])
    for f in ("policy.zip", "vecnormalize.pkl"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    meta = json.loads((src / "metadata.json").read_text())
    meta["codec"]["history_len"] = 4
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    scenario = load_scenario()
    with pytest.raises(CheckpointError, match="history_len: checkpoint 4 vs expected"):
        load_checkpoint(tmp_path, codec=scenario.codec_config)
    meta["spec_version"] = "opscale-codec-0"
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="spec 'opscale-codec-0'"):
        load_checkpoint(tmp_path)


def test_evaluation_json_has_every_field(trained, tmp_path):
    from agents.evaluate import main

    _, out = trained
    js = tmp_path / "eval.json"
    rc = main(["--controllers", "static,model-level,operator-queueing,ppo", "--checkpoint", out["checkpoint"],
               "--window-s", "600", "--fidelity", "fast", "--json", str(js), "--plots", str(tmp_path / "plots")])
    assert rc == 0
    data = json.loads(js.read_text())
    fields = ("slo_attainment", "ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "avg_gpus", "peak_gpus",
              "gpu_hours", "energy_kwh", "gpu_hours_vs_static", "energy_vs_static", "gpu_hours_vs_model_level",
              "energy_vs_model_level")
    for name in ("static", "model-level", "operator-queueing", "ppo"):
        r = data["controllers"][name]
        assert all(k in r for k in fields), (name, sorted(r))
        assert 0.0 <= r["slo_attainment"] <= 1.0 and r["peak_gpus"] >= r["avg_gpus"] > 0
        assert 0.0 <= r["avg_draining_gpus"] < r["avg_gpus"]
    assert data["controllers"]["static"]["avg_draining_gpus"] == 0.0  # a static plan never drains
    assert data["controllers"]["static"]["gpu_hours_vs_static"] == pytest.approx(1.0)
    assert data["controllers"]["model-level"]["energy_vs_model_level"] == pytest.approx(1.0)
    for png in ("gpus.png", "attainment.png", "replicas.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000
    tl = data["timelines"]["operator-queueing"]
    assert len(tl["time_s"]) == len(tl["gpus"]) == len(tl["replicas"]["mlp"]) > 0
    assert np.all(np.diff(tl["time_s"]) > 0)


def test_rate_multipliers_reach_the_training_envs_only_when_configured():
    from agents.training import make_vec_env

    sc = load_scenario()
    venv = make_vec_env(sc, "train", 1, 0, "dummy", {"rate_mults": [2.0]})
    assert venv.envs[0].unwrapped.rate_mults == (2.0,)
    assert make_vec_env(sc, "test", 1, 0, "dummy", {}).envs[0].unwrapped.rate_mults == (1.0,)


def _small_run(tmp_path, monkeypatch, config: str) -> tuple[dict, list[str], list[bool]]:
    """A 256-step run of ``config`` (rollouts of 64, evaluations every 128 steps); returns the
    training result, the splits the vectorised envs were built on and their kv_migration."""
    import yaml

    import agents.training as training

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(config).read_text())
    cfg["opscale/OperatorScaling-v0"].update(n_steps=64, batch_size=64, n_epochs=1, eval_freq=128, eval_episodes=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    splits: list[str] = []
    worlds: list[bool] = []   # kv_migration of each env's scenario
    real = training.make_vec_env

    def spy(scenario, split, *a, **kw):
        splits.append(split)
        worlds.append(scenario.kv_migration)
        return real(scenario, split, *a, **kw)

    monkeypatch.setattr(training, "make_vec_env", spy)
    out = train(TrainArgs(timesteps=256, n_envs=2, config=str(tmp_path / "cfg.yaml"), save=str(tmp_path / "ck"),
                          logdir=str(tmp_path / "tb"), progress_bar=False), log=lambda s: None)
    return out, splits, worlds


def test_default_refits_on_trainval_and_ships_the_final_checkpoint(tmp_path, monkeypatch):
    out, splits, worlds = _small_run(tmp_path, monkeypatch, "agents/configs/ppo.yaml")
    assert splits == ["trainval", "val"]          # training envs, then the (monitoring) evaluation env
    folder = Path(out["checkpoint"])
    assert out["chosen"] == out["final"]
    assert (folder / "policy.zip").read_bytes() == (folder / "final" / "policy.zip").read_bytes()
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["selected"] == "final checkpoint" and meta["hyperparams"]["train_split"] == "trainval"
    # ppo.yaml's scenario_overrides: the envs train without the KV hand-over, the metadata records
    # that world, and the closing comparison gets the scenario as given (the default hands over)
    assert worlds == [False, False]
    assert meta["scenario"]["kv_migration"] is False
    assert out["scenario"].kv_migration is True


def test_choice_stage_selects_on_the_validation_split(tmp_path, monkeypatch):
    """ppo-valselect.yaml: episodes from ``train``; EvalCallback scores on ``val`` (527 s, shorter
    than a 600 s episode), never on ``test``, and the best checkpoint is shipped."""
    out, splits, _ = _small_run(tmp_path, monkeypatch, "agents/configs/ppo-valselect.yaml")
    assert splits == ["train", "val"]
    folder = Path(out["checkpoint"])
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["selected"] == "best validation eval"
    ev = np.load(folder / "eval" / "evaluations.npz")
    scenario = load_scenario()
    val_s = load_split(scenario, "val").duration_s
    assert val_s < scenario.episode_intervals * scenario.interval_s
    # an episode on val ends when its 527 s are served (a few intervals of drain at most)
    assert np.all(ev["ep_lengths"] >= val_s / scenario.interval_s)
    assert np.all(ev["ep_lengths"] < scenario.episode_intervals)


def test_distribution_checks_off_changes_no_number(tmp_path, monkeypatch):
    """train() runs with torch.distributions' argument checks off (a third faster): the same
    run with the checks on gives the same weights to the bit, and the default is restored."""
    import io
    import zipfile

    import torch

    import agents.training as training

    default = torch.distributions.Distribution._validate_args
    off, _, _ = _small_run(tmp_path / "off", monkeypatch, "agents/configs/ppo.yaml")
    assert torch.distributions.Distribution._validate_args == default

    real = training._train

    def checked(args, log):
        with training.distribution_checks(True):
            assert torch.distributions.Distribution._validate_args is True
            return real(args, log)

    monkeypatch.setattr(training, "_train", checked)
    on, _, _ = _small_run(tmp_path / "on", monkeypatch, "agents/configs/ppo.yaml")

    def weights(folder: str) -> dict:
        with zipfile.ZipFile(Path(folder) / "policy.zip") as z:
            return torch.load(io.BytesIO(z.read("policy.pth")), map_location="cpu")

    a, b = weights(off["checkpoint"]), weights(on["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError), training.distribution_checks(False):
        raise RuntimeError("restored on the way out")
    assert torch.distributions.Distribution._validate_args == default
