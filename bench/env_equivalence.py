"""Do two checkouts' fast-model envs compute the same thing? Bit-for-bit trajectory comparison.

Usage: ``python bench/env_equivalence.py --baseline DIR [--steps 1500] [--seeds 0,1,2]
[--scenario YAML] [--training-world] [--hash-seed 0] [--baseline-env KEY=VALUE ...]``

For each seed and each action stream (``random``: uniformly random actions, a new plan every
step; ``kept``: zero-delta actions; ``mixed``: a random action every 4th step, kept otherwise;
``walk``: one group's replica delta per step, the rest kept) the env runs ``--steps`` steps
(episodes reset on truncation) in a fresh process for the current tree and for ``DIR`` (e.g.
``git archive HEAD | tar -x -C DIR``), and the observations (float32 bytes), rewards (float64)
and the info values (repr) are compared. Both trees use the same scenario file (default: this
tree's envs/configs/default.yaml), so a config edit in one tree does not count as a change;
``--training-world`` applies agents/configs/ppo.yaml's ``scenario_overrides`` on top (the world
train.py's envs run in: no KV hand-over, pool calls spread).
Both trees run under the same PYTHONHASHSEED (``--hash-seed``): trees before session 21 let the
order of a set of group names (which the hash seed decides) reach their numbers now and then.
``--baseline-env KEY=VALUE`` sets an environment variable for the baseline's runs only: ``--baseline
. --baseline-env OPSCALE_KERNEL=0`` compares this tree's compiled kernels with its own Python path
(the reference they must equal bit for bit).
Prints one line per (seed, stream) and exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from intree import run_in_tree

ROOT = Path(__file__).resolve().parents[1]
STREAMS = ("random", "kept", "mixed", "walk")


def trajectory_digest(stream: str, steps: int, seed: int, scenario: str, training_world: bool = False) -> dict:
    """sha256 of observations, rewards and info of one run (worker side), plus the first step that
    differs can be found from the per-step digests returned."""
    from envs import make_env
    from envs.scenario import Scenario

    over = {}
    if training_world:
        from agents.hyperparams import load_hyperparams

        over = dict(load_hyperparams().scenario_overrides or {})
    env = make_env(Scenario.from_yaml(scenario, **over), seed=seed)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed + 1000)
    nvec = env.action_space.nvec
    keep = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)
    per_step = []
    h_all = hashlib.sha256()
    for i in range(steps):
        if stream == "random" or (stream == "mixed" and i % 4 == 0):
            a = rng.integers(0, nvec)
        elif stream == "walk":
            a = np.array(keep)
            g = int(rng.integers(0, len(nvec) // 3))
            a[3 * g] = int(rng.integers(0, nvec[3 * g]))
        else:
            a = keep
        obs, r, term, trunc, info = env.step(a)
        h = hashlib.sha256()
        h.update(np.asarray(obs, dtype=np.float32).tobytes())
        h.update(np.float64(r).tobytes())
        h.update(repr(sorted(info.items())).encode())
        d = h.hexdigest()[:16]
        per_step.append(d)
        h_all.update(d.encode())
        if term or trunc:
            obs, _ = env.reset()
        keep = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)
    return {"digest": h_all.hexdigest()[:16], "steps": per_step}


def _run(root: Path, stream: str, steps: int, seed: int, scenario: str, hash_seed: str,
         extra_env: dict[str, str] | None = None, training_world: bool = False) -> dict:
    return run_in_tree(root, "env_equivalence",
                       f"trajectory_digest({stream!r}, {steps}, {seed}, {scenario!r}, {training_world})",
                       f"{stream} seed {seed}", env={"PYTHONHASHSEED": hash_seed, **(extra_env or {})})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="the other checkout")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--streams", default=",".join(STREAMS))
    p.add_argument("--scenario", default=str(ROOT / "envs" / "configs" / "default.yaml"))
    p.add_argument("--training-world", action="store_true",
                   help="apply agents/configs/ppo.yaml's scenario_overrides (the world train.py's envs run in)")
    p.add_argument("--hash-seed", default="0",
                   help="PYTHONHASHSEED of both trees' runs (trees before session 21 depend on it now and then: "
                        "4 gives the order the simulators use since)")
    p.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the baseline's runs only (e.g. OPSCALE_KERNEL=0); repeatable")
    a = p.parse_args()
    if not (a.baseline / "envs" / "fast.py").is_file():
        p.error(f"--baseline {a.baseline}: no envs/fast.py there")
    base_env = {}
    for kv in a.baseline_env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            p.error(f"--baseline-env {kv!r}: expected KEY=VALUE")
        base_env[key] = value
    bad = 0
    for seed in [int(s) for s in a.seeds.split(",") if s]:
        for stream in [s for s in a.streams.split(",") if s]:
            cur = _run(ROOT, stream, a.steps, seed, a.scenario, a.hash_seed, None, a.training_world)
            base = _run(a.baseline.resolve(), stream, a.steps, seed, a.scenario, a.hash_seed, base_env,
                        a.training_world)
            if cur["digest"] == base["digest"]:
                print(f"seed {seed} {stream:7s} {a.steps} steps: identical")
            else:
                first = next(i for i, (x, y) in enumerate(zip(cur["steps"], base["steps"])) if x != y)
                print(f"seed {seed} {stream:7s} {a.steps} steps: DIFFERENT from step {first}")
                bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
