"""What cutting iterations through the pools into micro-batches buys the engine.

    python bench/micro_batches.py --model small --requests 32 --prompt 256 --tokens 16 --repeats 3 --json out.json

Each run serves ``requests`` prompts of ``prompt`` tokens (``tokens`` generated each), all
submitted at once, on an engine whose groups sit in different placement slots (``dedicated``
placement: every operator call is a hop to its pool's worker thread, as between GPUs), with
at most ``--prefill-tokens`` prompt tokens admitted per iteration, so prefill chunks and
decodes mix as they do under load. Three engine settings, interleaved, ``--repeats`` times:
``whole`` (``micro_batches`` 1, never cut), ``fixed`` (always 2 micro-batches) and
``adaptive`` (the default: per iteration the count measured fastest for iterations like it,
runtime/microbatch.py). Reported per setting (medians): wall time to serve everything, mean
time to first token, median time between tokens, the share of iterations cut, and the ratios
to ``whole`` measured in the same run; greedy outputs are compared across settings.

On CPU the micro-batches' operators overlap only as far as the cores allow (``--threads``
torch threads per operator call; 1 lets the pools' worker threads share this machine's two
cores); on a GPU each pool is its own device. Absolute times mean something only there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.control import OperatorPlan, Plan  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.model import LlamaModel, build_model  # noqa: E402
from runtime.models import OPERATOR_GROUPS, get_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_overhead import DTYPES, engine_config  # noqa: E402

SETTINGS = {"whole": (1, "fixed"), "fixed": (2, "fixed"), "adaptive": (2, "adaptive")}


def serve_all(eng: Engine, prompts: list[list[int]], tokens: int) -> dict:
    """Submit every prompt at once (the driver waits until all are queued) and wait for them: wall
    time to the last token and mean time to first token (seconds) from the submission, and the
    generated tokens."""
    with eng._lock:
        t0 = time.perf_counter()
        seqs = [eng.submit(p, tokens) for p in prompts]
    for s in seqs:
        s.finished.wait(600)
    return {"wall_s": max(s.last_token_s for s in seqs) - t0,
            "ttft_mean_s": statistics.mean(s.first_token_s - t0 for s in seqs),
            "outputs": [s.generated for s in seqs]}


def workload_head(args: argparse.Namespace, same: bool, **extra) -> dict:
    """The settings a runtime workload bench records at the head of its JSON (``extra`` after them)."""
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "requests": args.requests,
            "batch": args.batch, "prompt": args.prompt, "tokens": args.tokens, "prefill_tokens": args.prefill_tokens,
            "repeats": args.repeats, "threads": args.threads, **extra, "outputs_equal": same}


def medians_and_ratios(runs: dict[str, list[dict]], base: str, other: str,
                       metrics: tuple[str, ...]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per setting the median of each metric over the rounds, and the median of the rounds'
    ``other / base`` ratios (rounds interleaved, so each ratio compares runs made side by side;
    metrics that are 0 in every ``base`` run get no ratio)."""
    per = {k: {m: statistics.median(x[m] for x in xs) for m in metrics} for k, xs in runs.items()}
    rat = {m: statistics.median(o[m] / b[m] for b, o in zip(runs[base], runs[other]) if b[m])
           for m in metrics if any(b[m] for b in runs[base])}
    return per, rat


def keep_intervals(eng: Engine) -> dict:
    """Make ``eng.observe()`` leave the raw interval sums it takes in the returned dict's ``"iv"``."""
    taken: dict = {}
    take = eng.metrics.take_interval

    def keep():  # noqa: ANN202
        taken["iv"] = take()
        return taken["iv"]

    eng.metrics.take_interval = keep
    return taken


def workload_args(p: argparse.ArgumentParser, batch: int, prompt: int, tokens: int) -> None:
    """The command line of an engine workload bench (this one, bench/pool_dispatch.py)."""
    p.add_argument("--model", default="small")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--batch", type=int, default=batch, help="max_batch of every group (attention: sequences at once)")
    p.add_argument("--prompt", type=int, default=prompt, help="prompt tokens per request")
    p.add_argument("--tokens", type=int, default=tokens, help="generated tokens per request")
    p.add_argument("--prefill-tokens", type=int, default=1024, help="EngineConfig.max_prefill_tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per operator call (CPU)")
    p.add_argument("--json", default=None)


