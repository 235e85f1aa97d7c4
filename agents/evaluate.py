"""Evaluate controllers on the held-out trace in the reference simulator.

    python -m agents.evaluate --trace azure --split test \\
        --controllers static,model-level,operator-queueing,ppo \\
        [--checkpoint checkpoints] --json results.json --plots plots/

For each controller: SLO attainment, TTFT/TBT p50/p99, average and peak GPUs, GPU-hours,
energy (kWh) and ratios to static and to model-level; PNG plots of GPUs, attainment and
per-operator replicas over time. ``--budget-gpus N`` adds the fixed-budget view: the
highest request rate each controller sustains at the SLO with at most N GPUs (and its
ratio to model-level); with ``--budget-fill [RULE]`` every controller runs in fixed-budget
mode (its plans topped up to the N GPUs by RULE, agents/budget.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from agents.budget import FILL_RULES, BudgetFill, fill_plan, pack_gpu_counter
from agents.envtools import load_scenario, load_split, make_sim
from agents.registry import CONTROLLER_NAMES, controller_context, make_controller
from envs import SPLITS
from runtime.control import ClusterState, Controller, Plan
from runtime.models import OPERATOR_GROUPS

J_PER_KWH = 3.6e6


@dataclass
class Timeline:
    """Per control interval: time (s), GPUs in use, SLO attainment, replicas per group."""

    time_s: list[float] = field(default_factory=list)
    gpus: list[float] = field(default_factory=list)
    attainment: list[float] = field(default_factory=list)
    replicas: dict[str, list[int]] = field(default_factory=lambda: {g: [] for g in OPERATOR_GROUPS})

    def add(self, state: ClusterState) -> None:
        self.time_s.append(float(state.time_s))
        self.gpus.append(float(state.gpus_in_use))
        self.attainment.append(float(state.slo_attainment))
        for g in OPERATOR_GROUPS:
            self.replicas[g].append(int(state.plan[g].replicas))

    def to_dict(self) -> dict[str, Any]:
        return {"time_s": self.time_s, "gpus": self.gpus, "attainment": self.attainment, "replicas": self.replicas}


def run_timeline(sim: Any, controller: Controller, plan0: Plan, max_steps: int = 10_000_000,
                 decide_s: list[float] | None = None) -> tuple[dict[str, Any], Timeline]:
    """Drive ``sim`` with ``controller`` from ``plan0`` until the trace is served.

    Returns the simulator's summary and the per-interval timeline. When ``decide_s`` is a
    list, the wall-clock seconds of every ``decide`` call are appended to it.
    """
    state = sim.reset(plan0)
    controller.reset(state)
    tl = Timeline()
    steps = 0
    while not sim.done and steps < max_steps:
        t = time.perf_counter()
        plan = controller.decide(state)
        if decide_s is not None:
            decide_s.append(time.perf_counter() - t)
        state = sim.step(plan)
        tl.add(state)
        steps += 1
    return sim.summary(), tl


def metrics(summary: Mapping[str, Any], tl: Timeline, attainment_target: float) -> dict[str, float]:
    """The per-controller numbers of the evaluation table (units in the key names)."""
    duration = float(summary.get("sim_time_s") or (tl.time_s[-1] if tl.time_s else 0.0))
    gpu_s = float(summary["gpu_seconds"])
    out = {
        "slo_attainment": float(summary["slo_attainment"]),
        "meets_slo": bool(float(summary["slo_attainment"]) >= attainment_target),
        "ttft_p50_s": float(summary["ttft_p50_s"]),
        "ttft_p99_s": float(summary["ttft_p99_s"]),
        "tbt_p50_s": float(summary["tbt_p50_s"]),
        "tbt_p99_s": float(summary["tbt_p99_s"]),
        "avg_gpus": gpu_s / duration if duration > 0 else 0.0,
        "peak_gpus": float(max(tl.gpus)) if tl.gpus else 0.0,
        "gpu_hours": gpu_s / 3600.0,
        # GPUs still paid for attention units that drain their sequences after a scale-down
        "avg_draining_gpus": float(summary.get("drain_gpu_seconds", 0.0)) / duration if duration > 0 else 0.0,
        "energy_kwh": float(summary["energy_j"]) / J_PER_KWH,
        "duration_s": duration,
    }
    for k in ("requests", "finished", "rejected", "preemptions"):
        if k in summary:
            out[k] = summary[k]
    return out


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Add ``gpu_hours_vs_<ref>`` and ``energy_vs_<ref>`` for ref in static, model-level."""
    for ref in ("static", "model-level"):
        if ref not in results:
            continue
        key = ref.replace("-", "_")
        base = results[ref]
        for r in results.values():
            r[f"gpu_hours_vs_{key}"] = r["gpu_hours"] / base["gpu_hours"] if base["gpu_hours"] > 0 else math.nan
            r[f"energy_vs_{key}"] = r["energy_kwh"] / base["energy_kwh"] if base["energy_kwh"] > 0 else math.nan


