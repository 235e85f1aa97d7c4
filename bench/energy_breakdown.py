"""Where a fixed plan's energy goes: GPU-seconds, joules, watts per GPU and busy GPU-seconds.

Runs static whole-model instances and the pack oracle's operator-level plan over a trace split
in the reference simulator, at the scenario's settings and with the contention factor, the
micro-batch choice (fixed at 2 instead of adaptive) or the micro-batch count changed
(docs/RESULTS.md, "Energy").

    python bench/energy_breakdown.py --split test

Units: GPU-seconds, megajoules, watts per paid GPU; busy GPU-seconds = the busy shares the
linear power model charges (energy minus idle power, over the busy-minus-idle watts).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agents.hindsight import pack_plan  # noqa: E402

from agents.baselines import StaticController  # noqa: E402
from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from agents.evaluate import run_timeline  # noqa: E402
from envs import SPLITS  # noqa: E402
from runtime.control import Plan  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("--instances", type=int, default=5, help="whole-model TP instances of the static plan")
    ap.add_argument("--pack", default="6x32,3,6", help="pack plan: ATTNxBATCH,PROJ,MLP")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    (a, b), proj, mlp = args.pack.split(",")[0].split("x"), *args.pack.split(",")[1:]
    variants = [("scenario", {}), ("contention 0", {"contention": 0.0}),
                ("fixed 2 micro-b.", {"micro_batching": "fixed"}), ("micro_batches 1", {"micro_batches": 1})]
    for label, over in variants:
        sc = load_scenario(None, **over)
        trace = load_split(sc, args.split)
        plans = [(f"static {args.instances}x tp{sc.model_tp}", Plan.model_level(args.instances, 256, int(sc.model_tp))),
                 (f"pack {args.pack}", pack_plan(sc, int(a), int(b), int(proj), int(mlp)))]
        for name, plan in plans:
            sim = make_sim(sc, trace, "reference", 0)
            s, _ = run_timeline(sim, StaticController(plan), plan)
            idle, busy = sim.pred.power_w(0.0), sim.pred.power_w(1.0)
            w = s["energy_j"] / s["gpu_seconds"]
            busy_gs = (s["energy_j"] - idle * s["gpu_seconds"]) / (busy - idle)
            print(f"{label:>16} | {name:<22} attainment {s['slo_attainment']:.4f}  GPU-s {s['gpu_seconds']:.0f}  "
                  f"{s['energy_j'] / 1e6:.2f} MJ  {w:.1f} W/GPU  busy GPU-s {busy_gs:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
