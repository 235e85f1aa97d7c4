"""Calibrate the fast model's drain time of removed attention units against the reference.

The fast model cannot see which sequences a removed attention unit holds, so it gives the unit's
GPUs back after ``drain_residual`` x the recent p99 output length in decode iterations; the
reference gives them back when the unit's last sequence finishes (envs/fast.py,
``_schedule_drain``). The drain time only moves GPU-seconds and energy (the draining sequences
finish at their own pace either way), so this compares GPU-seconds: each plan stream is replayed
open-loop once in the reference and, for every candidate value, in the fast model.

Streams (envs/validate.py's changing-plan check, plus one that scales attention down often):
the random walk, the operator-queueing controller's plans and ``ppo-default``'s (recorded in the
reference), and the hindsight schedule of bench/hindsight_oracle.py over a pack grid.

    python bench/drain_calibration.py --split trainval --values 1.0,0.75,0.5,0.35,0.25

Units: GPU-seconds; errors relative to the reference.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.hindsight import greedy_schedule, pack_plan  # noqa: E402
from envs import SPLITS, make_simulator, scenario_trace  # noqa: E402
from envs.scenario import Scenario  # noqa: E402
from envs.validate import controller_plans, random_walk_plans, replay  # noqa: E402


def streams(sc: Scenario, trace, checkpoint: Path) -> dict[str, list]:  # noqa: ANN001
    """The plan streams of the module docstring (the hindsight one searched at drain_residual 1;
    the policy's plans from ``checkpoint``)."""
    n = int(trace.duration_s // sc.interval_s) + 2
    out = {"random walk (seed 0)": random_walk_plans(sc, n, 0),
           "operator-queueing": controller_plans(sc, trace, "operator-queueing"),
           "ppo-default": controller_plans(sc, trace, "ppo", checkpoint=checkpoint)}
    menu = [pack_plan(sc, a, 16, p, m, 4, 4) for a in (6, 8, 10, 12, 16, 20) for p in (2, 3, 4, 5, 6, 8)
            for m in (3, 4, 5, 6, 8, 10, 12)]
    probe = make_simulator(sc, trace, fidelity="fast", seed=0)
    menu.sort(key=lambda p: probe.placer.place(p).n_gpus)
    fast = make_simulator(sc.replace(drain_residual=1.0), trace, fidelity="fast", seed=0)
    fast.reset(menu[-1])
    schedule, _ = greedy_schedule(fast, menu, 0.99, 2)
    out["hindsight schedule (grid)"] = [menu[-1]] + schedule
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="trainval", choices=SPLITS)
    ap.add_argument("--values", default="1.0,0.75,0.5,0.35,0.25", help="drain_residual values, comma-separated")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "ppo-default",
                    help="policy whose recorded plans make the 'ppo-default' stream")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    try:
        values = [float(v) for v in args.values.split(",") if v]
    except ValueError:
        ap.error(f"--values {args.values!r}: expected numbers separated by commas")
    base = Scenario.from_yaml()
    trace = scenario_trace(base, args.split)
    t0 = time.time()
    plans = streams(base, trace, args.checkpoint)
    ref = {name: replay(base, trace, p, "reference")["gpu_seconds"] for name, p in plans.items()}
    print(f"{args.split}: {len(plans)} streams, reference replayed ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for v in values:
        sc = base.replace(drain_residual=v)
        errs = {}
        for name, p in plans.items():
            fast = replay(sc, trace, p, "fast")["gpu_seconds"]
            errs[name] = fast / ref[name] - 1.0
        mean_abs = sum(abs(e) for e in errs.values()) / len(errs)
        rows.append({"drain_residual": v, "gpu_seconds_error": errs, "mean_abs_error": mean_abs})
        print(f"drain_residual {v:g}: mean |GPU-s error| {100 * mean_abs:.1f} %  "
              + "  ".join(f"{n}: {100 * e:+.1f} %" for n, e in errs.items()), flush=True)
    best = min(rows, key=lambda r: r["mean_abs_error"])
    print(f"lowest mean |error| on {args.split}: drain_residual {best['drain_residual']:g}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"split": args.split, "reference_gpu_seconds": ref, "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
