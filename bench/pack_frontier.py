"""Oracle for operator-level autoscalers: the cheapest *static* all-``pack`` plans.

Every plan of a grid (attention replicas x batch, projection replicas, MLP replicas; one
embedding and one LM-head replica, the scenario's per-group tp) is held fixed over a
trace split in the reference simulator; the table lists GPUs and SLO attainment sorted by
GPUs, and the frontier line names the fewest GPUs reaching the attainment target.
Unlike the controllers this knows the whole split in advance, so it is a bound on what a
fixed operator-level layout can do, not a controller.

    python bench/pack_frontier.py --split test --attn 8x32,12x16,16x16 --proj 2,3,4 --mlp 3,4,5,6
    python bench/pack_frontier.py --split test --rate-mult 1.6 --attn 10x32 --proj 4,5 --mlp 9,10

Units: GPUs (average over the run), attainment as a share of requests.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.baselines import StaticController  # noqa: E402
from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from agents.evaluate import run_timeline  # noqa: E402
from envs import SPLITS  # noqa: E402
from agents.hindsight import pack_plan  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("--attn", default="8x32,12x16,16x16", help="attention REPLICASxBATCH, comma-separated")
    ap.add_argument("--proj", default="2,3,4")
    ap.add_argument("--mlp", default="3,4,5,6")
    ap.add_argument("--rate-mult", type=float, default=1.0,
                    help="multiplier of the scenario's request rate (the fixed-budget view)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    sc = load_scenario()
    sc = sc.replace(rate_scale=sc.rate_scale * args.rate_mult)
    trace = load_split(sc, args.split)
    attn = [tuple(int(x) for x in a.split("x")) for a in args.attn.split(",")]
    rows = []
    for (a, b), p, m in itertools.product(attn, [int(x) for x in args.proj.split(",")],
                                          [int(x) for x in args.mlp.split(",")]):
        plan = pack_plan(sc, a, b, p, m)
        sim = make_sim(sc, trace, "reference", 0)
        s, _ = run_timeline(sim, StaticController(plan), plan)
        row = {"attn": a, "attn_batch": b, "proj": p, "mlp": m, "gpus": s["gpu_seconds"] / s["sim_time_s"],
               "attainment": s["slo_attainment"], "ttft_p99_s": s["ttft_p99_s"], "tbt_p99_s": s["tbt_p99_s"]}
        rows.append(row)
        print(f"attn {a}x{b} proj {p} mlp {m}: {row['gpus']:.1f} GPUs, attainment {row['attainment']:.4f}, "
              f"TTFT p99 {row['ttft_p99_s']:.2f} s", flush=True)
    rows.sort(key=lambda r: (r["gpus"], -r["attainment"]))
    ok = [r for r in rows if r["attainment"] >= sc.attainment_target]
    if ok:
        r = ok[0]
        print(f"frontier ({args.split}, rate x{args.rate_mult:g}): {r['gpus']:.0f} GPUs at {r['attainment']:.4f} attainment "
              f"(attn {r['attn']}x{r['attn_batch']}, proj {r['proj']}, mlp {r['mlp']})")
    else:
        print(f"frontier ({args.split}, rate x{args.rate_mult:g}): no plan of the grid reaches {sc.attainment_target}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
