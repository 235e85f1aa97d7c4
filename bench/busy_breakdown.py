"""Where a controller's energy goes, process by process: busy GPU-seconds per operator group.

The power model charges each paid GPU ``idle + (busy - idle) * u`` watts, u the summed busy share
of the replica shards on it (capped at 1; envs/base.py ``account``). This bench runs controllers
over a trace split in the reference simulator, exactly as ``agents.evaluate`` does, and splits
what ``account`` charges into

* idle GPU-seconds (every paid GPU, busy or not: the ``idle`` term), and
* busy GPU-seconds per process (``model`` for whole-model instances, else the operator group):
  for every GPU and every shard on it, the process's busy share times the span; where a GPU's
  shares sum above 1 they are scaled down to the cap, as the power model does;

so that ``energy = idle W x GPU-s + (busy W - idle W) x sum of busy GPU-s`` (checked against the
simulator's own joules, printed as ``check``). It also prints the average number of replica
shards each process kept and its busy share per shard.

    python bench/busy_breakdown.py --split test --controllers static,ppo --checkpoint checkpoints/ppo-default

Units: GPU-seconds, megajoules; shares are fractions of each shard's time.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from agents.evaluate import metrics, run_timeline  # noqa: E402
from agents.registry import make_controller  # noqa: E402
from envs import SPLITS  # noqa: E402
from runtime.colocation import gpu_busy  # noqa: E402


class BusyMeter:
    """Wraps a simulator's ``account`` and adds up, per process, the busy GPU-seconds and shard-seconds
    it charges (the simulator's own numbers are unchanged)."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.busy_gs: dict[str, float] = defaultdict(float)    # busy GPU-seconds, after the cap
        self.shard_s: dict[str, float] = defaultdict(float)    # replica-shard-seconds on serving GPUs
        self.paid_gs = 0.0
        self._orig = sim.account
        sim.account = self.account

    def account(self, t: float, util: dict[str, float] | None = None) -> None:
        sim = self.sim
        span = t - sim._acc_t
        if span > 0:
            u_by = sim.util if util is None else util
            self.paid_gs += sim.timeline.gpus(sim._acc_t) * span
            for c in sim.serving_layout(sim._acc_t).gpus:
                u = gpu_busy(c.procs, u_by)
                scale = 1.0 / u if u > 1.0 else 1.0
                for proc, k in c.procs.items():
                    self.busy_gs[proc] += c.count * k * u_by.get(proc, 0.0) * scale * span
                    self.shard_s[proc] += c.count * k * span
        self._orig(t, util)


def breakdown(name: str, scenario: Any, split: str, checkpoint: str | None,
              window_s: float | None = None) -> dict[str, Any]:
    """Runs ``name`` over ``split`` (its first ``window_s`` seconds if given; reference simulator)
    and returns its metrics plus the split of its busy time."""
    trace = load_split(scenario, split, window_s)
    sim = make_sim(scenario, trace, "reference", 0)
    meter = BusyMeter(sim)
    ctl, plan0 = make_controller(name, scenario, slo=sim.slo, trace=trace, checkpoint=checkpoint,
                                 fidelity="reference", seed=0)
    summary, tl = run_timeline(sim, ctl, plan0)
    m = metrics(summary, tl, scenario.attainment_target)
    idle_w, busy_w = sim.pred.power_w(0.0), sim.pred.power_w(1.0)
    busy_total = sum(meter.busy_gs.values())
    model_j = idle_w * float(summary["gpu_seconds"]) + (busy_w - idle_w) * busy_total
    dur = m["duration_s"]
    return {
        "controller": name, "attainment": m["slo_attainment"], "avg_gpus": m["avg_gpus"],
        "gpu_seconds": float(summary["gpu_seconds"]), "energy_mj": float(summary["energy_j"]) / 1e6,
        "check": model_j / float(summary["energy_j"]),
        "busy_gpu_s": dict(meter.busy_gs), "busy_total_gpu_s": busy_total,
        "avg_shards": {p: v / dur for p, v in meter.shard_s.items()},
        "share_per_shard": {p: meter.busy_gs[p] / v for p, v in meter.shard_s.items() if v > 0},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("--controllers", default="static,ppo")
    ap.add_argument("--checkpoint", default=None, help="policy folder for ppo")
    ap.add_argument("--scenario", default=None, help="scenario YAML (default envs/configs/default.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="scenario override, e.g. micro_batches=1 (YAML value syntax)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import yaml

    over = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        over[key] = yaml.safe_load(value)
    sc = load_scenario(args.scenario, **over)
    rows = []
    for name in args.controllers.split(","):
        r = breakdown(name, sc, args.split, args.checkpoint)
        rows.append(r)
        print(f"{name}: attainment {r['attainment']:.4f}  avg GPUs {r['avg_gpus']:.2f}  GPU-s {r['gpu_seconds']:.0f}  "
              f"{r['energy_mj']:.3f} MJ  busy GPU-s {r['busy_total_gpu_s']:.0f}  (check {r['check']:.4f})")
        for p in sorted(r["busy_gpu_s"], key=lambda q: -r["busy_gpu_s"][q]):
            print(f"    {p:>6}: busy GPU-s {r['busy_gpu_s'][p]:8.0f}  avg shards {r['avg_shards'][p]:6.2f}  "
                  f"busy share per shard {r['share_per_shard'][p]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"split": args.split, "overrides": over, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
