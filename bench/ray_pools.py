"""What running the stateless pools on Ray Serve costs the engine, against in-process pools.

    python bench/ray_pools.py --model small --requests 16 --prompt 64 --tokens 16 --repeats 3
    python bench/ray_pools.py --model llama-2-7b --device cuda --dtype float16 --ray-gpus 0.2  # four pools on one GPU

Each run serves ``requests`` prompts of ``prompt`` tokens (``tokens`` generated each), all
submitted at once, on an engine whose groups sit in different placement slots (``dedicated``,
one replica each, so every operator call is a hop to its pool). Two settings of
``EngineConfig.pools``, interleaved, ``--repeats`` times: ``local`` (every pool a worker thread of
the engine's process) and ``ray`` (embedding, projections, MLP and LM head as Ray Serve
deployments on a local Ray instance, started once; runtime/rayserve.py). Reported per setting
(medians): wall time to serve everything, mean time to first token, median time between
tokens, and the mean seconds a stateless call spends outside its operator (queue wait and
transfer: the hop), from the engine's per-call metrics; then the ratios ray / local of the
interleaved pairs. Greedy outputs are compared across settings.

A decode iteration makes ``3 x n_layers + 2`` stateless calls one after another (QKV, O and MLP
per layer, embedding, head), so the hop cost multiplies by the depth of the model: the number
that matters for deciding where a pool may live is the hop, not the wall time of a small model.
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
from runtime.rayserve import STATELESS, RayPoolsConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro_batches import (keep_intervals, medians_and_ratios, serve_all, workload, workload_args,  # noqa: E402
                           workload_head)
from runtime_overhead import engine_config  # noqa: E402

SETTINGS = ("local", "ray")


def run_once(model: LlamaModel, prompts: list[list[int]], tokens: int, device: str, pools: str, batch: int,
             prefill_tokens: int, ray_gpus: float = 0.0) -> dict:
    """Serve ``prompts`` at once with in-process or Ray Serve pools; wall, TTFT, TBT and the mean
    hop of a stateless call (seconds), and the outputs."""
    conf = engine_config(model, device, len(prompts) + 1, len(prompts[0]) + tokens)
    conf.pools = pools
    if pools == "ray":
        conf.ray = RayPoolsConfig(num_gpus={g: ray_gpus for g in STATELESS} if ray_gpus else {})
    conf.max_prefill_tokens = prefill_tokens
    conf.micro_batches = 1  # one call per stage and iteration: the hops alone differ
    eng = Engine(model, Plan({g: OperatorPlan(1, batch, "dedicated") for g in OPERATOR_GROUPS}), conf)
    eng.start(wait_ready=300)
    try:
        eng.generate(prompts[0][:8], 2)  # warm-up
        taken = keep_intervals(eng)
        eng.observe()  # start the measured interval
        calls0 = sum(r.items_done for g in STATELESS for r in eng.replicas[g])
        out = serve_all(eng, prompts, tokens)
        st = eng.observe()
        groups = taken["iv"].groups
        calls = sum(r.items_done for g in STATELESS for r in eng.replicas[g]) - calls0
        lat = sum(sum(groups[g].latencies_s) for g in STATELESS)
        busy = sum(groups[g].busy_s for g in STATELESS)
        return {**out, "tbt_p50_s": st.tbt_p50_s, "stateless_calls": calls,
                "hop_s": (lat - busy) / max(calls, 1)}
    finally:
        eng.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(p, batch=64, prompt=64, tokens=16)
    p.add_argument("--ray-gpus", type=float, default=None,
                   help="GPUs Ray reserves per pool replica (default 0.2 with --device cuda: the four pools on "
                        "one GPU beside the engine; 0 on CPU)")
    args = p.parse_args(argv)
    ray_gpus = args.ray_gpus if args.ray_gpus is not None else (0.2 if args.device == "cuda" else 0.0)
    import ray

    ray.init(num_cpus=max(2, args.threads), num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        model, prompts = workload(args)
        runs: dict[str, list[dict]] = {k: [] for k in SETTINGS}
        metrics = ("wall_s", "ttft_mean_s", "tbt_p50_s", "hop_s")
        for r in range(args.repeats):
            for k in SETTINGS:
                x = run_once(model, prompts, args.tokens, args.device, k, args.batch, args.prefill_tokens, ray_gpus)
                runs[k].append(x)
                print(f"round {r} {k}: wall {x['wall_s']:.3f} s, TTFT mean {x['ttft_mean_s']:.3f} s, TBT p50 "
                      f"{x['tbt_p50_s'] * 1e3:.1f} ms, {x['stateless_calls']} stateless calls, hop "
                      f"{x['hop_s'] * 1e3:.2f} ms", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    same = all(x["outputs"] == runs["local"][0]["outputs"] for k in SETTINGS for x in runs[k])
    out = workload_head(args, same, n_layers=model.cfg.n_layers, ray_gpus=ray_gpus)
    per, out["ray_over_local"] = medians_and_ratios(runs, "local", "ray", metrics)
    out.update(per)
    rat = out["ray_over_local"]
    print(f"{args.model} ({model.cfg.n_layers} layers) on {args.device}, {args.requests} x {args.prompt}-token "
          f"prompts, {args.tokens} tokens each (local: {out['local']['wall_s']:.2f} s):")
    print("  ray / local: " + ", ".join(f"{m} {v:.2f}x" for m, v in rat.items()))
    print(f"  hop of a stateless call: local {out['local']['hop_s'] * 1e3:.2f} ms, ray {out['ray']['hop_s'] * 1e3:.2f} ms; "
          f"outputs equal across settings: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
