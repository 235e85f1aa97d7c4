"""Fast-model env steps per second against a PPO MlpPolicy's action-prediction rate.

Usage: ``python bench/env_speed.py [--steps 3000] [--rounds 3] [--warmup 0] [--baseline DIR] [--learner]
[--train-share STEPS] [--gc-share] [--live] [--replay STREAMS] [--interleaved] [--json]``

Measures, on the same machine in one run:
* env steps/s of ``opscale/OperatorScaling-v0`` (fast fidelity) under these action streams:
  ``keep`` (the plan kept: the cheapest case, which no trained policy sends for long: see
  ``trained``), ``random``
  (uniformly random actions: a new plan every step, the worst case), ``ppo`` (actions
  sampled from a freshly initialised ``PPO("MlpPolicy")``: what early training sends) and
  ``oq`` (the operator-queueing controller's plans encoded as actions: a realistic
  autoscaler that changes the plan now and then), and ``train`` (what ``train.py``'s envs
  receive early in training: the env under ``agents.wrappers.PlanRestriction`` with the
  initial plan, frozen layout and frozen replica counts of agents/configs/ppo.yaml, on its
  training split, uniformly random actions among the allowed ones: only the replica sub-actions
  of attention, projections and MLP vary; before session 29 embed's and head's varied too), and
  ``trained`` (the same env driven by the shipped checkpoints/ppo-default sampling its actions,
  as PPO's rollouts do once the policy is trained). Only ``env.step`` is timed; ``--warmup N``
  first runs N untimed steps of the same stream (the profile and placement caches fill in a
  long training run; 0 = the session-1 method). Since session 27 the streams drawn by a policy or
  controller (``ppo``, ``oq``, ``trained``) are recorded first (run live, untimed, in their own
  process) and replayed, so that, as in the other streams and in the predict loop below, nothing
  but the loop runs between two timed calls: a policy call between two steps leaves the CPU's
  caches and branch predictors to the policy, and the next step of the shipped policy's stream
  took some 3x longer here (about 1.6 ms against 0.5 ms; docs/SIMULATOR.md "Speed", session 27).
  ``--live`` times them live as before; ``--interleaved`` measures that case on purpose (below).
  ``--replay train`` (any stream) records and replays others too: ``train``'s masked random draws
  are numpy calls between two timed steps, and session 32's A/Bs of that stream were replays.
  A replay that does not end on the recording's last observation is reported (a tree that
  computes something else walks another trajectory with the same actions);
* ``PPO("MlpPolicy").predict`` calls/s on one observation (torch with one thread), with SB3's
  defaults and again with torch.distributions' argument checks off, as train.py runs its policy
  since session 13 (``agents.training.distribution_checks``; the same numbers, faster);
* their ratios (the env must not be the bottleneck of training: ratio >= 5), to both rates;
* with ``--learner``: the samples per second PPO training itself consumes when the env costs
  nothing (MaskablePPO with agents/configs/ppo.yaml's hyperparameters and n_envs, checks off as in
  training since session 13, on an env
  with the same spaces that returns a fixed observation), i.e. the learner's side of the
  "not the bottleneck" question (predict on one observation leaves out the gradient updates);
* with ``--train-share STEPS``: each round and for each tree (so with ``--baseline``, the
  speed-up of a whole training run), the share of a real training run's wall time spent on the env
  side (``agents.training.train`` with agents/configs/ppo.yaml for STEPS timesteps, into a
  temporary folder; the training and evaluation VecEnvs' ``step_wait`` and ``env_method``
  calls, i.e. env steps, resets and action masks, are timed);
* with ``--interleaved``: per stream (current tree), ``PPO("MlpPolicy").predict`` and ``env.step``
  alternating in one loop as a rollout runs them, each timed, and their ratio: each side pays for
  the caches the other left, which is what training sees (``--train-share`` measures a real run);
* with ``--gc-share``: each stream again with Python's cyclic garbage collector off (current tree
  only), and the share of an env step the collections take, ``1 - rate with / rate without``
  (the env makes next to no cyclic garbage, so the collections are the price of the objects a
  step creates and keeps: layouts, step models and plans in the bounded caches);
* how much faster than real time the reference simulator replays azure-conv.

Each round runs every stream in a fresh process (so no run inherits another's caches),
one after the other; with ``--baseline DIR`` (another checkout, e.g. ``git archive HEAD``
unpacked) each round also runs the same streams against DIR's ``envs``, interleaved with
the current tree's, so load from other jobs hits both alike. Medians over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from intree import run_in_tree

ROOT = Path(__file__).resolve().parents[1]
STREAMS = ("keep", "random", "ppo", "oq", "train", "trained")
#: streams whose actions come from a policy or controller reading the env: by default drawn live
#: once per round (untimed, in their own process) and replayed by each tree (see the module doc)
RECORDED = ("ppo", "oq", "trained")


# ---------------------------------------------------------------------------------------------
# worker side: runs with the tree under test first on sys.path
# ---------------------------------------------------------------------------------------------

def _policy(env):  # noqa: ANN001, ANN202
    import torch
    from stable_baselines3 import PPO

    torch.set_num_threads(1)
    return PPO("MlpPolicy", env, device="cpu", n_steps=64, seed=0)


def _train_env(seed: int):  # noqa: ANN202
    """The env as train.py's rollouts step it: agents/configs/ppo.yaml's training world
    (``scenario_overrides``) and split (``train_split``), under PlanRestriction with its initial
    plan, frozen layout and frozen replica counts (``freeze_replicas``: embed and head since
    session 14). Until session 29 this left out ``freeze_replicas`` and the split, so the ``train``
    stream also drew embed and head replica counts, which train.py has not sent since session 14.
    Fields a tree's hyperparameters lack (an older checkout under ``--baseline``) keep its defaults."""
    from agents.hyperparams import load_hyperparams
    from agents.wrappers import PlanRestriction
    from envs import Scenario, make_env

    hp = load_hyperparams()
    over = dict(getattr(hp, "scenario_overrides", None) or {})  # trees before session 16 have none
    scenario = Scenario.from_yaml().replace(**over) if over else None
    mults = list(getattr(hp, "rate_mults", None) or [1.0])  # (trees before session 12 have none)
    env = make_env(scenario, split=getattr(hp, "train_split", "train"), seed=seed,
                   **({"rate_mults": mults} if mults != [1.0] else {}))
    frozen = tuple(getattr(hp, "freeze_replicas", None) or ())  # trees before session 14 have none
    if frozen:
        return PlanRestriction(env, hp.initial_plan or None, hp.freeze_layout, frozen)
    return PlanRestriction(env, hp.initial_plan or None, hp.freeze_layout)


