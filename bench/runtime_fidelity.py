"""Reference simulator vs the live runtime on the same trace slice, same plan, same machine.

    python -m runtime.profile --model small --device cpu --out bench/results/profile_small_cpu.csv
    python bench/runtime_fidelity.py --model small --profile bench/results/profile_small_cpu.csv \\
        --trace azure-conv --rate-scale 2 --duration 60 --json bench/results/fidelity_small_cpu.json

Steps:

1. The runtime's own operators, profiled on this machine by ``runtime.profile``, are loaded
   into a ProfileDB next to the shipped rows (``gpu = cpu``).
2. Calibration on another slice of the same trace (``--calib-start``), served live the
   same way: the engine logs every iteration (decodes, their context, prefill tokens, wall
   time); what the profiled kernels do not explain is fitted by the simulator's overhead
   model (decode: ``base + per_seq x batch``; prefill: ``prefill_base + scale x kernel``),
   as profiles.calibrate does for the A100 serving measurements.
3. Prediction: ``envs`` reference (discrete-event) simulator of one whole-model instance
   with the same ``max_batch`` and prefill budget as the runtime, over the trace slice.
4. Measurement: the same slice replayed live (``runtime.loadgen``) against the server.
5. Report: predicted vs measured TTFT/TBT p50/p99 and their relative errors.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.control import SLO, Plan  # noqa: E402
from runtime.engine import Engine, EngineConfig  # noqa: E402
from runtime.loadgen import Workload, replay, summarise, workload_from_trace  # noqa: E402
from runtime.model import build_model  # noqa: E402
from runtime.models import get_model  # noqa: E402
from runtime.server import ServerThread, create_app  # noqa: E402


@dataclass(frozen=True)
class HostSpec:
    """The "GPU" facts the predictor asks for, for the CPU host (bytes, watts)."""

    memory_bytes: int
    idle_w: float = 0.0
    peak_w: float = 0.0


class HostProfile:
    """ProfileDB view for ``gpu = cpu``: measured operator latencies, no transfers (one
    process, shared memory), no power model, and an overhead model fitted to the runtime."""

    def __init__(self, db: Any, memory_bytes: int, overhead: Any = None) -> None:
        self.db = db
        self.spec = HostSpec(memory_bytes)
        self.overhead = overhead

    def group_latency(self, group: str, gpu: str, model: str, tokens: int, context: int = 0, batch: int = 1,
                      tp: int = 1, phase: str = "decode") -> float:
        return float(self.db.group_latency(group, gpu, model, tokens, context=context, batch=batch, tp=tp,
                                           phase=phase))

    def send_recv_ms(self, gpu: str, nbytes: float, same_node: bool = True) -> float:
        return 0.0

    def power_w(self, gpu: str, utilisation: float) -> float:
        return 0.0

    def gpu(self, gpu: str) -> HostSpec:
        return self.spec


def fit_overhead(pred_kernel: Any, log: list[Any], n_layers: int, fit_floor: bool = False) -> dict[str, Any]:
    """Fit the simulator's overhead model to logged live iterations (ms).

    The simulator times an iteration as ``max(kernel, floor) + [decodes] x (base + per_seq x
    decodes) + [prefill] x (prefill_base + prefill_kernel_scale x prefill kernel)``. For each
    logged iteration the kernel time and its prefill share come from ``pred_kernel`` (no
    overhead), as :meth:`envs.predictor.ExecutionPredictor.mono_iteration_ms` splits them.
    By default the floor is 0 and ``iteration - kernel`` is fitted, linear in (base, per_seq,
    prefill_base, prefill_kernel_scale). With ``fit_floor`` the floor is fitted too, assuming
    ``kernel < floor`` (the hand-offs between pools cost more than the kernels of the small
    shapes measured here); ``kernel_above_floor`` reports how often that fails. Fits are
    least absolute deviations (a median fit: stalls caused by other processes on a shared
    host are outliers, not overhead), coefficients clipped at 0.
    """
    if not log:
        raise ValueError("no iterations were logged: the calibration slice sent no requests (check --calib-start)")
    X, y, kern = [], [], []
    for r in log:
        dec, ctx, ptok, pseq = r.decode_seqs, r.decode_context, r.prefill_tokens, r.prefill_seqs
        tokens = dec + ptok
        if tokens <= 0:
            continue
        shared = (pred_kernel.group_ms("embed", tokens) + pred_kernel.group_ms("proj", tokens)
                  + pred_kernel.group_ms("mlp", tokens) + pred_kernel.group_ms("head", dec + pseq))
        d_attn = pred_kernel.group_ms("attn", dec, ctx, dec, 1, "decode") if dec else 0.0
        p_attn = pred_kernel.group_ms("attn", ptok, ptok / max(pseq, 1), max(pseq, 1), 1, "prefill") if ptok else 0.0
        kernel = shared + d_attn + p_attn
        pre_share = p_attn + shared * ptok / tokens
        X.append([1.0, 1.0 if dec else 0.0, dec, 1.0 if ptok else 0.0, pre_share])
        y.append(r.duration_s * 1000.0)
        kern.append(kernel)
    A, b = np.array(X), np.array(y)
    if not fit_floor:
        A, b = A[:, 1:], b - np.array(kern)
    w = np.ones(len(b))
    for _ in range(50):  # least absolute deviations by reweighting
        coef, *_ = np.linalg.lstsq(A * w[:, None], b * w, rcond=None)
        coef = np.maximum(coef, 0.0)
        w = 1.0 / np.sqrt(np.maximum(np.abs(b - A @ coef), 1e-3))
    if not fit_floor:
        coef = np.concatenate([[0.0], coef])
        A, b = np.hstack([np.ones((len(b), 1)), A]), b
    floor, base, per_seq, pbase, pscale = (float(c) for c in coef)
    resid = b - A @ coef
    return {"fit_floor": fit_floor, "floor_ms_per_layer": floor / n_layers, "base_ms": base, "per_seq_ms": per_seq,
            "prefill_base_ms": pbase, "prefill_kernel_scale": pscale, "iterations": len(y),
            "median_iteration_ms": float(np.median(np.array(y))), "median_kernel_ms": float(np.median(kern)),
            "kernel_above_floor": float(np.mean(np.array(kern) > floor)),
            "fit_median_abs_ms": float(np.median(np.abs(resid))), "fit_mae_ms": float(np.mean(np.abs(resid)))}


def predict(model_name: str, workload: Workload, host: HostProfile, max_batch: int, prefill_tokens: int,
            slo: SLO, seed: int = 0) -> dict[str, Any]:
    """The reference simulator's TTFT/TBT for ``workload`` under one whole-model instance."""
    from envs.predictor import ExecutionPredictor
    from envs.reference import ReferenceSimulator
    from envs.scenario import Scenario
    from traces import Trace

    sc = Scenario(model=model_name, gpu="cpu", trace="replay", rate_scale=1.0, interval_s=1.0,
                  tp={g: 1 for g in ("embed", "attn", "proj", "mlp", "head")}, model_tp=1, initial_replicas=1,
                  initial_max_batch=max_batch, prefill_chunk_tokens=prefill_tokens, micro_batches=1,
                  gpu_mem_util=1.0, replica_start_s=0.0, max_queue_wait_s=1e9, max_gpus=8,
                  slo_ttft_s=slo.ttft_s, slo_tbt_s=slo.tbt_s)
    pred = ExecutionPredictor(host, model_name, "cpu")
    tr = Trace(np.asarray(workload.arrival_s, dtype=np.float64), np.asarray(workload.prompt_tokens),
               np.asarray(workload.output_tokens), name="replay")
    sim = ReferenceSimulator(sc, tr, pred, slo, seed)
    plan = Plan.model_level(1, max_batch, 1)
    sim.reset(plan)
    for _ in range(100_000):
        if sim.done:
            break
        sim.step(plan)
    return sim.summary()


