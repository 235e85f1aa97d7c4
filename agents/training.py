"""The PPO training job behind ``train.py``: envs, normalisation, callbacks, checkpoints.

One function, :func:`train`, does the whole run:

1. vectorised training envs on the scenario's training split (``train_split``: ``train``, or
   ``trainval`` to refit a recipe chosen on val on all data before the held-out split; DummyVecEnv or
   SubprocVecEnv, one torch thread per subprocess) under VecNormalize, in the scenario with the
   hyperparameters' ``scenario_overrides`` applied (the closing comparison uses the scenario as given);
2. optionally behaviour cloning from the operator-queueing controller
   (:mod:`agents.imitation`) before PPO;
3. PPO or MaskablePPO with TensorBoard logging, :class:`EpisodeMetricsCallback`
   (serving scalars + hyperparameters), an EvalCallback on the validation split (``val``)
   that saves the best policy with its normalisation statistics (the held-out ``test`` split
   is not seen before the closing table; with ``train_split: trainval`` it only draws the curve
   and ``select: final`` ships the last checkpoint), a CheckpointCallback, a progress bar;
4. checkpoint folders with ``policy.zip``, ``vecnormalize.pkl`` and ``metadata.json``.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecNormalize

from agents.callbacks import EpisodeMetricsCallback, SLOConstraintCallback
from agents.checkpoint import (METADATA_FILE, POLICY_FILE, VECNORM_FILE, check_compatible, read_metadata,
                               write_metadata)
from agents.envtools import env_prev_plan, env_state, load_scenario, make_env
from agents.hindsight import HindsightTeacher, pack_menu
from agents.hyperparams import DEFAULT_CONFIG, HindsightTeacherConfig, PPOHyperparams, load_hyperparams
from agents.imitation import behaviour_clone, collect_demonstrations
from agents.wrappers import PlanRestriction
from envs.world import Placer
from runtime.codec import ActionDecoder


@dataclass
class TrainArgs:
    """What train.py passes in (see ``python train.py --help``)."""

    trace: str = "azure"
    model: str | None = None
    gpu: str | None = None
    scenario: str | None = None
    timesteps: int | None = None
    seed: int = 0
    n_envs: int | None = None
    config: str = str(DEFAULT_CONFIG)
    logdir: str = "runs"
    save: str = "checkpoints/latest"
    resume: str | None = None
    bc_episodes: int | None = None
    eval_freq: int | None = None
    progress_bar: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)


def _env_factory(scenario: Any, split: str, seed: int, threads: int | None,
                 restrict: dict[str, Any] | None) -> Callable[[], gym.Env]:
    def make() -> gym.Env:
        if threads is not None:
            th.set_num_threads(threads)
        env = make_env(scenario, split=split, seed=seed, fidelity=(restrict or {}).get("fidelity", "fast"),
                       rate_mults=(restrict or {}).get("rate_mults"))
        if restrict:
            env = PlanRestriction(env, restrict.get("initial_plan") or None, bool(restrict.get("freeze_layout")),
                                  tuple(restrict.get("freeze_replicas") or ()))
        return Monitor(env)
    return make


def hindsight_teacher(cfg: HindsightTeacherConfig, scenario: Any, pred: Any,
                      sim_of: Callable[[], Any]) -> HindsightTeacher:
    """The hindsight teacher of ``cfg`` over the simulator ``sim_of()`` returns
    (``pred``: the scenario's execution predictor, which the placer needs)."""
    placer = Placer(scenario, pred)
    menu = pack_menu(scenario, itertools.product(cfg.attn, cfg.proj, cfg.mlp), cfg.attn_batch, cfg.embed,
                     cfg.head, lambda p: placer.place(p).n_gpus)
    return HindsightTeacher(sim_of, menu, cfg.tau, cfg.lookahead, cfg.window)


def make_vec_env(scenario: Any, split: str, n_envs: int, seed: int, kind: str = "dummy",
                 restrict: dict[str, Any] | None = None) -> VecEnv:
    """``n_envs`` envs of ``split`` with seeds ``seed .. seed + n_envs - 1``."""
    if kind == "subproc" and n_envs > 1:
        return SubprocVecEnv([_env_factory(scenario, split, seed + i, 1, restrict) for i in range(n_envs)],
                             start_method="fork")
    return DummyVecEnv([_env_factory(scenario, split, seed + i, None, restrict) for i in range(n_envs)])


class SaveNormaliserOnBest(BaseCallback):
    """Called by EvalCallback on a new best: saves the training VecNormalize beside best_model.zip."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)

    def _on_step(self) -> bool:
        vn = self.model.get_vec_normalize_env()
        if vn is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            vn.save(str(self.folder / VECNORM_FILE))
        return True


def save_checkpoint(model: Any, venv: VecNormalize | None, folder: Path, scenario: Any, algo: str,
                    extra: dict[str, Any]) -> Path:
    """Write ``policy.zip``, ``vecnormalize.pkl`` and ``metadata.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(str(folder / POLICY_FILE))
    if venv is not None:
        venv.save(str(folder / VECNORM_FILE))
    write_metadata(folder, scenario.codec_config, scenario.to_dict(), algo, extra)
    return folder


def _algo_class(name: str) -> Any:
    if name == "MaskablePPO":
        from sb3_contrib import MaskablePPO
        return MaskablePPO
    from stable_baselines3 import PPO
    return PPO


@contextlib.contextmanager
def distribution_checks(enabled: bool):  # noqa: ANN201
    """Turn torch.distributions' argument checks on or off inside the block (restored after).

    The checks only raise on invalid arguments (logits that are not finite, samples outside the
    support); they never change a number or draw from the random generator, so a run with them
    off is bit-identical to one with them on. MaskablePPO builds one masked Categorical per
    sub-action, three times per policy call, and the checks took about a third of the policy's
    time (docs/TRAINING.md, "Choices and why", session 13).
    """
    Dist = th.distributions.Distribution
    old = Dist._validate_args
    Dist.set_default_validate_args(enabled)
    try:
        yield
    finally:
        Dist.set_default_validate_args(old)


def train(args: TrainArgs, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one training job; returns paths and numbers of what it produced.

    torch.distributions' argument checks are off for the run (:func:`distribution_checks`).
    """
    with distribution_checks(False):
        return _train(args, log)


def _train(args: TrainArgs, log: Callable[[str], None]) -> dict[str, Any]:
    hp: PPOHyperparams = load_hyperparams(args.config)
    if args.timesteps is not None:
        hp.n_timesteps = int(args.timesteps)
    if args.n_envs is not None:
        hp.n_envs = int(args.n_envs)
    if args.bc_episodes is not None:
        hp.bc.episodes = int(args.bc_episodes)
    if args.eval_freq is not None:
        hp.eval_freq = int(args.eval_freq)
    overrides = {k: v for k, v in {"trace": args.trace, "model": args.model, "gpu": args.gpu}.items() if v}
    overrides.update(args.overrides)
    # the scenario the policy is judged in, and the one its envs train in (the hyperparameter
    # file's scenario_overrides: world mechanics such as the drain rule, recorded in metadata)
    deploy = load_scenario(args.scenario, **overrides)
    scenario = hp.training_world(deploy)
    save = Path(args.save)
    save.mkdir(parents=True, exist_ok=True)
    set_random_seed(args.seed)
    th.set_num_threads(1)  # tiny networks: more threads only contend on 2 shared cores
    Algo = _algo_class(hp.algo)
    t0 = time.time()

    restrict = {"initial_plan": hp.initial_plan, "freeze_layout": hp.freeze_layout,
                "freeze_replicas": list(hp.freeze_replicas), "fidelity": hp.fidelity}
    # training episodes draw their rate multiplier from hp.rate_mults; evaluation stays at x1
    venv_raw = make_vec_env(scenario, hp.train_split, hp.n_envs, args.seed, hp.vec_env,
                            {**restrict, "rate_mults": list(hp.rate_mults)})
    norm = dict(hp.normalize)
    if args.resume:
        meta = read_metadata(Path(args.resume))
        check_compatible(meta, Path(args.resume), scenario.codec_config)
        venv = VecNormalize.load(str(Path(args.resume) / VECNORM_FILE), venv_raw)
        venv.training = True
        model = Algo.load(str(Path(args.resume) / POLICY_FILE), env=venv, tensorboard_log=args.logdir,
                          device="cpu")
        log(f"resumed from {args.resume} at {model.num_timesteps} steps")
    else:
        venv = VecNormalize(venv_raw, gamma=hp.gamma, **norm)
        model = Algo(hp.policy, venv, seed=args.seed, tensorboard_log=args.logdir, device="cpu", verbose=0,
                     **hp.ppo_kwargs())

    bc_stats: dict[str, float] = {}
    if hp.bc.episodes > 0 and not args.resume:
        from agents.registry import make_controller

        # the demonstrations come from the env the policy trains in (start plan, frozen layout)
        demo_env = _env_factory(scenario, hp.train_split, args.seed + 10_000, None, restrict)()
        if hp.bc.teacher == "hindsight":
            teacher = hindsight_teacher(hp.bc.hindsight, scenario, demo_env.unwrapped.pred,
                                        lambda: demo_env.unwrapped.sim)
        else:
            teacher, _ = make_controller(hp.bc.teacher, scenario)
        decoder = ActionDecoder(scenario.codec_config)
        demos = collect_demonstrations(demo_env, teacher, decoder, hp.bc.episodes, env_state, seed=args.seed,
                                       prev_plan_of=env_prev_plan)
        demo_env.close()
        venv.obs_rms.update(demos.obs.astype(np.float64))
        bc_stats = behaviour_clone(model, demos, venv.normalize_obs, hp.bc.epochs, hp.bc.batch_size,
                                   hp.bc.learning_rate, seed=args.seed)
        bc_stats["steps"] = float(len(demos))
        bc_stats["teacher_return"] = float(np.mean(demos.episode_returns))
        log(f"behaviour cloning from {hp.bc.teacher}: {len(demos)} steps, "
            f"accuracy {bc_stats['accuracy']:.3f}, nll {bc_stats['nll']:.3f} ({time.time() - t0:.0f} s)")

    eval_raw = make_vec_env(scenario, "val", 1, args.seed + 20_000, "dummy", restrict)
    eval_env = VecNormalize(eval_raw, training=False, norm_reward=False, **{k: v for k, v in norm.items()
                                                                           if k not in ("norm_reward",)})
    best_dir = save / "best"
    eval_kwargs = dict(n_eval_episodes=hp.eval_episodes, eval_freq=max(hp.eval_freq // hp.n_envs, 1),
                       best_model_save_path=str(best_dir), log_path=str(save / "eval"), deterministic=True,
                       callback_on_new_best=SaveNormaliserOnBest(best_dir), verbose=0)
    if hp.algo == "MaskablePPO":
        from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
        eval_cb: EvalCallback = MaskableEvalCallback(eval_env, **eval_kwargs)
    else:
        eval_cb = EvalCallback(eval_env, **eval_kwargs)
    ckpt_cb = CheckpointCallback(save_freq=max(hp.checkpoint_freq // hp.n_envs, 1), save_path=str(save / "steps"),
                                 name_prefix="ppo", save_vecnormalize=True)
    hparams = {**hp.flat(), "seed": args.seed, "trace": scenario.trace, "model": scenario.model,
               "gpu": scenario.gpu}
    metrics_cb = EpisodeMetricsCallback(hparams)
    callbacks: list[BaseCallback] = [metrics_cb, eval_cb, ckpt_cb]
    slo_cb: SLOConstraintCallback | None = None
    sc_cfg = hp.slo_constraint
    if sc_cfg.target is not None:
        init = sc_cfg.init
        if args.resume:  # carry on from the multiplier the resumed run ended with
            init = float(read_metadata(Path(args.resume)).get("slo_weight", init))
            init = min(max(init, sc_cfg.min_weight), sc_cfg.max_weight)
        slo_cb = SLOConstraintCallback(sc_cfg.target, sc_cfg.lr, init, sc_cfg.min_weight, sc_cfg.max_weight,
                                       sc_cfg.max_step, sc_cfg.warmup_steps)
        callbacks.append(slo_cb)
    run_name = f"{hp.algo}_{scenario.model}_{scenario.gpu}_s{args.seed}"
    model.learn(total_timesteps=hp.n_timesteps, callback=callbacks,
                progress_bar=args.progress_bar and sys.stderr.isatty(), tb_log_name=run_name,
                reset_num_timesteps=not args.resume)
    train_s = time.time() - t0
    tb_dir = model.logger.get_dir() if model.logger is not None else None
    extra = {"timesteps": int(model.num_timesteps), "seed": args.seed, "hyperparams": hp.flat(),
             "initial_plan": hp.initial_plan or None, "freeze_layout": hp.freeze_layout,
             "freeze_replicas": list(hp.freeze_replicas), "bc": bc_stats, "train_seconds": round(train_s, 1), "command": " ".join(sys.argv)}
    if slo_cb is not None:
        extra["slo_weight"] = slo_cb.weight
    final_dir = save_checkpoint(model, venv, save / "final", scenario, hp.algo, {**extra, "selected": "final checkpoint"})

    # The shipped folder: the best policy on the validation split when EvalCallback found one
    # (select: best), else the final one.
    chosen = final_dir
    if hp.select == "best" and (best_dir / "best_model.zip").is_file() and (best_dir / VECNORM_FILE).is_file():
        shutil.move(str(best_dir / "best_model.zip"), str(best_dir / POLICY_FILE))
        write_metadata(best_dir, scenario.codec_config, scenario.to_dict(), hp.algo,
                       {**extra, "selected": "best validation eval", "best_mean_reward": float(eval_cb.best_mean_reward)})
        chosen = best_dir
    for name in (POLICY_FILE, VECNORM_FILE, METADATA_FILE):
        shutil.copy2(chosen / name, save / name)
    venv.close()
    eval_env.close()
    return {"checkpoint": str(save), "chosen": str(chosen), "final": str(final_dir), "train_seconds": train_s,
            "timesteps": int(model.num_timesteps), "logdir": tb_dir,
            "bc": bc_stats, "best_mean_reward": float(eval_cb.best_mean_reward), "scenario": deploy}