def _masked_random(rng: np.random.Generator, mask: np.ndarray, nvec: np.ndarray) -> np.ndarray:
    """A uniformly random action among the sub-actions ``mask`` allows (flat MaskablePPO layout)."""
    out = np.empty(len(nvec), dtype=np.int64)
    o = 0
    for i, n in enumerate(nvec):
        allowed = np.flatnonzero(mask[o:o + n])
        out[i] = allowed[rng.integers(0, len(allowed))]
        o += n
    return out


class _Stream:
    """An action stream (see the module doc) on a fresh env: ``stepper`` is what ``step`` is
    called on (the env, or train.py's PlanRestriction around it), ``env`` the env itself. With
    ``live=False`` (a replay) the stream's policy or controller is not built."""

    def __init__(self, stream: str, seed: int = 0, live: bool = True) -> None:
        from envs import make_env

        self.name = stream
        self.live = live
        wrapped = _train_env(seed) if stream in ("train", "trained") else None
        self.wrapped = wrapped
        self.env = wrapped.unwrapped if wrapped is not None else make_env(seed=seed)
        self.stepper = wrapped if wrapped is not None else self.env
        self.obs, _ = self.stepper.reset(seed=seed)
        self.rng = np.random.default_rng(seed)
        self.nvec = self.env.action_space.nvec
        env = self.env
        self.model = _policy(env) if stream == "ppo" and live else None
        self.trained = None
        if stream == "trained" and live:
            import torch

            import envs
            from agents.ppo import PPOController

            torch.set_num_threads(1)
            tree = Path(envs.__file__).resolve().parents[1]  # the checkout under test
            self.trained = PPOController(tree / "checkpoints" / "ppo-default", deterministic=False)
        self.ctl = None
        if stream == "oq" and live:
            from agents.registry import make_controller

            self.ctl, _ = make_controller("operator-queueing", env.scenario, slo=env.slo)
            self.ctl.reset(env.state)
        self.keep = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)

    def action(self) -> np.ndarray:
        """The stream's next action (reads the env's current state or observation)."""
        s, env = self.name, self.env
        if s in RECORDED and not self.live:
            raise RuntimeError(f"stream {s!r} was opened for a replay: its policy or controller was not built")
        if s == "keep":
            return self.keep
        if s == "random":
            return self.rng.integers(0, self.nvec)
        if s == "ppo":
            return self.model.predict(self.obs, deterministic=False)[0]
        if s == "train":
            return _masked_random(self.rng, self.wrapped.action_masks(), self.nvec)
        if s == "trained":
            return self.trained.act(env.state)
        tgt = env.sim.timeline.target_plan
        return env.decoder.encode(self.ctl.decide(env.state), tgt)

    def step(self, a: np.ndarray) -> None:
        """``step(a)``; a finished episode resets (the controller of ``oq`` with it)."""
        self.obs, _, term, trunc, _ = self.stepper.step(a)
        if term or trunc:
            self.obs, _ = self.stepper.reset()
            if self.ctl is not None:
                self.ctl.reset(self.env.state)