def measure(model: Any, workload: Workload, max_batch: int, prefill_tokens: int, kv_bytes: int, slo: SLO,
            seed: int = 0, kv_allocation: str = "on_demand") -> tuple[dict[str, Any], list[Any]]:
    """Replay ``workload`` live against the HTTP server; loadgen summary (with the engine's
    preemption count) and the iteration log."""
    eng = Engine(model, Plan.model_level(1, max_batch, 1),
                 EngineConfig(kv_bytes_per_replica=kv_bytes, max_prefill_tokens=prefill_tokens, slo=slo,
                              max_waiting=100_000, log_iterations=True, kv_allocation=kv_allocation)).start()
    srv = ServerThread(create_app(eng)).start()
    try:
        eng.generate([1, 2, 3], 4)  # warm-up
        eng.iteration_log.clear()
        t0 = time.perf_counter()
        results = asyncio.run(replay(srv.url, workload, model.cfg.vocab_size, timeout_s=600, seed=seed))
        summary = summarise(results, time.perf_counter() - t0)
        summary["preemptions"] = eng.preemptions
        return summary, list(eng.iteration_log)
    finally:
        srv.stop()
        eng.stop()


def merge_profiles(paths: list[str], out: Path) -> str:
    """One CSV with, per measurement point, the row of the run with the lowest median latency."""
    import pandas as pd

    if len(paths) == 1:
        return paths[0]
    df = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    key = ["gpu", "model", "op", "tokens", "context", "batch", "tp"]
    best = df.loc[df.fillna({"context": -1, "batch": -1}).groupby(
        [df[k].fillna(-1) for k in key], sort=False)["latency_ms_median"].idxmin()]
    out.parent.mkdir(parents=True, exist_ok=True)
    best.to_csv(out, index=False)
    return str(out)