def evaluate(controllers: Sequence[str], scenario: Any, split: str = "test", fidelity: str = "reference",
             checkpoint: str | None = None, seed: int = 0, window_s: float | None = None,
             log: Callable[[str], None] = print) -> tuple[dict[str, dict[str, Any]], dict[str, Timeline]]:
    """Run each controller over the same trace split; returns (results, timelines)."""
    trace = load_split(scenario, split, window_s)
    results: dict[str, dict[str, Any]] = {}
    timelines: dict[str, Timeline] = {}
    for name in controllers:
        t0 = time.time()
        sim = make_sim(scenario, trace, fidelity, seed)
        ctl, plan0 = make_controller(name, scenario, slo=sim.slo, trace=trace, checkpoint=checkpoint,
                                     fidelity=fidelity, seed=seed)
        decide_s: list[float] = []
        summary, tl = run_timeline(sim, ctl, plan0, decide_s=decide_s)
        m = metrics(summary, tl, scenario.attainment_target)
        m["decide_ms_p50"] = 1000 * float(np.median(decide_s)) if decide_s else 0.0
        m["decide_ms_p99"] = 1000 * float(np.percentile(decide_s, 99)) if decide_s else 0.0
        m["wall_s"] = time.time() - t0
        results[name], timelines[name] = m, tl
        log(f"{name:>18}: attainment {m['slo_attainment']:.4f}  avg GPUs {m['avg_gpus']:.2f}  "
            f"peak {m['peak_gpus']:.0f}  GPU-h {m['gpu_hours']:.2f}  kWh {m['energy_kwh']:.2f}  "
            f"TTFT p99 {m['ttft_p99_s']:.3f}s  TBT p99 {m['tbt_p99_s']:.3f}s  ({m['wall_s']:.0f} s)")
    add_ratios(results)
    return results, timelines


def budget_run(name: str, scenario: Any, budget_gpus: int, k: float, split: str, fidelity: str, window_s: float,
               checkpoint: str | None, seed: int = 0, fill: str | None = None) -> dict[str, float]:
    """One run of ``name`` at ``k`` x the scenario's rate with the cluster capped at
    ``budget_gpus`` (plans needing more are repaired by the simulator): the multiplier, SLO
    attainment, request rate (req/s) and peak GPUs. With ``fill`` (a rule of
    :data:`agents.budget.FILL_RULES`) the controller runs in fixed-budget mode
    (:class:`agents.budget.BudgetFill`: its starting plan and every plan it decides are topped
    up to the budget)."""
    sc = scenario.replace(max_gpus=int(budget_gpus), rate_scale=scenario.rate_scale * k)
    trace = load_split(sc, split, window_s)
    sim = make_sim(sc, trace, fidelity, seed)
    # Controllers see the uncapped scenario (the PPO codec normalises by its max_gpus);
    # the simulator enforces the budget by repairing plans that need more GPUs.
    ctl, plan0 = make_controller(name, scenario.replace(rate_scale=sc.rate_scale), slo=sim.slo, trace=trace,
                                 checkpoint=checkpoint, budget_gpus=budget_gpus, fidelity=fidelity, seed=seed)
    if fill:
        ctl, plan0 = budget_filled(ctl, plan0, scenario, sim.slo, budget_gpus, fill)
    summary, tl = run_timeline(sim, ctl, plan0)
    return {"k": k, "attainment": float(summary["slo_attainment"]),
            "rate_rps": len(trace) / max(trace.duration_s, 1e-9),
            "peak_gpus": float(max(tl.gpus)) if tl.gpus else 0.0}