def record_actions(stream: str, n: int, path: str, seed: int = 0) -> int:
    """Run ``stream`` live for ``n`` steps on this tree's env and save its actions and the last
    observation to ``path`` (an .npz, for :func:`env_rate` ``actions=``); returns ``n``."""
    st = _Stream(stream, seed)
    acts = []
    for _ in range(n):
        acts.append(np.asarray(st.action(), dtype=np.int64).reshape(-1))
        st.step(acts[-1])
    np.savez(path, actions=np.stack(acts), last_obs=np.asarray(st.obs))
    return n


def _opened(stream: str, seed: int, actions: str | None,
            need: int) -> tuple[_Stream, np.ndarray | None, np.ndarray | None]:
    """(the stream on a fresh env, the recording's actions, its last observation): live (no
    recording, both None) or for a replay of ``actions``, which must hold ``need`` actions."""
    st = _Stream(stream, seed, live=actions is None)
    if actions is None:
        return st, None, None
    with np.load(actions) as f:
        acts, last = f["actions"], f["last_obs"]
    if len(acts) != need:
        raise ValueError(f"{actions}: {len(acts)} recorded actions, but warm-up + timed steps need {need}")
    return st, acts, last


def replay_rate(stream: str, steps: int, seed: int = 0, warmup: int = 0, actions: str | None = None) -> dict:
    """Env steps per second of ``env.step`` alone under ``stream`` (after ``warmup`` untimed steps).

    ``actions``: a recording of the stream (:func:`record_actions`, warmup + steps actions) to
    replay instead of running the stream's policy or controller between the timed steps.
    Returns ``{"steps_per_s", "same_trajectory"}``; the second says whether the replay ended on
    the recording's last observation (None when live): a tree that computes something else than
    the recording's (a non-exact change under A/B) walks another trajectory with the same actions.
    """
    st, acts, last = _opened(stream, seed, actions, steps + warmup)
    n = 0
    spent = 0.0
    while n < steps + warmup:
        a = acts[n] if acts is not None else st.action()
        t0 = time.perf_counter()
        st.step(a)
        if n >= warmup:
            spent += time.perf_counter() - t0
        n += 1
    same = None if last is None else bool(np.array_equal(st.obs, last))
    return {"steps_per_s": steps / spent, "same_trajectory": same}


def env_rate(stream: str, steps: int, seed: int = 0, warmup: int = 0, actions: str | None = None) -> float:
    """Env steps per second of ``env.step`` alone (:func:`replay_rate`'s ``steps_per_s``)."""
    return replay_rate(stream, steps, seed, warmup, actions)["steps_per_s"]


