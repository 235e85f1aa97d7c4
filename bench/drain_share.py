"""How much of a controller's GPU bill is draining attention units, under two accountings.

The simulators pack every plan from scratch and charge each draining attention unit its own
GPUs (unit tp each; envs/cluster.py ``ClusterTimeline.gpus``), even where the packed layout
had put several attention replicas on one GPU (docs/SIMULATOR.md, "Assumptions and limits").
This replays controllers in the reference simulator and, for every accounting span, also
computes what the draining units would cost if they were packed like the rest of the plan
(the target plan with the draining units added as attention replicas, placed by the same
best fit). GPU counting does not feed back into the run, so both accountings describe the
same trajectory; the second is the optimistic bound consistent with the fresh packing of
every target plan, the first (what every result uses) the pessimistic one.

    python bench/drain_share.py --split test --controllers static,operator-queueing,ppo

Units: GPUs averaged over the split's simulated time; ratios to static's GPU-hours.
"""
from __future__ import annotations

import argparse
import sys
import types
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from agents.evaluate import run_timeline  # noqa: E402
from agents.registry import make_controller  # noqa: E402
from envs import SPLITS  # noqa: E402
from envs.world import _plan_key  # noqa: E402


def packed_drain_gpus(sim, layout, draining: int) -> int:
    """GPUs beyond ``layout`` if ``draining`` attention units were packed with its plan."""
    plan = layout.plan
    if plan["attn"].placement == "model" or draining <= 0:
        return draining * max(layout.unit_tp, 1)   # whole-model instances: nothing to pack
    more = plan.with_op("attn", replicas=plan["attn"].replicas + draining)
    return max(sim.placer.place(more).n_gpus - layout.n_gpus, 0)


def replay(sim, controller, plan0) -> dict[str, float]:
    """Run ``controller`` and return its summary with both drain accountings (GPU-seconds)."""
    acc = {"charged": 0.0, "packed": 0.0}
    base_account = sim.account
    memo: dict[tuple, int] = {}

    def account(self, t, util=None):
        span = t - self._acc_t
        tl = self.timeline
        if span > 0 and tl is not None and tl.draining_units:
            paid = tl.gpus(self._acc_t)
            charged = min(tl.draining_units * max(tl.target.unit_tp, 1), max(paid - tl.target.n_gpus, 0))
            key = (_plan_key(tl.target.plan), tl.draining_units)
            if key not in memo:
                memo[key] = packed_drain_gpus(self, tl.target, tl.draining_units)
            acc["charged"] += charged * span
            acc["packed"] += min(memo[key], charged) * span
        return base_account(t, util)

    sim.account = types.MethodType(account, sim)
    summary, _ = run_timeline(sim, controller, plan0)
    return {**summary, "drain_charged_s": acc["charged"], "drain_packed_s": acc["packed"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("--controllers", default="static,operator-queueing,ppo")
    ap.add_argument("--checkpoint", default="checkpoints/ppo-default")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    sc = load_scenario(None)
    trace = load_split(sc, args.split)
    rows = {}
    for name in args.controllers.split(","):
        ctl, plan0 = make_controller(name, sc, trace=trace, checkpoint=args.checkpoint if name == "ppo" else None)
        rows[name] = replay(make_sim(sc, trace, "reference", 0), ctl, plan0)
    static = rows.get("static")
    print(f"split {args.split}, reference simulator")
    print("| controller | attainment | avg GPUs | draining (charged) | draining (if packed) | avg GPUs if packed "
          "| GPU-h / static | if packed |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        dur = r["sim_time_s"]
        gs, gp = r["gpu_seconds"], r["gpu_seconds"] - r["drain_charged_s"] + r["drain_packed_s"]
        ratio = (f"{gs / static['gpu_seconds']:.3f} | {gp / static['gpu_seconds']:.3f}" if static else "- | -")
        print(f"| {name} | {r['slo_attainment']:.4f} | {gs / dur:.2f} | {r['drain_charged_s'] / dur:.2f} | "
              f"{r['drain_packed_s'] / dur:.2f} | {gp / dur:.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
