"""Oracle for operator-level autoscalers over time: a greedy schedule chosen with hindsight.

pack_frontier.py bounds what a *fixed* operator layout can do. This asks the question for a
layout that changes every interval, as the policies' do: each interval it takes the plan with
the fewest GPUs from a menu such that, knowing the trace ahead,

* the interval itself holds SLO attainment >= ``--tau`` (the interval's met requests over its
  finished and rejected ones), and
* the cluster can still recover: with the largest plan of the menu for the next ``--lookahead``
  intervals, each of them holds ``--tau`` as well (a backlog the chosen plan leaves behind must
  be one that scaling up can clear).

The search runs in the fast simulator, whose state copies in under a millisecond; the
schedule it picks is then replayed, plan by plan, in the reference simulator, which gives the
numbers to quote (the fast model's errors are in docs/SIMULATOR.md). It is not a controller:
it reads the trace ahead of time. Nor is it a lower bound: it is greedy and its menu is finite.
It says how few GPUs a layout changing at the policies' pace could hold the SLO with here.
``--delay N`` also replays the same schedule N intervals late (each plan applied N intervals
after the oracle chose it; the first plan before that): a controller that knows exactly what
each interval needed, but only once it has seen it, as a reactive autoscaler does at best.

Menu: the distinct (attention, projection, MLP) replica counts a controller used in an
evaluation JSON (``--from-json FILE --controller NAME``, default the shipped policy in
docs/results/test_reference.json), plus an optional grid (``--attn/--proj/--mlp``); every
plan all ``pack``, attention batch ``--attn-batch``, ``--embed`` / ``--head`` replicas.

    python bench/hindsight_oracle.py --split test --tau 0.99,0.995,0.999

Units: GPUs averaged over the run, attainment as a share of requests.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from agents.evaluate import metrics, run_timeline  # noqa: E402
from bench.pack_frontier import pack_plan  # noqa: E402
from envs import SPLITS  # noqa: E402
from runtime.control import ClusterState, Controller, Plan  # noqa: E402

#: simulator attributes that are read-only or deterministic memo tables: shared, not copied
_SHARED = ("sc", "trace", "pred", "slo", "cache", "placer", "index", "sub_index", "arrival", "output", "prompt",
           "_tok_sum", "_steps", "_it", "_sub", "_int")


class ScheduleController(Controller):
    """Replays a list of plans, one per interval (the last one after the list ends)."""

    name = "schedule"

    def __init__(self, plans: list[Plan]) -> None:
        if not plans:
            raise ValueError("a schedule needs at least one plan")
        self.plans = list(plans)
        self.k = 0

    def reset(self, state: ClusterState | None = None) -> None:
        self.k = 0

    def decide(self, state: ClusterState) -> Plan:
        plan = self.plans[min(self.k, len(self.plans) - 1)]
        self.k += 1
        return plan


def clone(sim):  # noqa: ANN001, ANN201 - a fast simulator
    """A copy of a fast simulator's run state; tables that never change (or only memoise) are shared."""
    memo = {id(getattr(sim, k)): getattr(sim, k) for k in _SHARED if hasattr(sim, k)}
    return copy.deepcopy(sim, memo)


def menu_from_json(path: Path, controller: str) -> set[tuple[int, int, int]]:
    """Distinct (attention, projection, MLP) replica counts in an evaluation JSON's timeline."""
    data = json.loads(path.read_text())
    try:
        reps = data["timelines"][controller]["replicas"]
    except KeyError as e:
        raise SystemExit(f"{path}: no replica timeline for controller {controller!r} (missing {e})") from None
    return set(zip(reps["attn"], reps["proj"], reps["mlp"]))