def interleaved_rates(stream: str, steps: int, seed: int = 0, warmup: int = 0, actions: str | None = None) -> dict:
    """``PPO("MlpPolicy").predict`` and ``env.step`` alternating in one loop, as a rollout runs them,
    each timed: predict on the env's last observation (its action unused: the stream's, or the
    recording's, is stepped), then the step. Predict alternates SB3's defaults and torch.distributions'
    checks off, call by call. Each side then runs with the CPU caches and branch predictors the
    other left (a step of the shipped policy's stream takes some 3x longer after a policy call than
    after another step here: docs/SIMULATOR.md "Speed", session 27). Returns both rates, their
    ratios and ``same_trajectory`` (see :func:`replay_rate`)."""
    import torch

    from envs import make_env

    st, acts, last = _opened(stream, seed, actions, steps + warmup)
    torch.set_num_threads(1)
    model = _policy(make_env())
    checks0 = torch.distributions.Distribution._validate_args
    pred = [0.0, 0.0]  # seconds of predict calls with the checks on, off
    calls = [0, 0]
    spent = 0.0
    try:
        for n in range(steps + warmup):
            on = n % 2 == 0
            torch.distributions.Distribution.set_default_validate_args(on)
            t0 = time.perf_counter()
            model.predict(st.obs, deterministic=True)
            t1 = time.perf_counter()
            a = acts[n] if acts is not None else st.action()
            t2 = time.perf_counter()
            st.step(a)
            t3 = time.perf_counter()
            if n >= warmup:
                pred[0 if on else 1] += t1 - t0
                calls[0 if on else 1] += 1
                spent += t3 - t2
    finally:
        torch.distributions.Distribution.set_default_validate_args(checks0)
    env_ps = steps / spent
    p_on, p_off = calls[0] / pred[0], calls[1] / pred[1]
    return {"steps_per_s": env_ps, "predict_per_s": p_on, "predict_nochecks_per_s": p_off,
            "ratio_to_predict": env_ps / p_on, "ratio_to_predict_nochecks": env_ps / p_off,
            "same_trajectory": None if last is None else bool(np.array_equal(st.obs, last))}


def ppo_rate(calls: int, checks: bool = True) -> float:
    """``PPO("MlpPolicy").predict`` calls per second on one observation; ``checks=False`` with
    torch.distributions' argument checks off, as train.py runs its policy (bit-identical results,
    see ``agents.training.distribution_checks``)."""
    import torch

    from envs import make_env

    if not checks:
        torch.distributions.Distribution.set_default_validate_args(False)
    env = make_env()
    model = _policy(env)
    obs, _ = env.reset(seed=0)
    for _ in range(100):
        model.predict(obs, deterministic=True)
    t0 = time.perf_counter()
    for _ in range(calls):
        model.predict(obs, deterministic=True)
    return calls / (time.perf_counter() - t0)


def learner_rate(rollouts: int = 2) -> float:
    """Samples per second ``learn()`` of train.py's algorithm consumes when the env costs nothing.

    MaskablePPO (or PPO) with agents/configs/ppo.yaml's hyperparameters, n_envs DummyVecEnv copies
    of an env with the opscale spaces that returns one fixed observation, under VecNormalize as in
    training; ``rollouts`` rollouts of n_steps x n_envs samples (each followed by its n_epochs of
    gradient steps) after one untimed rollout.
    """
    import gymnasium as gym
    import torch
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from agents.hyperparams import load_hyperparams
    from envs import make_env

    torch.set_num_threads(1)
    torch.distributions.Distribution.set_default_validate_args(False)  # as agents.training.train runs
    hp = load_hyperparams()
    real = make_env(seed=0)
    obs0, _ = real.reset(seed=0)

    class Fixed(gym.Env):
        observation_space = real.observation_space
        action_space = real.action_space

        def reset(self, *, seed=None, options=None):  # noqa: ANN001, ANN202
            super().reset(seed=seed)
            self.t = 0
            return obs0, {}

        def step(self, action):  # noqa: ANN001, ANN202
            self.t += 1
            return obs0, 0.0, False, self.t >= 120, {}

        def action_masks(self):  # noqa: ANN202
            return np.ones(int(np.sum(self.action_space.nvec)), dtype=bool)

    venv = VecNormalize(DummyVecEnv([Fixed for _ in range(hp.n_envs)]), gamma=hp.gamma, **dict(hp.normalize))
    if hp.algo == "MaskablePPO":
        from sb3_contrib import MaskablePPO as Algo
    else:
        from stable_baselines3 import PPO as Algo
    model = Algo(hp.policy, venv, seed=0, device="cpu", verbose=0, **hp.ppo_kwargs())
    per = hp.n_steps * hp.n_envs
    model.learn(total_timesteps=per)
    t0 = time.perf_counter()
    model.learn(total_timesteps=per * rollouts, reset_num_timesteps=False)
    return per * rollouts / (time.perf_counter() - t0)


