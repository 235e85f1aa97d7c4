"""``python -m envs.validate``: the fast model against the discrete-event reference.

Two checks (``--check grid|changing|all``):

* grid: arrival-rate multiples x kept plans (whole-model, hybrid, disaggregated, packed),
  plus one run with scripted plan changes, through both fidelities over the same trace
  window: relative error of the fast model's run-level TTFT and TBT p50/p99, mean GPUs.
* changing: operator-level plans that change often (a seeded random walk over packed
  pools, and the plans the operator-queueing and PPO controllers chose, recorded closed-loop
  in one fidelity) replayed open-loop, interval by interval, through both fidelities on the
  held-out split: attainment, TTFT / TBT p50 / p99 and GPU-seconds.

The tables in docs/SIMULATOR.md come from here.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.control import OperatorPlan, Plan
from runtime.models import OPERATOR_GROUPS

from envs.scenario import Scenario

METRICS = ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s")
#: targets of the issue: 10% on p50, 20% on p99
TARGETS = {"ttft_p50_s": 0.10, "ttft_p99_s": 0.20, "tbt_p50_s": 0.10, "tbt_p99_s": 0.20}


def grid_plans(sc: Scenario) -> dict[str, Plan]:
    """The plans of the sweep: 16/24/32-GPU whole-model, a hybrid, two disaggregated ones, and
    the PPO recipe's packed start plan (agents/configs/ppo.yaml: 16 attention replicas of batch
    16, proj 3, mlp 6; two GPUs hold two attention replicas each, so packed replicas of one
    group contend there)."""
    mono6 = Plan.model_level(6, 64, sc.model_tp)
    dis = {"embed": 1, "attn": 8, "proj": 4, "mlp": 6, "head": 1}
    start = {"embed": 1, "attn": 16, "proj": 3, "mlp": 6, "head": 1}
    return {
        "model x4": Plan.model_level(4, 64, sc.model_tp),
        "model x6": mono6,
        "model x8": Plan.model_level(8, 64, sc.model_tp),
        "model x6 + mlp x4 dedicated": mono6.with_op("mlp", replicas=4, placement="dedicated", tp=sc.tp["mlp"]),
        "disaggregated": sc.disaggregated_plan(dis, 64, "dedicated"),
        "disaggregated, packed": sc.disaggregated_plan(dis, 64, "pack"),
        "packed, PPO start plan": Plan({g: OperatorPlan(start[g], 16 if g == "attn" else 256, "pack",
                                                        int(sc.tp[g])) for g in OPERATOR_GROUPS}),
    }


@dataclass
class Cell:
    """One (plan, rate) comparison."""

    plan: str
    rate: float
    reference: dict
    fast: dict

    def error(self, metric: str) -> float:
        """Relative error of the fast model (fast - reference) / reference."""
        r = self.reference[metric]
        return (self.fast[metric] - r) / r if r > 0 else 0.0

    @property
    def in_range(self) -> bool:
        """The reference is not overloaded (attainment >= 0.9): the regime a controller aims for."""
        return self.reference["slo_attainment"] >= 0.9


def run_grid(sc: Scenario | None = None, rates: Sequence[float] = (0.5, 1.0, 1.5), t0: float = 600.0,
             duration_s: float = 900.0, plans: dict[str, Plan] | None = None) -> list[Cell]:
    """Both fidelities over ``[t0, t0 + duration_s)`` of the scenario trace at each rate and plan."""
    from envs import make_simulator, scenario_trace

    sc = sc or Scenario.from_yaml()
    plans = plans or grid_plans(sc)
    cells = []
    for rate in rates:
        s = sc.replace(rate_scale=float(rate))
        tr = scenario_trace(s).window(t0, t0 + duration_s)
        for name, plan in plans.items():
            out = {}
            for fid in ("reference", "fast"):
                sim = make_simulator(s, tr, fidelity=fid)
                sim.reset(plan)
                while not sim.done:
                    sim.step(None)
                out[fid] = sim.summary()
            cells.append(Cell(name, float(rate), out["reference"], out["fast"]))
    return cells


def scripted_plan(sc: Scenario, k: int) -> Plan:
    """A plan that changes every 2 minutes: 8, 4, 6, 3, 8, 5 instances, the MLP moving out to a
    dedicated TP2 pool in every other phase (scale-ups, drains and blue/green switches)."""
    seq = (8, 4, 6, 3, 8, 5)
    phase = int(k * sc.interval_s // 120)
    n = seq[phase % len(seq)]
    plan = Plan.model_level(n, 64, sc.model_tp)
    if phase % 2 == 1:
        plan = plan.with_op("mlp", replicas=n, placement="dedicated", tp=sc.tp["mlp"])
    return plan


def run_dynamic(sc: Scenario | None = None, t0: float = 600.0, duration_s: float = 900.0) -> Cell:
    """Both fidelities under :func:`scripted_plan` over the same window."""
    from envs import make_simulator, scenario_trace

    sc = sc or Scenario.from_yaml()
    tr = scenario_trace(sc).window(t0, t0 + duration_s)
    out = {}
    for fid in ("reference", "fast"):
        sim = make_simulator(sc, tr, fidelity=fid)
        sim.reset(scripted_plan(sc, 0))
        k = 0
        while not sim.done:
            sim.step(scripted_plan(sc, k))
            k += 1
        out[fid] = sim.summary()
    return Cell("scripted plan changes", float(sc.rate_scale), out["reference"], out["fast"])


# ---------------------------------------------------------------------------------------------
# Changing plans
# ---------------------------------------------------------------------------------------------

#: replica bounds of the random walk per group (packed pools; attention at max_batch 64)
WALK_BOUNDS = {"embed": (1, 4), "attn": (3, 12), "proj": (2, 8), "mlp": (3, 10), "head": (1, 4)}
WALK_START = {"embed": 1, "attn": 8, "proj": 3, "mlp": 6, "head": 1}
#: targets of the changing-plan check: attainment within 0.02 (absolute), p99s within 20%
CHANGING_TARGETS = {"slo_attainment": 0.02, "ttft_p99_s": 0.20, "tbt_p99_s": 0.20}
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "ppo-default"


def random_walk_plans(sc: Scenario, n: int, seed: int = 0, p_change: float = 0.5,
                      bounds: dict[str, tuple[int, int]] | None = None) -> list[Plan]:
    """``n`` plans, one per interval: packed operator pools whose replica counts take a seeded
    random walk (each interval, with probability ``p_change``, one group moves by -4, -1, +1
    or +4 replicas within ``bounds``). Plan 0 is the start (attn 8 x 64, proj 3, mlp 6 at the
    scenario's tp, embed 1, head 1)."""
    bounds = bounds or WALK_BOUNDS
    rng = np.random.default_rng(seed)
    reps = dict(WALK_START)
    plans = []
    for _ in range(n):
        plans.append(sc.disaggregated_plan(reps, 64, "pack"))
        if rng.random() < p_change:
            g = OPERATOR_GROUPS[int(rng.integers(len(OPERATOR_GROUPS)))]
            lo, hi = bounds[g]
            reps[g] = int(min(max(reps[g] + int(rng.choice((-4, -1, 1, 4))), lo), hi))
    return plans


def controller_plans(sc: Scenario, trace, name: str, fidelity: str = "reference",
                     checkpoint: str | Path | None = None, seed: int = 0) -> list[Plan]:
    """The plans controller ``name`` (``agents.registry``) chooses interval by interval when it
    drives the ``fidelity`` simulator over ``trace``: plan 0 is its starting plan, plan k the
    one it applied at step k."""
    from agents.registry import make_controller
    from envs import make_simulator

    ctl, plan0 = make_controller(name, sc, trace=trace, checkpoint=checkpoint, fidelity=fidelity, seed=seed)
    sim = make_simulator(sc, trace, fidelity=fidelity, seed=seed)
    state = sim.reset(plan0)
    ctl.reset(state)
    plans = [plan0]
    while not sim.done:
        plan = ctl.decide(state)
        plans.append(plan)
        state = sim.step(plan)
    return plans


def changes_per_interval(plans: Sequence[Plan]) -> float:
    """Share of intervals whose plan differs from the previous one."""
    if len(plans) < 2:
        return 0.0
    return sum(1 for a, b in zip(plans, plans[1:]) if a != b) / (len(plans) - 1)


def replay(sc: Scenario, trace, plans: Sequence[Plan], fidelity: str, seed: int = 0) -> dict:
    """Summary of one fidelity over ``trace`` under a plan sequence replayed open-loop
    (``plans[0]`` loaded at t=0, ``plans[k]`` applied at step k, the last one kept once the list
    runs out)."""
    from envs import make_simulator

    sim = make_simulator(sc, trace, fidelity=fidelity, seed=seed)
    sim.reset(plans[0])
    k = 1
    while not sim.done:
        sim.step(plans[min(k, len(plans) - 1)])
        k += 1
    return sim.summary()


def run_sequence(sc: Scenario, trace, plans: Sequence[Plan], name: str, seed: int = 0) -> Cell:
    """Both fidelities over ``trace`` under the same plan sequence (:func:`replay`)."""
    return Cell(name, float(sc.rate_scale), replay(sc, trace, plans, "reference", seed),
                replay(sc, trace, plans, "fast", seed))


def changing_streams(sc: Scenario, trace, seed: int = 0, checkpoint: str | Path | None = None,
                     controllers: Sequence[str] = ("operator-queueing", "ppo")) -> dict[str, list[Plan]]:
    """The plan sequences of the changing-plan check (see module docstring). The PPO policy's
    plans are recorded in both fidelities (the fast model is where it trained; the reference is
    where it is judged); controllers that fail to build (e.g. no checkpoint) are skipped."""
    n = int(np.ceil(trace.duration_s / sc.interval_s)) + 1
    streams = {f"random walk (seed {seed})": random_walk_plans(sc, n, seed)}
    ckpt = checkpoint or DEFAULT_CHECKPOINT
    for name in controllers:
        fids = ("fast", "reference") if name == "ppo" else ("reference",)
        for fid in fids:
            try:
                streams[f"{name} (recorded in {fid})"] = controller_plans(
                    sc, trace, name, fidelity=fid, checkpoint=ckpt if name == "ppo" else None, seed=seed)
            except (ValueError, FileNotFoundError) as e:
                print(f"changing-plan check: {name} skipped: {e}", file=sys.stderr)
    return streams


def run_changing(sc: Scenario | None = None, split: str = "test", seed: int = 0,
                 checkpoint: str | Path | None = None,
                 controllers: Sequence[str] = ("operator-queueing", "ppo")) -> list[Cell]:
    """The changing-plan check: every stream of :func:`changing_streams` through both fidelities
    on the scenario's ``split``."""
    from envs import scenario_trace

    sc = sc or Scenario.from_yaml()
    tr = scenario_trace(sc, split)
    cells = []
    for name, plans in changing_streams(sc, tr, seed, checkpoint, controllers).items():
        c = run_sequence(sc, tr, plans, name, seed)
        c.reference["changes"] = c.fast["changes"] = changes_per_interval(plans)
        cells.append(c)
    return cells


def markdown_changing(cells: list[Cell]) -> str:
    """The changing-plan table: attainment (difference), TTFT/TBT p50/p99 and GPU-seconds
    (relative error), reference / fast."""
    lines = ["| plan stream | changes / interval | attainment ref / fast (diff) | "
             + " | ".join(f"{m[:-2]} ref / fast (err)" for m in METRICS) + " | GPU-s ref / fast (err) |",
             "|" + "---|" * (4 + len(METRICS))]
    for c in cells:
        ar, af = c.reference["slo_attainment"], c.fast["slo_attainment"]
        vals = " | ".join(f"{c.reference[m]:.3f} / {c.fast[m]:.3f} ({c.error(m) * 100:+.0f}%)" for m in METRICS)
        lines.append(f"| {c.plan} | {c.reference.get('changes', 0.0):.2f} | {ar:.3f} / {af:.3f} ({af - ar:+.3f}) | "
                     f"{vals} | {c.reference['gpu_seconds']:.0f} / {c.fast['gpu_seconds']:.0f} "
                     f"({c.error('gpu_seconds') * 100:+.0f}%) |")
    return "\n".join(lines)


def markdown(cells: list[Cell]) -> str:
    """The error table (reference value, fast value, relative error) as Markdown."""
    head = ("| plan | rate | ref. attain. | " + " | ".join(f"{m[:-2]} ref / fast (err)" for m in METRICS)
            + " | GPUs |")
    lines = [head, "|" + "---|" * (4 + len(METRICS))]
    for c in cells:
        vals = " | ".join(f"{c.reference[m]:.3f} / {c.fast[m]:.3f} ({c.error(m) * 100:+.0f}%)" for m in METRICS)
        mark = "" if c.in_range else " (overloaded)"
        gpus = f"{c.reference['mean_gpus']:.1f} / {c.fast['mean_gpus']:.1f}" \
            if abs(c.reference["mean_gpus"] - c.fast["mean_gpus"]) > 0.05 else f"{c.reference['mean_gpus']:.0f}"
        lines.append(f"| {c.plan}{mark} | {c.rate:g}x | {c.reference['slo_attainment']:.3f} | {vals} | {gpus} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m envs.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument("--t0", type=float, default=600.0)
    p.add_argument("--duration", type=float, default=900.0)
    p.add_argument("--check", choices=("grid", "changing", "all"), default="all",
                   help="kept-plan grid, changing-plan check, or both")
    p.add_argument("--split", default="test", help="trace split of the changing-plan check")
    p.add_argument("--seed", type=int, default=0, help="seed of the random walk and the simulators")
    p.add_argument("--checkpoint", default=None, help="PPO checkpoint of the changing-plan check "
                   "(default checkpoints/ppo-default)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    keys = METRICS + ("slo_attainment", "gpu_seconds", "mean_gpus")
    out = []
    if a.check in ("grid", "all"):
        cells = run_grid(rates=a.rates, t0=a.t0, duration_s=a.duration)
        cells.append(run_dynamic(t0=a.t0, duration_s=a.duration))
        out.append(("grid", cells, markdown))
    if a.check in ("changing", "all"):
        out.append(("changing", run_changing(split=a.split, seed=a.seed, checkpoint=a.checkpoint),
                    markdown_changing))
    if a.json:
        print(json.dumps({check: [{"plan": c.plan, "rate": c.rate, "errors": {m: c.error(m) for m in keys},
                                   "reference": {m: c.reference[m] for m in keys},
                                   "fast": {m: c.fast[m] for m in keys}} for c in cells]
                          for check, cells, _ in out}, indent=2, default=float))
    else:
        print("\n\n".join(fmt(cells) for _, cells, fmt in out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
