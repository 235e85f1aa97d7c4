"""Fast-model env steps per second against a PPO MlpPolicy's action-prediction rate.

Usage: ``python bench/env_speed.py [--steps 3000] [--json]``

Measures, in one process on the same machine:
* env steps/s of ``opscale/OperatorScaling-v0`` (fast fidelity) under a policy that keeps
  the plan (zero-delta actions: what a converged policy mostly does) and under uniformly
  random actions (every step a new plan: the worst case, early training);
* ``PPO("MlpPolicy").predict`` calls/s on one observation (torch with one thread);
* their ratio (the env must not be the bottleneck of training: ratio >= 5);
* how much faster than real time the reference simulator replays azure-conv.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def env_rate(steps: int, random_actions: bool, seed: int = 0) -> float:
    from envs import make_env

    env = make_env(seed=seed)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    keep = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)
    nvec = env.action_space.nvec
    n = 0
    t0 = time.perf_counter()
    while n < steps:
        a = rng.integers(0, nvec) if random_actions else keep
        _, _, term, trunc, _ = env.step(a)
        n += 1
        if term or trunc:
            env.reset()
    return n / (time.perf_counter() - t0)


_MODEL = None


def ppo_rate(calls: int) -> float:
    global _MODEL
    import torch
    from stable_baselines3 import PPO

    from envs import make_env

    torch.set_num_threads(1)
    env = make_env()
    if _MODEL is None:
        _MODEL = PPO("MlpPolicy", env, device="cpu", n_steps=64, seed=0)
    obs, _ = env.reset(seed=0)
    for _ in range(100):
        _MODEL.predict(obs, deterministic=True)
    t0 = time.perf_counter()
    for _ in range(calls):
        _MODEL.predict(obs, deterministic=True)
    return calls / (time.perf_counter() - t0)


def reference_speedup() -> dict:
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    # interleave the measurements so that load from other jobs hits both alike
    keeps, rands, preds, ratios = [], [], [], []
    for _ in range(a.rounds):
        keeps.append(env_rate(a.steps, random_actions=False))
        preds.append(ppo_rate(a.steps))
        rands.append(env_rate(max(a.steps // 4, 200), random_actions=True))
        ratios.append(keeps[-1] / preds[-1])
    keep, rand, pred = (float(np.median(x)) for x in (keeps, rands, preds))
    ref = reference_speedup()
    out = {"env_steps_per_s_keep_plan": keep, "env_steps_per_s_random_actions": rand,
           "ppo_predict_per_s": pred, "ratio_keep_plan": float(np.median(ratios)),
           "ratio_random_actions": rand / pred, "rounds": a.rounds, "reference_azure_conv": ref}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"fast env, plan kept:      {keep:8.0f} steps/s  (ratio to PPO predict {out['ratio_keep_plan']:.1f}, "
              f"median of {a.rounds} interleaved rounds)")
        print(f"fast env, random actions: {rand:8.0f} steps/s  (ratio to PPO predict {rand / pred:.1f})")
        print(f"PPO MlpPolicy predict:    {pred:8.0f} calls/s")
        print(f"reference, azure-conv:    {ref['trace_s']:.0f} s of trace in {ref['wall_s']:.1f} s "
              f"= {ref['speedup']:.0f}x real time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