def _rel(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return (pred - meas) / meas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--profile", required=True, nargs="+",
                   help="CSV(s) written by python -m runtime.profile on this machine; with several, each "
                        "point keeps the run with the lowest median (contention on a shared host only adds time)")
    p.add_argument("--trace", default="azure-conv")
    p.add_argument("--rate-scale", type=float, default=1.0)
    p.add_argument("--start", type=float, default=0.0, help="trace time where the slice starts (s)")
    p.add_argument("--calib-start", type=float, default=1800.0,
                   help="trace time where the calibration slice starts (s); must not overlap the validation slice")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=400)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--kv-mib", type=float, default=64.0)
    p.add_argument("--kv-allocation", choices=("on_demand", "reserve"), default="on_demand",
                   help="the runtime's KV allocation (EngineConfig.kv_allocation); the simulator admits on demand")
    p.add_argument("--no-overhead", action="store_true", help="predict from kernel times only")
    p.add_argument("--fit-floor", action="store_true", help="also fit the per-iteration floor (see fit_overhead)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from profiles import ProfileDB
    from profiles.overhead import OverheadModel

    torch.manual_seed(args.seed)
    cfg = get_model(args.model)
    model = build_model(cfg, dtype=torch.float32, seed=args.seed)
    db = ProfileDB.load([merge_profiles(args.profile, Path(args.json or "fidelity.json").with_name("profile_merged.csv"))])
    kv_bytes = int(args.kv_mib * 2**20)
    from envs.predictor import ExecutionPredictor

    # host "memory" such that the simulator's KV capacity equals the runtime's KV pool:
    # it subtracts weights and activation workspace (max_batch + prefill chunk tokens) first
    probe = ExecutionPredictor(HostProfile(db, 1), args.model, "cpu")
    groups = ("embed", "attn", "proj", "mlp", "head")
    mem = kv_bytes + sum(probe.weight_bytes_per_gpu(g, 1)
                         + probe.activation_bytes_per_gpu(g, args.max_batch + args.prefill_tokens, 1) for g in groups)
    kernel_only = HostProfile(db, memory_bytes=int(mem))

    slo = SLO(ttft_s=2.0, tbt_s=0.5)
    cut = lambda start: workload_from_trace(args.trace, args.rate_scale, args.duration, start,  # noqa: E731
                                            args.max_requests, args.max_prompt, args.max_output)
    # calibration on a different slice of the trace, served the same way
    _, log = measure(model, cut(args.calib_start), args.max_batch, args.prefill_tokens, kv_bytes, slo, args.seed + 1,
                     args.kv_allocation)
    cal = fit_overhead(ExecutionPredictor(kernel_only, args.model, "cpu"), log, cfg.n_layers, args.fit_floor)
    overhead = None if args.no_overhead else OverheadModel(
        cal["floor_ms_per_layer"], cal["base_ms"], cal["per_seq_ms"], cal["prefill_base_ms"], cal["prefill_kernel_scale"])
    host = HostProfile(db, memory_bytes=int(mem), overhead=overhead)
    wl = cut(args.start)
    sim = predict(args.model, wl, host, args.max_batch, args.prefill_tokens, slo, args.seed)
    sim0 = predict(args.model, wl, kernel_only, args.max_batch, args.prefill_tokens, slo, args.seed)
    live, _ = measure(model, wl, args.max_batch, args.prefill_tokens, kv_bytes, slo, args.seed, args.kv_allocation)
    rows = {}
    for k in ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s"):
        rows[k] = {"predicted": sim.get(k), "measured": live.get(k), "rel_error": _rel(sim.get(k), live.get(k)),
                   "predicted_kernels_only": sim0.get(k), "rel_error_kernels_only": _rel(sim0.get(k), live.get(k))}
    out = {"model": args.model, "trace": args.trace, "rate_scale": args.rate_scale, "start_s": args.start,
           "duration_s": args.duration, "requests": len(wl.arrival_s), "max_batch": args.max_batch,
           "kv_mib": args.kv_mib, "kv_allocation": args.kv_allocation,
           "prompt_mean": float(np.mean(wl.prompt_tokens)), "output_mean": float(np.mean(wl.output_tokens)),
           "calibration": cal, "overhead_used": overhead is not None, "torch_threads": torch.get_num_threads(),
           "compare": rows, "simulator_summary": {k: v for k, v in sim.items() if isinstance(v, (int, float))},
           "live_summary": live}
    print(json.dumps(out["compare"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