def sustained_rate(name: str, scenario: Any, budget_gpus: int, split: str, fidelity: str, window_s: float,
                   checkpoint: str | None, lo: float, hi: float, iters: int, seed: int = 0,
                   fill: str | None = None) -> dict[str, Any]:
    """Highest rate multiplier in [lo, hi] at which ``name`` meets the SLO with ``budget_gpus`` GPUs.

    Bisection on the multiplier ``k`` of the scenario's rate (``rate_scale x k``), one
    :func:`budget_run` per point. Attainment need not fall monotonically with the rate (an
    autoscaler meets different bursts at different compressions), so the answer is one
    crossing of the target; :func:`sustained_on_grid` is the stricter alternative.
    Returns the multiplier, the request rate it means (req/s) and the runs tried.
    """
    tried: list[dict[str, float]] = []

    def ok(k: float) -> bool:
        tried.append(budget_run(name, scenario, budget_gpus, k, split, fidelity, window_s, checkpoint, seed, fill))
        return tried[-1]["attainment"] >= scenario.attainment_target

    best = 0.0
    if ok(lo):
        best = lo
        a, b = lo, hi
        if ok(hi):
            best = hi
        else:
            for _ in range(iters):
                mid = math.sqrt(a * b)
                if ok(mid):
                    a = best = mid
                else:
                    b = mid
    rate = next((t["rate_rps"] for t in tried if t["k"] == best), 0.0)
    return {"multiplier": best, "rate_rps": rate, "tried": tried, "method": "bisection"}


def sustained_from_curve(points: Sequence[Mapping[str, float]], target: float) -> float:
    """The highest multiplier ``k`` of ``points`` ({k, attainment}) such that attainment meets
    ``target`` there and at every lower ``k`` (0 when the lowest point misses)."""
    best = 0.0
    for p in sorted(points, key=lambda p: p["k"]):
        if p["attainment"] < target:
            break
        best = p["k"]
    return best


def sustained_on_grid(name: str, scenario: Any, budget_gpus: int, split: str, fidelity: str, window_s: float,
                      checkpoint: str | None, ks: Sequence[float], seed: int = 0,
                      fill: str | None = None) -> dict[str, Any]:
    """:func:`budget_run` at every multiplier of ``ks`` (the attainment-vs-rate curve); the
    answer is :func:`sustained_from_curve`: the last multiplier before the first miss."""
    tried = [budget_run(name, scenario, budget_gpus, float(k), split, fidelity, window_s, checkpoint, seed, fill)
             for k in sorted(ks)]
    best = sustained_from_curve(tried, scenario.attainment_target)
    rate = next((t["rate_rps"] for t in tried if t["k"] == best), 0.0)
    return {"multiplier": best, "rate_rps": rate, "tried": tried, "method": "grid"}


