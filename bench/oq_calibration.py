"""Calibration of the operator-queueing planning model against the reference simulator.

For each arrival rate: a Poisson trace with the request shapes of the data
before the held-out split (``trainval``), the plan
the controller's greedy picks for that rate, its predictions (iteration times, TTFT and
TBT tails), and what the reference simulator measures serving the trace with that plan
fixed. Also each prediction for a few hand-picked plans (``--plans``).

    python bench/oq_calibration.py --rates 2,4,8,12 --duration 600 [--json OUT]

Units: seconds, requests per second. Tuning uses only data before the held-out split.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.baselines import StaticController  # noqa: E402
from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from agents.evaluate import run_timeline  # noqa: E402
from agents.registry import make_controller  # noqa: E402
from runtime.control import OperatorPlan, Plan  # noqa: E402
from runtime.models import OPERATOR_GROUPS  # noqa: E402
from traces import generate  # noqa: E402


def plan_of(replicas: dict[str, int], batch: dict[str, int], tp: dict[str, int]) -> Plan:
    return Plan({g: OperatorPlan(int(replicas[g]), int(batch[g]), "pack", int(tp[g])) for g in OPERATOR_GROUPS})


def measure(scenario, trace, plan: Plan) -> dict[str, float]:
    """Reference-simulator summary of ``plan`` held fixed over ``trace``."""
    sim = make_sim(scenario, trace, "reference", 0)
    s, tl = run_timeline(sim, StaticController(plan), plan)
    tpot = []
    fin = sim.state == 3
    out = np.maximum(sim.output[fin], 2)
    tpot = (sim.finish_t[fin] - sim.first_t[fin]) / (out - 1)
    return {"attainment": s["slo_attainment"], "ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"],
            "tbt_p50_s": s["tbt_p50_s"], "tbt_p99_s": s["tbt_p99_s"],
            "tpot_p99_s": float(np.percentile(tpot, 99)) if tpot.size else 0.0,
            "gpus": s["gpu_seconds"] / max(s["sim_time_s"], 1e-9)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="2,4,8,12")
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sc = load_scenario()
    train = load_split(sc, "trainval")
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        tr = generate("poisson", train, args.duration, seed=args.seed, rate_per_s=rate)
        sim0 = make_sim(sc, tr, "reference", 0)
        ctl, _ = make_controller("operator-queueing", sc, slo=sim0.slo, trace=tr)
        prompt, output = float(np.mean(tr.prompt_tokens)), float(np.mean(tr.output_tokens))
        t0 = time.time()
        qp = ctl.plan_for(len(tr) / tr.duration_s, prompt, output)
        p = qp.prediction
        plan = plan_of(qp.replicas, qp.batch, sc.tp)
        m = measure(sc, tr, plan)
        row = {"rate": rate, "prompt": prompt, "output": output, "replicas": qp.replicas,
               "attn_batch": qp.batch["attn"], "pred": {"gpus": p.gpus, "decode_s": p.decode_s,
                                                        "mixed_s": p.mixed_s, "mixed_tail_s": p.mixed_tail_s,
                                                        "ttft_s": p.ttft_s, "tbt_s": p.tbt_s, "tpot_s": p.tpot_s,
                                                        "wait_s": p.wait_s, "chunk_share": p.chunk_share},
               "sim": m, "wall_s": time.time() - t0}
        rows.append(row)
        print(f"rate {rate:5.1f} plan {qp.replicas} B={qp.batch['attn']}: GPUs pred {p.gpus} sim {m['gpus']:.1f} | "
              f"TBT p50 pred(decode) {p.decode_s:.3f} sim {m['tbt_p50_s']:.3f} | TBT p99 pred {p.tbt_s:.3f} "
              f"sim {m['tbt_p99_s']:.3f} | TPOT tail pred {p.tpot_s:.3f} sim p99 {m['tpot_p99_s']:.3f} | "
              f"TTFT pred {p.ttft_s:.3f} sim p50 {m['ttft_p50_s']:.3f} p99 {m['ttft_p99_s']:.3f} | "
              f"attain {m['attainment']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
