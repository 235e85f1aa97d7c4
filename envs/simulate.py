"""``python -m envs.simulate``: replay a trace through a simulator under a controller.

Example::

    python -m envs.simulate --trace azure-conv --controller static --json

Controllers come from ``agents.registry`` (static, model-level, operator-queueing, ppo with
``--checkpoint``); ``static`` with ``--replicas N`` (or ``--plan plan.json``) runs a fixed plan
without the agents package. Prints the run summary: SLO attainment, TTFT/TBT p50/p99 (s),
GPU-seconds, joules, request counts, wall time and the speed-up over real time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from envs import SPLITS
from runtime.control import Controller, Plan


class FixedPlan(Controller):
    """The ``static`` controller without the agents package: always the same plan."""

    name = "static"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def decide(self, state) -> Plan:  # noqa: ANN001
        return self.plan


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m envs.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default=None, help="trace name or CSV path (default: the scenario's)")
    p.add_argument("--controller", default="static", help="controller name (agents.registry)")
    p.add_argument("--scenario", default=None, help="scenario YAML (default envs/configs/default.yaml)")
    p.add_argument("--fidelity", default="reference", choices=("reference", "fast"))
    p.add_argument("--rate-scale", type=float, default=None, help="arrival-rate multiplier")
    p.add_argument("--split", default="all", choices=("all", *SPLITS))
    p.add_argument("--window", type=float, nargs=2, metavar=("T0", "T1"), help="only arrivals in [T0, T1) s")
    p.add_argument("--replicas", type=int, default=None, help="static: whole-model instances")
    p.add_argument("--plan", default=None, help="static: plan JSON file ({group: {replicas, ...}})")
    p.add_argument("--checkpoint", default=None, help="ppo: checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def build(a: argparse.Namespace) -> tuple[Any, Controller, Plan, Any]:
    """Scenario, controller, starting plan and simulator for the parsed arguments."""
    from envs import make_simulator, scenario_trace
    from envs.scenario import Scenario

    over: dict[str, Any] = {}
    if a.trace:
        over["trace"] = a.trace
    if a.rate_scale is not None:
        over["rate_scale"] = a.rate_scale
    sc = Scenario.from_yaml(a.scenario, **over) if a.scenario else Scenario.from_yaml(**over)
    trace = scenario_trace(sc, a.split)
    if a.window:
        trace = trace.window(a.window[0], a.window[1])
    if a.controller == "static" and (a.replicas or a.plan):
        if a.plan:
            plan = Plan.from_dict(json.loads(Path(a.plan).read_text()))
        else:
            plan = Plan.model_level(a.replicas, sc.initial_max_batch, sc.model_tp)
        ctrl: Controller = FixedPlan(plan)
    else:
        try:
            from agents.registry import make_controller
        except ImportError:
            if a.controller != "static":
                raise ValueError(f"controller {a.controller!r} needs the agents package") from None
            ctrl, plan = FixedPlan(sc.initial_plan()), sc.initial_plan()
        else:
            ctrl, plan = make_controller(a.controller, sc, trace=trace, checkpoint=a.checkpoint)
    sim = make_simulator(sc, trace, fidelity=a.fidelity, seed=a.seed)
    return sc, ctrl, plan, sim


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        sc, ctrl, plan, sim = build(a)
    except Exception as e:  # noqa: BLE001 - CLI: one-line error
        print(f"envs.simulate: error: {e}", file=sys.stderr)
        return 2
    from envs import run_controller

    w0 = time.perf_counter()
    out = run_controller(sim, ctrl, plan)
    wall = time.perf_counter() - w0
    out.update({"trace": sc.trace, "rate_scale": sc.rate_scale, "model": sc.model, "gpu": sc.gpu,
                "plan0": plan.to_dict(), "wall_total_s": wall,
                "speedup_vs_real_time": out["sim_time_s"] / wall if wall > 0 else None})
    if a.json:
        print(json.dumps(out, indent=2, default=float))
    else:
        for k, v in out.items():
            if k != "plan0":
                print(f"{k:>24}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
