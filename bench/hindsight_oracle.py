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
``--reactive M`` replays a reactive rule built on the same knowledge: each interval takes, per
operator, the most replicas any of the oracle's plans for the last M intervals had (the first
interval the oracle's first plan). A controller that learned after every interval exactly which
plan it had needed, and provisioned for the worst of the last M, would run this schedule. It
reads no future only with ``--lookahead 0``: with lookahead L an interval's "need" includes the
check that the next L intervals stay recoverable, which is known only L intervals later. With
``--lookahead 0`` the schedule's GPUs at the SLO say how much of the oracle's saving a
controller that knows the past exactly, but not the future, can keep.

Menu: the distinct (attention, projection, MLP) replica counts a controller used in an
evaluation JSON (``--from-json FILE --controller NAME``, default the shipped policy in
docs/results/test_reference.json), plus an optional grid (``--attn/--proj/--mlp``); every
plan all ``pack``, attention batch ``--attn-batch``, ``--embed`` / ``--head`` replicas.

    python bench/hindsight_oracle.py --split test --tau 0.99,0.995,0.999

Units: GPUs averaged over the run, attainment as a share of requests.
"""
from __future__ import annotations

import argparse
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
from agents.hindsight import ScheduleController, greedy_schedule, pack_menu, reactive_schedule  # noqa: E402
from envs import SPLITS  # noqa: E402

def menu_from_json(path: Path, controller: str) -> set[tuple[int, int, int]]:
    """Distinct (attention, projection, MLP) replica counts in an evaluation JSON's timeline."""
    data = json.loads(path.read_text())
    try:
        reps = data["timelines"][controller]["replicas"]
    except KeyError as e:
        raise SystemExit(f"{path}: no replica timeline for controller {controller!r} (missing {e})") from None
    return set(zip(reps["attn"], reps["proj"], reps["mlp"]))


def _intervals(ap: argparse.ArgumentParser, flag: str, value: str) -> list[int]:
    """Comma-separated whole numbers of intervals, each at least 1 (argparse error otherwise)."""
    try:
        out = [int(v) for v in value.split(",") if v]
    except ValueError:
        ap.error(f"{flag} {value!r}: expected whole numbers of intervals separated by commas")
    if any(v < 1 for v in out):
        ap.error(f"{flag} {value!r}: at least 1 interval each")
    return out


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
    ap.add_argument("--reactive", default="",
                    help="also replay the reactive max-of-the-last-M-intervals rule, M comma-separated "
                         "(strictly causal only with --lookahead 0)")
    ap.add_argument("--interval", type=float, default=None,
                    help="control interval in seconds (default: the scenario's interval_s)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    try:
        taus = [float(t) for t in args.tau.split(",") if t]
    except ValueError:
        ap.error(f"--tau {args.tau!r}: expected numbers separated by commas")
    delays = _intervals(ap, "--delay", args.delay)
    windows = _intervals(ap, "--reactive", args.reactive)

    if args.interval is not None and args.interval <= 0:
        ap.error(f"--interval {args.interval}: must be positive")
    sc = load_scenario(**({"interval_s": args.interval} if args.interval else {}))
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
    def gpus_of(p):  # noqa: ANN001, ANN202
        return probe.placer.place(p).n_gpus

    menu = pack_menu(sc, counts, args.attn_batch, args.embed, args.head, gpus_of)
    print(f"menu: {len(menu)} pack plans, {gpus_of(menu[0])}-{gpus_of(menu[-1])} GPUs; split {args.split}",
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
        variants = [("delayed", "delay_intervals", d, [schedule[0]] * d + schedule,
                     f"replayed {d} interval(s) late") for d in delays]
        variants += [("reactive", "window_intervals", w, reactive_schedule(schedule, w),
                      f"reactive: max of the last {w} interval(s)") for w in windows]
        for kind, field, n, plans, what in variants:
            s_v, tl_v = run_timeline(make_sim(sc, trace, "reference", 0), ScheduleController(plans), menu[-1])
            m_v = metrics(s_v, tl_v, sc.attainment_target)
            row.setdefault(kind, []).append({field: n, "attainment": m_v["slo_attainment"],
                                             "avg_gpus": m_v["avg_gpus"], "energy_kwh": m_v["energy_kwh"]})
            print(f"tau {tau:g}, {what}: reference {m_v['slo_attainment']:.4f} at {m_v['avg_gpus']:.2f} avg GPUs "
                  f"({m_v['energy_kwh']:.2f} kWh)", flush=True)
        rows.append(row)
        print(f"tau {tau:g}: reference {m['slo_attainment']:.4f} at {m['avg_gpus']:.2f} avg GPUs "
              f"(peak {m['peak_gpus']:.0f}, {m['energy_kwh']:.2f} kWh); fast search {fast_sum['slo_attainment']:.4f} at "
              f"{fast_sum['mean_gpus']:.2f}; {fallbacks} of {len(schedule)} intervals at the largest plan "
              f"({time.time() - t0:.0f} s)", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        counts_out = [[p["attn"].replicas, p["proj"].replicas, p["mlp"].replicas] for p in menu]
        args.json.write_text(json.dumps({"split": args.split, "interval_s": sc.interval_s, "menu": counts_out,
                                         "attn_batch": args.attn_batch, "embed": args.embed, "head": args.head,
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