def budget_filled(ctl: Controller, plan0: Plan, scenario: Any, slo: Any, budget_gpus: int,
                  rule: str = "utilisation") -> tuple[Controller, Plan]:
    """``ctl`` and its starting plan in fixed-budget mode (agents/budget.py; the starting plan,
    decided before anything is measured, is filled in proportion under either rule)."""
    count = pack_gpu_counter(controller_context(scenario, slo))
    max_replicas = int(scenario.codec_config.max_replicas)
    return (BudgetFill(ctl, budget_gpus, count, max_replicas, rule),
            fill_plan(plan0, int(budget_gpus), count, max_replicas))


def fixed_budget(controllers: Sequence[str], scenario: Any, budget_gpus: int, split: str, fidelity: str,
                 window_s: float, checkpoint: str | None, lo: float = 0.25, hi: float = 4.0, iters: int = 5,
                 log: Callable[[str], None] = print, fill: str | None = None,
                 grid: Sequence[float] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`sustained_rate` (or, with ``grid``, :func:`sustained_on_grid` over those
    multipliers) for every controller, with ``throughput_vs_model_level`` (``fill``: every
    controller in fixed-budget mode with that rule, agents/budget.py)."""
    out = {}
    for name in controllers:
        if name == "static":
            continue  # at a fixed budget static and model-level both run budget / tp instances
        t0 = time.time()
        if grid:
            out[name] = sustained_on_grid(name, scenario, budget_gpus, split, fidelity, window_s, checkpoint, grid,
                                          fill=fill)
        else:
            out[name] = sustained_rate(name, scenario, budget_gpus, split, fidelity, window_s, checkpoint, lo, hi,
                                       iters, fill=fill)
        log(f"{name:>18}: sustains x{out[name]['multiplier']:.3f} of the scenario rate "
            f"({out[name]['rate_rps']:.2f} req/s) with {budget_gpus} GPUs ({time.time() - t0:.0f} s)")
    ref = out.get("model-level", {}).get("rate_rps", 0.0)
    for r in out.values():
        r["throughput_vs_model_level"] = r["rate_rps"] / ref if ref > 0 else math.nan
    return out


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of the headline numbers."""
    cols = [("slo_attainment", "attainment", "{:.4f}"), ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
            ("ttft_p99_s", "TTFT p99 s", "{:.3f}"), ("tbt_p50_s", "TBT p50 s", "{:.3f}"),
            ("tbt_p99_s", "TBT p99 s", "{:.3f}"), ("avg_gpus", "avg GPUs", "{:.2f}"),
            ("peak_gpus", "peak GPUs", "{:.0f}"), ("gpu_hours", "GPU-h", "{:.2f}"), ("energy_kwh", "kWh", "{:.2f}"),
            ("gpu_hours_vs_static", "GPU-h / static", "{:.3f}"), ("gpu_hours_vs_model_level", "GPU-h / model-level", "{:.3f}"),
            ("energy_vs_static", "kWh / static", "{:.3f}"), ("energy_vs_model_level", "kWh / model-level", "{:.3f}")]
    lines = ["| controller | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        cells = [fmt.format(r[k]) if k in r and r[k] is not None else "-" for k, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_grid(text: str) -> list[float]:
    """``"LO,HI,STEP"`` -> [LO, LO + STEP, ..., <= HI] (rounded to 6 digits); raises ValueError
    naming the problem."""
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"--budget-grid wants LO,HI,STEP, got {text!r}")
    try:
        lo, hi, step = (float(x) for x in parts)
    except ValueError:
        raise ValueError(f"--budget-grid wants three numbers LO,HI,STEP, got {text!r}") from None
    if not (0 < lo <= hi and step > 0):
        raise ValueError(f"--budget-grid needs 0 < LO <= HI and STEP > 0, got {text!r}")
    n = int(math.floor((hi - lo) / step + 1e-9))
    return [round(lo + i * step, 6) for i in range(n + 1)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agents.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default="azure", help="trace name or CSV path (default azure)")
    p.add_argument("--scenario", default=None, help="scenario YAML (default envs/configs/default.yaml)")
    p.add_argument("--model", default=None)
    p.add_argument("--gpu", default=None)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--controllers", default="static,model-level,operator-queueing,ppo",
                   help=f"comma-separated, from {', '.join(CONTROLLER_NAMES)}")
    p.add_argument("--checkpoint", default="checkpoints/ppo-default", help="checkpoint folder of the ppo controller")
    p.add_argument("--fidelity", default="reference", choices=["reference", "fast"])
    p.add_argument("--window-s", type=float, default=None, help="evaluate only the first WINDOW_S seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results (and timelines) to this JSON file")
    p.add_argument("--plots", default=None, help="write gpus.png, attainment.png, replicas.png here")
    p.add_argument("--budget-gpus", type=int, default=None, help="also run the fixed-budget view with N GPUs")
    p.add_argument("--budget-window-s", type=float, default=1800.0, help="trace seconds per fixed-budget run")
    p.add_argument("--budget-range", default="0.5,3.0", help="lowest,highest rate multiplier to search")
    p.add_argument("--budget-fidelity", default="reference", choices=["reference", "fast"])
    p.add_argument("--budget-grid", default=None, metavar="LO,HI,STEP",
                   help="fixed-budget view on a grid of rate multipliers instead of bisection: the highest "
                        "multiplier met there and at every lower grid point")
    p.add_argument("--budget-fill", nargs="?", const="utilisation", default=None, choices=FILL_RULES,
                   help="fixed-budget view in fixed-budget mode: every controller's plans are topped up to the "
                        "budget (agents/budget.py), by RULE (default utilisation, chosen on the val split)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [c.strip() for c in args.controllers.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONTROLLER_NAMES]
    if unknown:
        print(f"error: unknown controllers {unknown}; choose from {', '.join(CONTROLLER_NAMES)}", file=sys.stderr)
        return 2
    try:
        grid = parse_grid(args.budget_grid) if args.budget_grid else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in {"trace": args.trace, "model": args.model, "gpu": args.gpu}.items() if v}
    scenario = load_scenario(args.scenario, **overrides)
    print(f"scenario: {scenario.model} on {scenario.gpu}, trace {scenario.trace} x{scenario.rate_scale}, "
          f"split {args.split}, {args.fidelity} simulator")
    results, timelines = evaluate(names, scenario, args.split, args.fidelity, args.checkpoint, args.seed,
                                  args.window_s)
    print(format_table(results))
    out: dict[str, Any] = {"scenario": scenario.to_dict(), "split": args.split, "fidelity": args.fidelity,
                           "checkpoint": args.checkpoint, "controllers": results}
    if args.budget_gpus:
        out["fixed_budget"] = {"budget_gpus": args.budget_gpus, "window_s": args.budget_window_s,
                               "fidelity": args.budget_fidelity, "fill": args.budget_fill, "grid": grid,
                               "controllers": fixed_budget(names, scenario, args.budget_gpus, args.split,
                                                           args.budget_fidelity, args.budget_window_s,
                                                           args.checkpoint, *map(float, args.budget_range.split(",")),
                                                           fill=args.budget_fill, grid=grid)}
    if args.plots:
        from agents.plots import plot_timelines

        for p in plot_timelines({k: v.to_dict() for k, v in timelines.items()}, args.plots,
                                scenario.attainment_target):
            print(f"wrote {p}")
        if grid and args.budget_gpus:
            from agents.plots import plot_budget_curves

            mode = f"fixed-budget mode ({args.budget_fill})" if args.budget_fill else "as deployed"
            p = plot_budget_curves({k: v["tried"] for k, v in out["fixed_budget"]["controllers"].items()},
                                   Path(args.plots) / "budget_curve.png", scenario.attainment_target,
                                   f"{args.budget_gpus} GPUs, {mode}, {args.split} split")
            print(f"wrote {p}")
    if args.json:
        out["timelines"] = {k: v.to_dict() for k, v in timelines.items()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
