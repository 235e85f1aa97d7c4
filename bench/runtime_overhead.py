"""What splitting the model into operator pools costs, and how fast a pool grows.

    python bench/runtime_overhead.py --model tiny --device cpu --batch 16 --json out.json

1. Decode throughput and time between tokens at the same batch: the operator-split engine
   (``Plan.model_level(1, batch, 1)``: one replica per group, all in one placement slot, so
   each step runs as one fused work item per lane of ``batch`` sequences) against a
   monolithic loop over the same modules in one thread with one contiguous KV cache.
   ``--hops`` also measures the engine with fusion off (every operator call a hand-off to
   its pool's worker thread: what groups on different GPUs pay), as ``split_hops``.
   Both run ``batch`` sequences of ``prompt`` tokens generating ``tokens`` tokens each;
   tokens/s counts decode tokens only (the prefill step is excluded from both). Each is
   run ``--warmup`` times untimed first (default 1), then ``--repeats`` times (medians).
2. Scale-up time-to-serve per operator group: from ``apply(plan with one more replica)``
   until the new replica is ready (weights copied to its device) and until it has served
   its first batch under load.

Runs on CPU now and on CUDA (``--device cuda``; timings synchronise the device).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.control import Plan  # noqa: E402
from runtime.engine import Engine, EngineConfig  # noqa: E402
from runtime.kvcache import KVLayout, gather_unit  # noqa: E402
from runtime.model import LlamaModel, build_model  # noqa: E402
from runtime.models import OPERATOR_GROUPS, get_model  # noqa: E402
from runtime.pools import READY, clone_to  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """A timestamped line on stderr (a run cut short by a time limit shows how far it got)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def monolithic(model: LlamaModel, prompts: list[list[int]], tokens: int, device: str) -> dict[str, float]:
    """Batched greedy decode in one thread; returns decode tokens/s and TBT median/p99 (s).

    Runs on a thread of its own, as the engine's driver does: on a shared CPU, torch ops
    issued from the main thread were measured 50x slower than from another thread (its
    OpenMP team spin-waits for a busy core), which made the baseline, not the engine, the
    thing measured.
    """
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(_monolithic(model, prompts, tokens, device))
        except BaseException as e:  # re-raised on the caller's thread
            out.append(e)

    t = threading.Thread(target=run, name="monolithic")
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