def workload(args: argparse.Namespace) -> tuple[LlamaModel, list[list[int]]]:
    """The model (random weights, seed 0) and the prompts the workload arguments describe."""
    torch.set_num_threads(args.threads)
    cfg = get_model(args.model)
    model = build_model(cfg, dtype=DTYPES[args.dtype], seed=0)
    prompts = [[(31 * b + 7 * j + 1) % cfg.vocab_size for j in range(args.prompt)] for b in range(args.requests)]
    return model, prompts


def run_once(model: LlamaModel, prompts: list[list[int]], tokens: int, device: str, setting: str,
             prefill_tokens: int, batch: int) -> dict:
    """Serve ``prompts`` at once under one setting; wall, TTFT, TBT (seconds) and the outputs."""
    conf = engine_config(model, device, len(prompts) + 1, len(prompts[0]) + tokens)
    conf.micro_batches, conf.micro_batching = SETTINGS[setting]
    conf.max_prefill_tokens = prefill_tokens
    plan = Plan({g: OperatorPlan(1, batch, "dedicated") for g in OPERATOR_GROUPS})
    eng = Engine(model, plan, conf).start()
    try:
        eng.generate(prompts[0][:8], 2)  # warm-up
        eng.observe()  # start the interval the TBT percentiles come from
        it0, cut0 = eng.iterations, eng.micro_batched_iterations
        out = serve_all(eng, prompts, tokens)
        st = eng.observe()
        its = eng.iterations - it0
        return {**out, "tbt_p50_s": st.tbt_p50_s, "cut_share": (eng.micro_batched_iterations - cut0) / max(its, 1)}
    finally:
        eng.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(p, batch=16, prompt=256, tokens=16)
    args = p.parse_args(argv)
    model, prompts = workload(args)
    runs: dict[str, list[dict]] = {k: [] for k in SETTINGS}
    for r in range(args.repeats):
        for k in SETTINGS:
            x = run_once(model, prompts, args.tokens, args.device, k, args.prefill_tokens, args.batch)
            runs[k].append(x)
            print(f"round {r} {k}: wall {x['wall_s']:.3f} s, TTFT mean {x['ttft_mean_s']:.3f} s, TBT p50 "
                  f"{x['tbt_p50_s'] * 1e3:.1f} ms, cut {x['cut_share']:.2f}", file=sys.stderr, flush=True)
    same = all(x["outputs"] == runs["whole"][i]["outputs"] for k in SETTINGS for i, x in enumerate(runs[k]))
    out: dict = {"model": args.model, "device": args.device, "dtype": args.dtype, "requests": args.requests,
                 "batch": args.batch, "prompt": args.prompt, "tokens": args.tokens,
                 "prefill_tokens": args.prefill_tokens, "repeats": args.repeats, "threads": args.threads,
                 "outputs_equal": same}
    for k in SETTINGS:
        out[k] = {m: statistics.median(x[m] for x in runs[k]) for m in ("wall_s", "ttft_mean_s", "tbt_p50_s", "cut_share")}
        if k != "whole":  # ratios of the interleaved pairs, then their median
            out[k]["speedup_wall"] = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(runs["whole"], runs[k]))
            out[k]["speedup_ttft"] = statistics.median(a["ttft_mean_s"] / b["ttft_mean_s"]
                                                       for a, b in zip(runs["whole"], runs[k]))
    print(f"{args.model} on {args.device}, {args.requests} x {args.prompt}-token prompts through the pools "
          f"(whole: {out['whole']['wall_s']:.2f} s, TTFT mean {out['whole']['ttft_mean_s']:.3f} s):")
    for k in ("fixed", "adaptive"):
        print(f"  {k:8s} wall {out[k]['speedup_wall']:.2f}x, TTFT {out[k]['speedup_ttft']:.2f}x faster than whole; "
              f"{out[k]['cut_share']:.0%} of iterations cut")
    print(f"  outputs equal across settings: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