def train_share(steps: int) -> dict:
    """Wall time of a real training run (train.py's job, shipped hyperparameters, ``steps``
    timesteps, written to a temporary folder) and the part of it spent on the env side."""
    import tempfile

    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.training import TrainArgs, train

    spent = [0.0]

    def timed(fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrapper

    DummyVecEnv.step_wait = timed(DummyVecEnv.step_wait)
    DummyVecEnv.env_method = timed(DummyVecEnv.env_method)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = train(TrainArgs(timesteps=steps, save=str(Path(tmp) / "ckpt"), logdir=str(Path(tmp) / "runs"),
                              progress_bar=False), log=lambda _m: None)
        wall = time.perf_counter() - t0
    return {"timesteps": out["timesteps"], "wall_s": wall, "env_s": spent[0], "env_share": spent[0] / wall}


def reference_speedup() -> dict:
    """Wall time of the reference simulator replaying azure-conv with 4 TP4 instances."""
    from envs import make_simulator, run_controller
    from envs.scenario import Scenario
    from envs.simulate import FixedPlan
    from runtime.control import Plan
    from traces import load_trace

    sc = Scenario.from_yaml(trace="azure-conv")
    sim = make_simulator(sc, load_trace("azure-conv"), fidelity="reference")
    plan = Plan.model_level(4, 64, sc.model_tp)
    t0 = time.perf_counter()
    out = run_controller(sim, FixedPlan(plan), plan)
    wall = time.perf_counter() - t0
    return {"trace_s": out["sim_time_s"], "wall_s": wall, "speedup": out["sim_time_s"] / wall,
            "requests": out["requests"]}


def _measure(what: str, steps: int, warmup: int = 0, gc_off: bool = False, actions: str | None = None) -> dict:
    """``{what: result}`` of one measurement (run in a fresh process by :func:`_run`); ``what`` is
    a stream, ``interleaved:<stream>``, ``record:<stream>:<path>`` or one of the other measurements."""
    if gc_off:
        import gc

        import envs  # noqa: F401 - what the env imports is loaded with the collector still on

        gc.disable()
    if what == "predict":
        out = ppo_rate(steps)
    elif what == "predict_nochecks":
        out = ppo_rate(steps, checks=False)
    elif what == "train_share":
        out = train_share(steps)
    elif what == "learner":
        out = learner_rate()
    elif what.startswith("record:"):
        _, stream, path = what.split(":", 2)
        out = record_actions(stream, steps, path)
    elif what.startswith("interleaved:"):
        out = interleaved_rates(what.split(":", 1)[1], steps, warmup=warmup, actions=actions)
    else:
        out = replay_rate(what, steps, warmup=warmup, actions=actions)
    return {what: out}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def _run(root: Path, what: str, steps: int, warmup: int = 0, gc_off: bool = False,
         actions: str | None = None) -> float | dict:
    """One measurement in a fresh process with ``root`` first on sys.path (``gc_off``: with the
    cyclic garbage collector disabled; ``actions``: a recording to replay)."""
    out = run_in_tree(root, "env_speed", f"_measure({what!r}, {steps}, {warmup}, {gc_off}, {actions!r})", what)[what]
    return out if isinstance(out, dict) else float(out)


def host() -> dict:
    """What the ratios depend on besides the code: the CPU model, its cores and the versions of
    Python, torch, numpy and numba (this process's). The same trees read 4.8x on train.py's stream
    on a 2-core AMD EPYC host (session 34) and 2.95x on a 2-core Intel Xeon host (family 6, model
    207; session 35), whose PPO predict was 3.1x faster while the env was 1.9x faster."""
    import platform

    cpu = platform.processor() or platform.machine()
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in info:
                    info[key] = val.strip()
                if not line.strip() and info:  # (the first CPU's block only)
                    break
    except OSError:
        pass
    if "model name" in info:  # (a VM may show a generic name: family and model say which CPU)
        cpu = f"{info['model name']} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
    out = {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()}
    for mod in ("torch", "numpy", "numba"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def _steps_for(stream: str, steps: int) -> int:
    # plan-changing streams are slower; fewer steps keep a round short
    return steps if stream in ("keep", "oq") else max(steps // 3, 200)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="env steps per measurement (kept plan, oq)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--streams", default=",".join(STREAMS), help=f"comma-separated subset of {STREAMS}")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to measure interleaved")
    p.add_argument("--warmup", type=int, default=0, help="untimed env steps before timing (0: session-1 method)")
    p.add_argument("--learner", action="store_true", help="also measure PPO training's own samples/s")
    p.add_argument("--train-share", type=int, default=0, metavar="STEPS",
                   help="also time a real training run of STEPS timesteps and its env side (each round, each tree)")
    p.add_argument("--gc-share", action="store_true",
                   help="also run each stream with the garbage collector off: the collections' share of a step")
    p.add_argument("--live", action="store_true",
                   help=f"time the streams {RECORDED} live, their policy or controller between the timed steps "
                        "(before session 27: slower steps, see the module doc), not replayed")
    p.add_argument("--replay", default="", metavar="STREAMS",
                   help=f"comma-separated streams to record and replay besides {RECORDED} (e.g. train)")
    p.add_argument("--interleaved", action="store_true",
                   help="also alternate PPO predict and env.step in one loop per stream, as a rollout runs them "
                        "(current tree)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-simulator replay")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    streams = [s for s in a.streams.split(",") if s]
    replayed = [s for s in a.replay.split(",") if s]
    bad = [s for s in streams + replayed if s not in STREAMS]
    if bad:
        p.error(f"unknown stream(s) {bad}; choose from {STREAMS}")
    replayed = set() if a.live else set(RECORDED) | set(replayed)
    trees = {"current": ROOT}
    if a.baseline is not None:
        if not (a.baseline / "envs" / "fast.py").is_file():
            p.error(f"--baseline {a.baseline}: no envs/fast.py there")
        trees["baseline"] = a.baseline.resolve()
    rates: dict[str, dict[str, list[float]]] = {t: {s: [] for s in streams} for t in trees}
    preds: list[float] = []
    preds_nc: list[float] = []
    learns: list[float] = []
    shares: dict[str, list[dict]] = {t: [] for t in trees}
    no_gc: dict[str, list[float]] = {s: [] for s in streams}
    same: dict[str, dict[str, list]] = {t: {s: [] for s in streams} for t in trees}
    inter: dict[str, list[dict]] = {s: [] for s in streams}
    tmp = tempfile.TemporaryDirectory(prefix="env_speed_")
    for r in range(a.rounds):
        preds.append(_run(ROOT, "predict", a.steps))
        preds_nc.append(_run(ROOT, "predict_nochecks", a.steps))
        if a.train_share:
            for t, root in trees.items():
                shares[t].append(_run(root, "train_share", a.train_share))
        if a.learner:
            learns.append(_run(ROOT, "learner", a.steps))
        for s in streams:
            n = _steps_for(s, a.steps)
            acts = None
            if s in replayed:  # drawn once per round by this tree, replayed by each
                acts = str(Path(tmp.name) / f"{s}-{r}.npz")
                _run(ROOT, f"record:{s}:{acts}", n + a.warmup)
            for t, root in trees.items():
                got = _run(root, s, n, a.warmup, actions=acts)
                rates[t][s].append(got["steps_per_s"])
                same[t][s].append(got["same_trajectory"])
            if a.gc_share:
                no_gc[s].append(_run(ROOT, s, n, a.warmup, gc_off=True, actions=acts)["steps_per_s"])
            if a.interleaved:
                inter[s].append(_run(ROOT, f"interleaved:{s}", n, a.warmup, actions=acts))
    tmp.cleanup()
    pred = float(np.median(preds))
    learn = float(np.median(learns)) if learns else None
    pred_nc = float(np.median(preds_nc))
    out: dict = {"ppo_predict_per_s": pred, "ppo_predict_nochecks_per_s": pred_nc, "rounds": a.rounds, "steps": a.steps, "warmup": a.warmup,
                 "learner_samples_per_s": learn, "load_avg": list(os.getloadavg()), "host": host()}
    for t in trees:
        out[t] = {s: {"steps_per_s": float(np.median(v)), "ratio_to_predict": float(np.median(v)) / pred,
                      "ratio_to_predict_nochecks": float(np.median(v)) / pred_nc,
                      "ratio_to_learner": float(np.median(v)) / learn if learn else None,
                      "rounds": [round(x, 1) for x in v],
                      "replayed": s in replayed,
                      "same_trajectory": same[t][s]} for s, v in rates[t].items()}
    if a.baseline is not None:
        out["speedup"] = {s: out["current"][s]["steps_per_s"] / out["baseline"][s]["steps_per_s"] for s in streams}
    if a.gc_share:
        for s, v in no_gc.items():
            off = float(np.median(v))
            out["current"][s]["gc_off_steps_per_s"] = off
            out["current"][s]["gc_share"] = 1.0 - out["current"][s]["steps_per_s"] / off
            out["current"][s]["gc_off_rounds"] = [round(x, 1) for x in v]
    if a.interleaved:
        out["interleaved"] = {}
        for s, runs in inter.items():
            med = {k: float(np.median([x[k] for x in runs]))
                   for k in ("steps_per_s", "predict_per_s", "predict_nochecks_per_s", "ratio_to_predict",
                             "ratio_to_predict_nochecks")}
            out["interleaved"][s] = dict(med, rounds=runs)
    if a.train_share:
        for t in trees:
            runs = shares[t]
            wall = float(np.median([r["wall_s"] for r in runs]))
            env_s = float(np.median([r["env_s"] for r in runs]))
            out[t]["train_share"] = {"timesteps": runs[0]["timesteps"], "wall_s": wall, "env_s": env_s,
                                     "env_share": float(np.median([r["env_share"] for r in runs])),
                                     "rounds_wall_s": [round(r["wall_s"], 1) for r in runs]}
        if a.baseline is not None:
            out["speedup"]["train_wall"] = out["baseline"]["train_share"]["wall_s"] / out["current"]["train_share"]["wall_s"]
    if not a.no_reference:
        out["reference_azure_conv"] = reference_speedup()
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    names = {"keep": "plan kept", "random": "uniformly random", "ppo": "fresh PPO policy",
             "oq": "operator-queueing plans", "train": "train.py (frozen layout)",
             "trained": "shipped policy, sampling"}
    hw = out["host"]
    print(f"host: {hw['cpu']}, {hw['cpus']} CPUs; Python {hw['python']}, torch {hw['torch']}, numpy {hw['numpy']}, "
          f"numba {hw['numba']}")
    print(f"PPO MlpPolicy predict: {pred:8.0f} calls/s (median of {a.rounds} rounds; load average "
          f"{out['load_avg'][0]:.1f} at the end; warm-up {a.warmup} steps)")
    print(f"  the same with torch.distributions' checks off, as train.py runs it: {pred_nc:8.0f} calls/s")
    if learn:
        print(f"PPO training (learner side, env cost removed): {learn:8.0f} samples/s")
    for s in streams:
        cur = out["current"][s]
        line = (f"fast env, {names[s]:24s} {cur['steps_per_s']:8.0f} steps/s  ratio {cur['ratio_to_predict']:5.2f}"
                f" ({cur['ratio_to_predict_nochecks']:5.2f} checks off)")
        if learn:
            line += f"  to learner {cur['ratio_to_learner']:5.2f}"
        if a.baseline is not None:
            base = out["baseline"][s]
            line += f"   baseline {base['steps_per_s']:8.0f} steps/s  speed-up {out['speedup'][s]:.2f}x"
        if a.gc_share:
            line += f"   collector off {cur['gc_off_steps_per_s']:8.0f} steps/s: {100 * cur['gc_share']:.0f} % of a step"
        if cur["replayed"]:
            line += "   (replayed)"
        print(line)
    for t in trees:
        off = [s for s in streams if False in out[t][s]["same_trajectory"]]
        if off:
            print(f"note: the {t} tree's replay of {off} left the recorded trajectory (it computes something "
                  f"else than this tree): same actions, other states")
    if a.interleaved:
        print("as a rollout runs them (predict and env.step alternating in one loop, each timed):")
        for s in streams:
            it = out["interleaved"][s]
            print(f"  {names[s]:24s} env {it['steps_per_s']:8.0f} steps/s, predict {it['predict_per_s']:6.0f} "
                  f"calls/s ({it['predict_nochecks_per_s']:6.0f} checks off)  ratio {it['ratio_to_predict']:5.2f} "
                  f"({it['ratio_to_predict_nochecks']:5.2f} checks off)")
    if a.train_share:
        for t in trees:
            ts = out[t]["train_share"]
            print(f"training run ({t}), {ts['timesteps']} timesteps: {ts['wall_s']:.0f} s, env side "
                  f"{ts['env_s']:.0f} s = {100 * ts['env_share']:.0f} % of it (rounds {ts['rounds_wall_s']})")
        if a.baseline is not None:
            print(f"training run speed-up over the baseline: {out['speedup']['train_wall']:.2f}x")
    if not a.no_reference:
        ref = out["reference_azure_conv"]
        print(f"reference, azure-conv: {ref['trace_s']:.0f} s of trace in {ref['wall_s']:.1f} s "
              f"= {ref['speedup']:.0f}x real time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
