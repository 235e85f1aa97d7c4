"""What one new serving plan costs the fast env, part by part, against another checkout.

Usage: ``python bench/plan_cost.py [--steps 1500] [--rounds 3] [--baseline DIR] [--json]``

Early in training (train.py's stream: random replica counts of attention, projections and MLP
under the frozen layout, embed and head frozen too; bench/env_speed.py's ``train``) almost every
env step meets plans it has never placed (1.84 new placements a step in session 29;
docs/SIMULATOR.md "Speed"), and each costs the same four things before the compiled sub-steps run: placing it on GPUs
(``Placer.place``), its step model (``StepModel``), the step model's compiled structure
(``stepkernel.StepKernel``) and the co-residence slowdowns at the current busy shares
(``StepKernel.slow_for``). This bench records the distinct plans the placer sees in ``--steps``
steps of that stream, then times each part over all of them (a fresh placer, step models sharing
one structure table where the tree has one, Python's cyclic collector off so its pauses do not
land on whichever part allocates; best of 5 passes) and prints microseconds per plan.

With ``--baseline DIR`` each round also runs DIR's ``envs`` in its own process, interleaved, and
the speed-up of each part is printed (medians over rounds): the one-run ratio this machine's noise
allows, where an env-level A/B (bench/env_speed.py) cannot resolve a few per cent.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from intree import run_in_tree

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("place", "step_model", "kernel", "slowdowns")


def measure(steps: int, seed: int = 0, passes: int = 5) -> dict:
    """Microseconds per distinct plan of each part (see module doc), plus ``plans`` (how many)."""
    import gc
    import inspect

    import env_speed
    from envs import stepkernel
    from envs.world import Placer, StepModel

    wrapped = env_speed._train_env(seed)
    env = wrapped.unwrapped
    wrapped.reset(seed=seed)
    rng = np.random.default_rng(seed)
    seen: dict[tuple, object] = {}
    placer = env.sim.placer
    place = placer.place

    def recording(plan):  # noqa: ANN001, ANN202
        seen.setdefault(tuple((g, o.replicas, o.max_batch, o.placement, o.tp) for g, o in plan.ops.items()), plan)
        return place(plan)

    placer.place = recording
    for _ in range(steps):
        a = env_speed._masked_random(rng, wrapped.action_masks(), env.action_space.nvec)
        _, _, term, trunc, _ = wrapped.step(a)
        if term or trunc:
            wrapped.reset()
    placer.place = place
    plans = list(seen.values())
    sim = env.sim
    shared = "shapes" in inspect.signature(StepModel.__init__).parameters
    compiled = stepkernel.ENABLED
    best = np.full(len(PARTS), np.inf)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(passes):
            fresh = Placer(sim.sc, sim.pred)
            t0 = time.perf_counter()
            layouts = [fresh.place(p) for p in plans]
            t1 = time.perf_counter()
            shapes: dict = {}
            models = [StepModel(lay, sim.pred, sim.sc, shapes) if shared else StepModel(lay, sim.pred, sim.sc)
                      for lay in layouts]
            t2 = time.perf_counter()
            kernels = [stepkernel.StepKernel(m) for m in models] if compiled else []
            t3 = time.perf_counter()
            util = dict(sim.util)  # a new dict for each pass: nothing carried over
            if compiled:
                for k, m in zip(kernels, models):
                    k.slow_for(m, util)
            else:
                for m in models:
                    m.slowdowns(util)
            t4 = time.perf_counter()
            best = np.minimum(best, [t1 - t0, t2 - t1, t3 - t2, t4 - t3])
    finally:
        if enabled:
            gc.enable()
    per = best / max(len(plans), 1) * 1e6
    out = {part: float(v) for part, v in zip(PARTS, per)}
    out["total"] = float(per.sum())
    out["plans"] = len(plans)
    return out


def _run(root: Path, steps: int) -> dict:
    """:func:`measure` in a fresh process with ``root``'s code."""
    return run_in_tree(root, "plan_cost", f"measure({steps})", "plan_cost")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="steps of train.py's stream whose plans are timed")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to measure interleaved")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    trees = {"current": ROOT} | ({"baseline": a.baseline.resolve()} if a.baseline else {})
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(a.rounds):
        for name, root in trees.items():
            runs[name].append(_run(root, a.steps))
    med = {name: {k: float(np.median([r[k] for r in rs])) for k in (*PARTS, "total", "plans")}
           for name, rs in runs.items()}
    if a.json:
        print(json.dumps(med))
        return 0
    cur = med["current"]
    print(f"{int(cur['plans'])} distinct plans from {a.steps} steps of train.py's stream; us per plan "
          f"(median of {a.rounds} rounds, collector off)")
    for part in (*PARTS, "total"):
        line = f"  {part:11s} {cur[part]:7.1f}"
        if "baseline" in med:
            base = med["baseline"][part]
            line += f"   baseline {base:7.1f}   speed-up {base / cur[part]:.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
