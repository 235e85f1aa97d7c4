"""What filling decode calls onto few replicas of a pool costs and saves the runtime's engine.

    python bench/pool_dispatch.py --model small --requests 32 --prompt 128 --tokens 32 --replicas 2 --repeats 3

Each run serves ``requests`` prompts of ``prompt`` tokens (``tokens`` generated each), all
submitted at once, on an engine whose groups sit in different placement slots (``dedicated``:
every operator call is a hop to its pool's worker thread, as between GPUs), with ``--replicas``
replicas of the projection and MLP pools. Two settings of ``EngineConfig.pool_dispatch``,
interleaved, ``--repeats`` times: ``spread`` (every stage cut into one part per ready replica)
and ``fill`` (the default: decode rows in chunks of ``max_batch`` sequences, so as few replicas
as that takes; rows carrying prompt tokens spread as before; ``runtime.engine.pool_calls``).
Reported per setting (medians): wall time to serve everything, mean time to first token, median
time between tokens, the MLP pool's summed busy seconds and its calls per iteration, and on CUDA
the energy NVML reported (joules); then the ratios fill / spread of the interleaved pairs.
Greedy outputs are compared across settings.

On CPU the replicas are worker threads sharing the machine's cores and a GEMM's time grows with
its rows, so fewer, larger calls need not save busy time here; on a GPU a decode GEMM is bound by
reading its weights, which is what the simulators' ``pool_dispatch: fill`` assumes
(docs/SIMULATOR.md "Step model"). Absolute times and the busy-time ratio mean something only there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.control import OperatorPlan, Plan  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.model import LlamaModel  # noqa: E402
from runtime.models import OPERATOR_GROUPS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro_batches import (keep_intervals, medians_and_ratios, serve_all, workload, workload_args,  # noqa: E402
                           workload_head)
from runtime_overhead import engine_config  # noqa: E402

SETTINGS = ("spread", "fill")


def run_once(model: LlamaModel, prompts: list[list[int]], tokens: int, device: str, dispatch: str,
             replicas: int, batch: int, prefill_tokens: int) -> dict:
    """Serve ``prompts`` at once under one dispatch rule; wall, TTFT, TBT (seconds), the MLP pool's
    busy seconds and calls per iteration, energy (joules, CUDA only) and the outputs."""
    conf = engine_config(model, device, len(prompts) + 1, len(prompts[0]) + tokens)
    conf.pool_dispatch = dispatch
    conf.max_prefill_tokens = prefill_tokens
    conf.micro_batches = 1  # one call per stage and iteration: the dispatch alone decides the calls
    ops = {g: OperatorPlan(1, batch, "dedicated") for g in OPERATOR_GROUPS}
    for g in ("proj", "mlp"):
        ops[g] = OperatorPlan(replicas, batch, "dedicated")
    eng = Engine(model, Plan(ops), conf).start()
    try:
        eng.wait_ready()
        eng.generate(prompts[0][:8], 2)  # warm-up
        taken = keep_intervals(eng)
        eng.observe()  # start the measured interval
        it0 = eng.iterations
        calls0 = sum(r.items_done for r in eng.replicas["mlp"])
        out = serve_all(eng, prompts, tokens)
        st = eng.observe()
        its = max(eng.iterations - it0, 1)
        return {**out, "tbt_p50_s": st.tbt_p50_s, "mlp_busy_s": taken["iv"].groups["mlp"].busy_s,
                "mlp_calls_per_iteration": (sum(r.items_done for r in eng.replicas["mlp"]) - calls0) / its,
                "energy_j": st.energy_j}
    finally:
        eng.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(p, batch=64, prompt=128, tokens=32)
    p.add_argument("--replicas", type=int, default=2, help="replicas of the projection and MLP pools")
    args = p.parse_args(argv)
    model, prompts = workload(args)
    runs: dict[str, list[dict]] = {k: [] for k in SETTINGS}
    metrics = ("wall_s", "ttft_mean_s", "tbt_p50_s", "mlp_busy_s", "mlp_calls_per_iteration", "energy_j")
    for r in range(args.repeats):
        for k in SETTINGS:
            x = run_once(model, prompts, args.tokens, args.device, k, args.replicas, args.batch, args.prefill_tokens)
            runs[k].append(x)
            print(f"round {r} {k}: wall {x['wall_s']:.3f} s, TTFT mean {x['ttft_mean_s']:.3f} s, TBT p50 "
                  f"{x['tbt_p50_s'] * 1e3:.1f} ms, MLP busy {x['mlp_busy_s']:.3f} s, "
                  f"{x['mlp_calls_per_iteration']:.2f} MLP calls per iteration", file=sys.stderr, flush=True)
    same = all(x["outputs"] == runs["spread"][i]["outputs"] for x in runs["fill"] for i in range(len(runs["spread"])))
    out = workload_head(args, same, replicas=args.replicas)
    per, out["fill_over_spread"] = medians_and_ratios(runs, "spread", "fill", metrics)
    out.update(per)
    rat = out["fill_over_spread"]
    print(f"{args.model} on {args.device}, {args.requests} x {args.prompt}-token prompts, {args.tokens} tokens each, "
          f"{args.replicas} projection / MLP replicas (spread: {out['spread']['wall_s']:.2f} s):")
    print("  fill / spread: " + ", ".join(f"{m} {v:.2f}x" for m, v in rat.items()))
    print(f"  MLP calls per iteration: spread {out['spread']['mlp_calls_per_iteration']:.2f}, "
          f"fill {out['fill']['mlp_calls_per_iteration']:.2f}; outputs equal across settings: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
