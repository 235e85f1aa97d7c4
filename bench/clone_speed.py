"""How long copying a fast simulator takes, and a hindsight teacher's decision.

Usage: ``python bench/clone_speed.py [--intervals 100] [--rounds 3] [--baseline DIR] [--json]``

The hindsight oracle (bench/hindsight_oracle.py) and the behaviour-cloning teacher
(agents/hindsight.py ``HindsightTeacher``) try plans in copies of the fast simulator, so a copy's
cost sets theirs. Per round, in a fresh process per tree (``--baseline DIR``: another checkout,
e.g. ``git archive`` unpacked, measured interleaved with this one so load hits both alike):

* ``clone_us``: microseconds per ``clone`` of a fast simulator on the default scenario's train
  split after ``--intervals`` intervals of alternating plans (its records grow with the run);
* ``decide_s``: seconds per decision of a ``HindsightTeacher`` (the session-14 grid, tau 0.9999,
  window 2) over 40 intervals of one training-env episode.

Medians over rounds and, with a baseline, the ratios baseline / current measured in the same run.
Times are this machine's (shared and noisy): read the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from intree import run_in_tree

ROOT = Path(__file__).resolve().parents[1]


def _worker(intervals: int) -> dict[str, float]:
    import time

    from agents.envtools import env_prev_plan, env_state, load_scenario, load_split, make_sim
    from agents.hyperparams import HindsightTeacherConfig, load_hyperparams
    from agents.imitation import collect_demonstrations
    from agents.training import _env_factory, hindsight_teacher
    from runtime.codec import ActionDecoder

    try:
        from agents.hindsight import clone, pack_plan
    except ImportError:  # trees before session 14 kept them in bench/
        sys.path.insert(0, str(Path.cwd() / "bench"))
        from hindsight_oracle import clone  # type: ignore[no-redef]
        from pack_frontier import pack_plan  # type: ignore[no-redef]

    sc = load_scenario()
    sim = make_sim(sc, load_split(sc, "train").window(0.0, 5.0 * (intervals + 10)), "fast", 0)
    big, small = pack_plan(sc, 16, 16, 5, 8, 4, 4), pack_plan(sc, 10, 16, 3, 5, 4, 4)
    sim.reset(big)
    for k in range(intervals):
        sim.step(big if k % 3 else small)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        clone(sim)
    out = {"clone_us": (time.perf_counter() - t0) / n * 1e6}
    short = sc.replace(episode_intervals=40)
    hp = load_hyperparams()
    env = _env_factory(short, "train", 10_000, None, {"initial_plan": hp.initial_plan, "freeze_layout": True})()
    teacher = hindsight_teacher(HindsightTeacherConfig(tau=0.9999, window=2), short, env.unwrapped.pred,
                                lambda: env.unwrapped.sim)
    t0 = time.perf_counter()
    demos = collect_demonstrations(env, teacher, ActionDecoder(short.codec_config), 1, env_state, seed=0,
                                   prev_plan_of=env_prev_plan)
    out["decide_s"] = (time.perf_counter() - t0) / len(demos)
    return out


def _run(root: Path, intervals: int) -> dict[str, float]:
    return run_in_tree(root, "clone_speed", f"_worker({intervals})", "clone_speed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--intervals", type=int, default=100, help="intervals run before the copies are timed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", type=Path, default=None, help="another checkout, measured interleaved")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.intervals < 1 or a.rounds < 1:
        p.error("--intervals and --rounds must be at least 1")
    trees = {"current": ROOT}
    if a.baseline is not None:
        if not (a.baseline / "envs" / "fast.py").is_file():
            p.error(f"--baseline {a.baseline}: no envs/fast.py there")
        trees["baseline"] = a.baseline.resolve()
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
    for _ in range(a.rounds):
        for name, root in trees.items():
            runs[name].append(_run(root, a.intervals))
    res = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in runs.items()}
    if "baseline" in res:
        res["speedup"] = {k: res["baseline"][k] / res["current"][k] for k in res["current"]}
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for t, v in res.items():
            print(f"{t:9s} " + "  ".join(f"{k} {x:.4g}" for k, x in v.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