def greedy_schedule(sim, menu: list[Plan], tau: float, lookahead: int) -> tuple[list[Plan], int]:  # noqa: ANN001
    """Run ``sim`` to the end choosing, each interval, the first plan of ``menu`` (sorted by
    GPUs) that passes the test of the module docstring; returns the plans and how many
    intervals fell back to the largest plan."""
    top = menu[-1]
    plans: list[Plan] = []
    fallbacks = 0
    while not sim.done:
        chosen = None
        for plan in menu:
            c = clone(sim)
            ok = c.step(plan).slo_attainment >= tau
            for _ in range(lookahead):
                if not ok or c.done:
                    break
                ok = c.step(top).slo_attainment >= tau
            if ok:
                chosen = plan
                break
        if chosen is None:
            chosen, fallbacks = top, fallbacks + 1
        plans.append(chosen)
        sim.step(chosen)
    return plans, fallbacks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("--tau", default="0.99", help="per-interval attainment thresholds to try, comma-separated")
    ap.add_argument("--lookahead", type=int, default=2, help="intervals at the largest plan that must hold tau")
    ap.add_argument("--from-json", type=Path, default=ROOT / "docs" / "results" / "test_reference.json")
    ap.add_argument("--controller", default="ppo", help="whose plans in --from-json make the menu ('' for none)")
    ap.add_argument("--attn", default="", help="grid: attention replicas, comma-separated")
    ap.add_argument("--proj", default="", help="grid: projection replicas")
    ap.add_argument("--mlp", default="", help="grid: MLP replicas")
    ap.add_argument("--attn-batch", type=int, default=16)
    ap.add_argument("--embed", type=int, default=4)
    ap.add_argument("--head", type=int, default=4)
    ap.add_argument("--delay", default="", help="also replay the schedule this many intervals late, comma-separated")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    try:
        taus = [float(t) for t in args.tau.split(",") if t]
    except ValueError:
        ap.error(f"--tau {args.tau!r}: expected numbers separated by commas")
    try:
        delays = [int(d) for d in args.delay.split(",") if d]
    except ValueError:
        ap.error(f"--delay {args.delay!r}: expected whole numbers of intervals separated by commas")
    if any(d < 1 for d in delays):
        ap.error(f"--delay {args.delay!r}: delays are at least 1 interval")

    sc = load_scenario()
    trace = load_split(sc, args.split)
    counts: set[tuple[int, int, int]] = set()
    if args.controller:
        counts |= menu_from_json(args.from_json, args.controller)
    grid = [[int(x) for x in v.split(",") if x] for v in (args.attn, args.proj, args.mlp)]
    if all(grid):
        counts |= set(itertools.product(*grid))
    if not counts:
        ap.error("empty menu: give --controller with --from-json, or all of --attn/--proj/--mlp")
    probe = make_sim(sc, trace, "fast", 0)
    plans = [pack_plan(sc, a, args.attn_batch, p, m, args.embed, args.head) for a, p, m in sorted(counts)]
    gpus = {id(p): probe.placer.place(p).n_gpus for p in plans}
    menu = sorted(plans, key=lambda p: (gpus[id(p)], p["attn"].replicas, p["mlp"].replicas, p["proj"].replicas))
    print(f"menu: {len(menu)} pack plans, {gpus[id(menu[0])]}-{gpus[id(menu[-1])]} GPUs; split {args.split}",
          flush=True)

    rows = []
    for tau in taus:
        t0 = time.time()
        fast = make_sim(sc, trace, "fast", 0)
        fast.reset(menu[-1])
        schedule, fallbacks = greedy_schedule(fast, menu, tau, args.lookahead)
        fast_sum = fast.summary()
        ref = make_sim(sc, trace, "reference", 0)
        summary, tl = run_timeline(ref, ScheduleController(schedule), menu[-1])
        m = metrics(summary, tl, sc.attainment_target)
        row = {"tau": tau, "lookahead": args.lookahead, "intervals": len(schedule), "fallbacks": fallbacks,
               "fast_attainment": fast_sum["slo_attainment"], "fast_avg_gpus": fast_sum["mean_gpus"],
               "attainment": m["slo_attainment"], "avg_gpus": m["avg_gpus"], "peak_gpus": m["peak_gpus"],
               "energy_kwh": m["energy_kwh"], "ttft_p99_s": m["ttft_p99_s"], "tbt_p99_s": m["tbt_p99_s"],
               "gpus_per_interval": [float(g) for g in tl.gpus]}
        for d in delays:
            late = [schedule[0]] * d + schedule
            s_d, tl_d = run_timeline(make_sim(sc, trace, "reference", 0), ScheduleController(late), menu[-1])
            m_d = metrics(s_d, tl_d, sc.attainment_target)
            row.setdefault("delayed", []).append({"delay_intervals": d, "attainment": m_d["slo_attainment"],
                                                  "avg_gpus": m_d["avg_gpus"], "energy_kwh": m_d["energy_kwh"]})
            print(f"tau {tau:g}, replayed {d} interval(s) late: reference {m_d['slo_attainment']:.4f} at "
                  f"{m_d['avg_gpus']:.2f} avg GPUs ({m_d['energy_kwh']:.2f} kWh)", flush=True)
        rows.append(row)
        print(f"tau {tau:g}: reference {m['slo_attainment']:.4f} at {m['avg_gpus']:.2f} avg GPUs "
              f"(peak {m['peak_gpus']:.0f}, {m['energy_kwh']:.2f} kWh); fast search {fast_sum['slo_attainment']:.4f} at "
              f"{fast_sum['mean_gpus']:.2f}; {fallbacks} of {len(schedule)} intervals at the largest plan "
              f"({time.time() - t0:.0f} s)", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"split": args.split, "menu": [[p["attn"].replicas, p["proj"].replicas,
                                                                         p["mlp"].replicas] for p in menu],
                                         "attn_batch": args.attn_batch, "embed": args.embed, "head": args.head,
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