@torch.no_grad()
def _monolithic(model: LlamaModel, prompts: list[list[int]], tokens: int, device: str) -> dict[str, float]:
    cfg = model.cfg
    B, P = len(prompts), len(prompts[0])
    # attention reads the context rounded up to the engine's gather unit (64 tokens on CUDA),
    # as the engine does: the two sides then call attention at the same shapes, and the
    # ratio measures the split, not cuDNN's per-shape graph builds (an H100 profile of the
    # unrounded loop: 1.25 ms of host time per attention call, against 0.12 ms rounded)
    unit = gather_unit(device)
    tmax = -(-(P + tokens) // unit) * unit
    kc = [torch.zeros(B, tmax, cfg.n_kv_heads, cfg.head_dim, device=device, dtype=model.embed.weight.dtype)
          for _ in model.layers]
    vc = [torch.zeros_like(k) for k in kc]
    nxt = []
    for b, p in enumerate(prompts):
        h = model.embed(torch.tensor(p, device=device))
        pos = torch.arange(P, device=device)
        for i, layer in enumerate(model.layers):
            h, k, v = layer.prefill(h, pos)
            kc[i][b, :P], vc[i][b, :P] = k, v
        nxt.append(model.sampler(model.lm_head(model.final_norm(h[-1:]))))
    token = torch.cat(nxt)
    _sync(device)
    gaps = []
    t_start = time.perf_counter()
    last = t_start
    for step in range(1, tokens):
        n = P + step
        h = model.embed(token)
        pos = torch.full((B,), n - 1, device=device)
        lengths = torch.full((B,), n, device=device)
        for i, layer in enumerate(model.layers):
            q, k, v = layer.qkv(layer.attn_norm(h))
            q, k = layer.rope(q, k, pos)
            kc[i][:, n - 1], vc[i][:, n - 1] = k, v
            h = h + layer.o_proj(layer.attn.decode(q, kc[i], vc[i], lengths, max_length=-(-n // unit) * unit))
            h = h + layer.mlp(layer.mlp_norm(h))
        token = model.sampler(model.lm_head(model.final_norm(h)))
        _sync(device)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    wall = time.perf_counter() - t_start
    return {"tokens_per_s": B * (tokens - 1) / wall, "tbt_p50_s": statistics.median(gaps),
            "tbt_p99_s": sorted(gaps)[min(len(gaps) - 1, int(0.99 * len(gaps)))]}


def engine_config(model: LlamaModel, device: str, sequences: int, tokens_per_seq: int) -> EngineConfig:
    """An engine config whose attention replica holds ``sequences`` x ``tokens_per_seq`` KV tokens.

    The engine's default KV budget (64 MiB) is sized for CPU test models; a 7B shape holds
    0.5 MiB of KV per token, so the benchmark sizes the cache for its own workload (plus one
    block per sequence for rounding) instead of measuring admission waits.
    """
    cfg = model.cfg
    dtype = model.embed.weight.dtype
    layout = KVLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, dtype=dtype)
    kv_bytes = sequences * (layout.blocks_for(tokens_per_seq) + 1) * layout.bytes_per_block
    return EngineConfig(device=device, kv_bytes_per_replica=max(kv_bytes, EngineConfig.kv_bytes_per_replica))


def split(model: LlamaModel, prompts: list[list[int]], tokens: int, device: str, batch: int,
          fuse: bool = True) -> dict[str, float]:
    """The same work through the engine (one replica per group, max_batch = batch).

    ``fuse=False`` turns off fused lanes (``EngineConfig.fuse_colocated``).
    """
    conf = engine_config(model, device, len(prompts) + 1, len(prompts[0]) + tokens)
    conf.fuse_colocated = fuse
    eng = Engine(model, Plan.model_level(1, batch, 1), conf).start()
    try:
        eng.generate(prompts[0], 2)  # warm-up
        seqs = [eng.submit(p, tokens) for p in prompts]
        for s in seqs:
            s.finished.wait(600)
        starts = [s.first_token_s for s in seqs]
        ends = [s.last_token_s for s in seqs]
        wall = max(ends) - max(starts)  # decode phase: all sequences have their first token
        st = eng.observe()  # TBT percentiles of every gap emitted since the warm-up
        return {"tokens_per_s": len(prompts) * (tokens - 1) / max(wall, 1e-9), "tbt_p50_s": st.tbt_p50_s,
                "tbt_p99_s": st.tbt_p99_s}
    finally:
        eng.stop()


def scale_up(model: LlamaModel, device: str, batch: int, prompt: int, tokens: int,
             out: dict[str, dict[str, float]] | None = None,
             on_group: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """Per group: seconds from apply() to the new replica being ready and to its first batch.

    Fills ``out`` (a new dict if None) group by group, calling ``on_group()`` after each, so
    a run cut short still leaves the groups it measured.
    """
    out = {} if out is None else out
    base = Plan.model_level(1, batch, 1)
    conf = engine_config(model, device, 2 * batch, prompt + tokens)
    for g in OPERATOR_GROUPS:
        eng = Engine(model, base, conf).start()
        try:
            # keep load on so the new replica gets work as soon as it joins
            seqs = [eng.submit([(7 * i + j) % model.cfg.vocab_size for j in range(prompt)], tokens)
                    for i in range(2 * batch)]
            while not any(s.generated for s in seqs):
                time.sleep(0.0005)
            old = {r.id for r in eng.replicas[g]}
            t0 = time.perf_counter()
            eng.apply(base.with_op(g, replicas=2).with_op(g, placement="dedicated"))
            new = None
            t_ready = t_first = float("nan")
            deadline = t0 + 120
            while time.perf_counter() < deadline:
                reps = [r for r in eng.replicas[g] if r.id not in old]
                if reps:
                    new = reps[0]
                if new is not None and new.state == READY and t_ready != t_ready:
                    t_ready = time.perf_counter() - t0
                if new is not None and new.items_done > 0:
                    t_first = time.perf_counter() - t0
                    break
                time.sleep(0.0002)
            out[g] = {"ready_s": t_ready, "first_batch_s": t_first, "load_s": new.load_s if new else float("nan"),
                      "weight_bytes": float(sum(p.numel() * p.element_size() for p in new.modules.parameters()))
                      if new is not None and new.modules is not None else 0.0}
            for s in seqs:
                s.finished.wait(600)
        finally:
            eng.stop()
        progress(f"scale-up {g}: {out[g]}")
        if on_group is not None:
            on_group()
    return out


def op_table(name: str, run: Any, device: str, rows: int = 25) -> str:
    """``run()`` under torch.profiler: its top operators by self device time and by host time.

    Both sides issue their ops from threads of their own, so host ops are recorded with
    ``profile_all_threads`` where this torch has it; device kernels are recorded from any
    thread either way.
    """
    acts = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    try:
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except TypeError:  # older torch: host ops of the caller's thread only
        config = None
    with torch.profiler.profile(activities=acts, experimental_config=config) as prof:
        run()
        _sync(device)
    ka = prof.key_averages()
    out = f"== {name}: by {sort}\n{ka.table(sort_by=sort, row_limit=rows)}\n"
    if device == "cuda":
        out += f"== {name}: by cpu_time_total\n{ka.table(sort_by='cpu_time_total', row_limit=rows)}\n"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--tokens", type=int, default=32, help="generated tokens per sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs of each before the repeats (on CUDA the first run of a shape pays "
                        "cuDNN attention graph builds)")
    p.add_argument("--no-scale-up", action="store_true", help="skip part 2 (scale-up time per group)")
    p.add_argument("--hops", action="store_true",
                   help="also measure the engine with fused lanes off (key split_hops)")
    p.add_argument("--json", default=None)
    p.add_argument("--op-table", default=None, metavar="FILE",
                   help="after the repeats, run each side once more under torch.profiler and write its "
                        "top operators (self device time and host time) to FILE (times there include "
                        "the profiler's own cost: read them as shares, not as the benchmark)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    dtype = DTYPES[args.dtype or ("float16" if args.device == "cuda" else "float32")]
    cfg = get_model(args.model)
    # Random weights are drawn on the device (seconds for a 7B shape on a GPU, a minute on a
    # CPU); the engine's master copy lives in host memory, as a server's weight cache would,
    # so a new replica pays the host-to-device copy.
    mono_model = build_model(cfg, device=args.device if args.device == "cpu" else "cuda:0", dtype=dtype, seed=0)
    model = clone_to(mono_model, torch.device("cpu")) if args.device == "cuda" else build_model(cfg, dtype=dtype, seed=0)
    prompts = [[(11 * b + 3 * j) % cfg.vocab_size for j in range(args.prompt)] for b in range(args.batch)]
    mono_dev = "cpu" if args.device == "cpu" else "cuda:0"
    progress(f"{cfg.name} built on {args.device}")
    mono, spl, hops = [], [], []
    for i in range(args.warmup):
        monolithic(mono_model, prompts, args.tokens, mono_dev)
        split(model, prompts, args.tokens, args.device, args.batch)
        progress(f"warm-up {i + 1} done")
    for i in range(args.repeats):
        mono.append(monolithic(mono_model, prompts, args.tokens, mono_dev))
        spl.append(split(model, prompts, args.tokens, args.device, args.batch))
        if args.hops:
            hops.append(split(model, prompts, args.tokens, args.device, args.batch, fuse=False))
        progress(f"repeat {i + 1}: monolithic {mono[-1]['tokens_per_s']:.1f} tokens/s, "
                 f"split {spl[-1]['tokens_per_s']:.1f} tokens/s")
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    result = {
        "model": cfg.name, "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "prompt": args.prompt, "tokens": args.tokens,
        "warmup": args.warmup,
        "torch_threads": torch.get_num_threads(),
        "monolithic": {k: med(mono, k) for k in ("tokens_per_s", "tbt_p50_s", "tbt_p99_s")},
        "split": {k: med(spl, k) for k in ("tokens_per_s", "tbt_p50_s", "tbt_p99_s")},
    }
    result["split_over_monolithic_tokens_per_s"] = result["split"]["tokens_per_s"] / result["monolithic"]["tokens_per_s"]
    # per repeat, in order; without --warmup the first repeat on CUDA also pays cuDNN attention
    # graph builds for every attention shape it meets (the monolithic loop: one per decode
    # step; the engine: one per 64-token bucket)
    result["monolithic_runs_tokens_per_s"] = [r["tokens_per_s"] for r in mono]
    result["split_runs_tokens_per_s"] = [r["tokens_per_s"] for r in spl]
    result["split_over_monolithic_tbt_p50"] = result["split"]["tbt_p50_s"] / result["monolithic"]["tbt_p50_s"]
    if hops:
        result["split_hops"] = {k: med(hops, k) for k in ("tokens_per_s", "tbt_p50_s", "tbt_p99_s")}
        result["split_hops_over_monolithic_tokens_per_s"] = (result["split_hops"]["tokens_per_s"]
                                                             / result["monolithic"]["tokens_per_s"])

    def emit() -> None:  # after each part, so a run cut short keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    emit()
    if args.op_table:
        Path(args.op_table).write_text(
            op_table("monolithic", lambda: monolithic(mono_model, prompts, args.tokens, mono_dev), args.device)
            + op_table("split", lambda: split(model, prompts, args.tokens, args.device, args.batch), args.device))
        progress(f"operator tables written to {args.op_table}")
    if not args.no_scale_up:
        result["scale_up"] = {}
        scale_up(model, args.device, args.batch, args.prompt, args.tokens, out=result["scale_up"], on_group=emit)
    print(json.dumps(result, indent=2))
    emit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
