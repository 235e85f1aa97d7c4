"""Load generator: replay a trace's arrivals and request sizes against a running server.

    python -m runtime.loadgen --url http://127.0.0.1:8000 --trace azure-conv \\
        --rate-scale 0.5 --duration 60 --json out.json

Each trace request becomes one streamed ``POST /v1/completions`` sent at its (scaled)
arrival time, with a prompt of its prompt length (random token ids, seeded) and
``max_tokens`` = its output length, both clipped to what the served model accepts
(``--max-prompt``, ``--max-output``). TTFT is the time from sending to the first token
event, TBT the gaps between token events. The run is bounded: arrivals in
``[0, duration)`` seconds (scaled time), at most ``--max-requests`` requests, and each
request at most ``--timeout`` seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np


@dataclass
class RequestResult:
    """Outcome of one replayed request (times in seconds)."""

    index: int
    sent_s: float
    prompt_tokens: int
    max_tokens: int
    status: int = 0
    tokens: int = 0
    ttft_s: float | None = None
    tbt_s: list[float] = field(default_factory=list)
    latency_s: float | None = None
    error: str | None = None


@dataclass
class Workload:
    """Requests to send: arrival times (seconds from start), prompt and output lengths (tokens)."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if not (len(self.prompt_tokens) == len(self.output_tokens) == n):
            raise ValueError(f"workload arrays differ in length: {n}, {len(self.prompt_tokens)}, "
                             f"{len(self.output_tokens)}")
        if n and np.any(np.diff(self.arrival_s) < 0):
            raise ValueError("workload arrival times must be sorted")


def workload_from_trace(name: str, rate_scale: float = 1.0, duration_s: float = 60.0, start_s: float = 0.0,
                        max_requests: int = 1000, max_prompt: int = 256, max_output: int = 64) -> Workload:
    """A bounded, clipped slice of a trace (``traces.load_trace`` name or CSV path).

    ``rate_scale`` k compresses time by k (k=2 doubles the rate); the slice starts at trace
    time ``start_s`` and keeps arrivals in ``[0, duration_s)`` after scaling.
    """
    if rate_scale <= 0:
        raise ValueError(f"rate_scale must be > 0, got {rate_scale}")
    from traces import load_trace

    tr = load_trace(name)
    t0 = tr.arrival_s[0] + start_s
    arr = (tr.arrival_s - t0) / rate_scale
    keep = np.flatnonzero((arr >= 0) & (arr < duration_s))[:max_requests]
    return Workload(arr[keep].astype(np.float64),
                    np.clip(tr.prompt_tokens[keep], 1, max_prompt).astype(np.int64),
                    np.clip(tr.output_tokens[keep], 1, max_output).astype(np.int64))


async def _one(client: httpx.AsyncClient, i: int, prompt: list[int], max_tokens: int, timeout: float,
               t_start: float) -> RequestResult:
    res = RequestResult(i, time.perf_counter() - t_start, len(prompt), max_tokens)
    t0 = time.perf_counter()
    last = None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", "/v1/completions",
                                     json={"prompt": prompt, "max_tokens": max_tokens, "stream": True}) as r:
                res.status = r.status_code
                if r.status_code != 200:
                    body = await r.aread()
                    res.error = body.decode(errors="replace")[:200]
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        res.error = str(ev["error"].get("message"))
                        break
                    if ev["choices"][0].get("finish_reason") is not None:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.tbt_s.append(now - last)
                    last = now
                    res.tokens += 1
        res.latency_s = time.perf_counter() - t0
    except TimeoutError:
        res.error = f"timed out after {timeout} s"
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def replay(url: str, workload: Workload, vocab_size: int = 256, timeout_s: float = 120.0,
                 seed: int = 0, max_connections: int = 256) -> list[RequestResult]:
    """Send every request of ``workload`` at its arrival time; returns per-request results."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab_size, int(n)).tolist() for n in workload.prompt_tokens]
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        t_start = time.perf_counter()
        tasks = []
        for i, (t, p, o) in enumerate(zip(workload.arrival_s, prompts, workload.output_tokens)):
            delay = t - (time.perf_counter() - t_start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, i, p, int(o), timeout_s, t_start)))
        return list(await asyncio.gather(*tasks))


def summarise(results: list[RequestResult], wall_s: float) -> dict[str, object]:
    """TTFT/TBT p50/p99 (seconds), throughput (tokens/s, requests/s), errors by status."""
    ok = [r for r in results if r.status == 200 and r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tbt = [g for r in ok for g in r.tbt_s]
    errors: dict[str, int] = {}
    for r in results:
        if r.status != 200 or r.error is not None:
            key = str(r.status) if r.status else "transport"
            errors[key] = errors.get(key, 0) + 1

    def q(xs: list[float], p: float) -> float | None:
        return float(np.percentile(xs, p)) if xs else None

    tokens = sum(r.tokens for r in results)
    return {
        "requests": len(results), "completed": len(ok), "errors": errors,
        "ttft_p50_s": q(ttft, 50), "ttft_p99_s": q(ttft, 99), "tbt_p50_s": q(tbt, 50), "tbt_p99_s": q(tbt, 99),
        "tokens": tokens, "wall_s": wall_s, "throughput_tok_s": tokens / wall_s if wall_s > 0 else 0.0,
        "throughput_req_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "incomplete": sum(1 for r in ok if r.tokens != r.max_tokens),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--trace", default="azure-conv", help="trace name (azure-conv, azure-code, azure) or CSV path")
    p.add_argument("--rate-scale", type=float, default=1.0, help="time compression (2 = twice the rate)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of (scaled) arrivals to send")
    p.add_argument("--start", type=float, default=0.0, help="trace time (seconds) where the slice starts")
    p.add_argument("--max-requests", type=int, default=1000)
    p.add_argument("--max-prompt", type=int, default=256, help="clip prompt lengths to this (tokens)")
    p.add_argument("--max-output", type=int, default=64, help="clip output lengths to this (tokens)")
    p.add_argument("--vocab", type=int, default=256, help="token ids are drawn from [0, vocab)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request limit (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summary (and per-request results) here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        wl = workload_from_trace(args.trace, args.rate_scale, args.duration, args.start, args.max_requests,
                                 args.max_prompt, args.max_output)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"--trace {args.trace}: {e}") from None
    t0 = time.perf_counter()
    results = asyncio.run(replay(args.url, wl, args.vocab, args.timeout, args.seed))
    summary = summarise(results, time.perf_counter() - t0)
    summary.update({"trace": args.trace, "rate_scale": args.rate_scale, "duration_s": args.duration})
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "requests": [asdict(r) for r in results]},
                                              indent=1) + "\n")
    return 0 if not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
