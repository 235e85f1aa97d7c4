"""Command line: ``python -m traces info|generate``.

- ``info NAME_OR_PATH [--json] [--window S]``: requests, span, mean and peak rates,
  prompt/output token mean/p50/p99 (and a per-window table with ``--window``).
- ``generate KIND --like NAME_OR_PATH --duration S --seed N --out FILE.csv``: draw a
  generated trace fitted to a real one and write it in the (arrived_at,
  num_prefill_tokens, num_decode_tokens) schema with a ``generator`` column.

Bad input exits with code 2 and a one-line ``error:`` message on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from traces.generate import GENERATORS, generate
from traces.loader import TRACE_NAMES, load_trace
from traces.trace import TraceError


def format_info(st: dict[str, Any]) -> str:
    """Human-readable lines for :meth:`traces.Trace.stats` output."""
    label = "GENERATED, not recorded" if st["generated"] else "recorded"
    lines = [
        f"trace     {st['name']} ({label})",
        f"requests  {st['requests']:,}",
        f"span      {st['duration_s']:,.1f} s",
        f"req/s     mean {st['mean_rate_per_s']:.2f}; peak {st['peak_per_s']} in one second; "
        f"peak {st['peak_rate_per_min_s']:.2f} over one minute",
        f"req/min   mean {st['mean_rate_per_s'] * 60:.1f}; max {st['peak_per_min']:,}; "
        f"min {st['min_per_min_nonempty']:,} (non-empty minutes); {st['empty_minutes']} empty minute(s)",
        f"prompt    mean {st['prompt_mean']:.0f}  p50 {st['prompt_p50']:.0f}  p99 {st['prompt_p99']:.0f} tokens",
        f"output    mean {st['output_mean']:.0f}  p50 {st['output_p50']:.0f}  p99 {st['output_p99']:.0f} tokens",
    ]
    if st["images_total"]:
        lines.append(f"images    {st['images_total']:,} in total")
    if st["services"]:
        lines.append("services  " + ", ".join(f"{k} {v:,}" for k, v in st["services"].items()))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m traces", description="Inspect and generate request traces.")
    sub = p.add_subparsers(dest="cmd", required=True)

    info = sub.add_parser("info", help="summary statistics of a trace")
    info.add_argument("trace", help=f"a shipped name ({', '.join(TRACE_NAMES)}) or a CSV path")
    info.add_argument("--json", action="store_true", help="print the statistics as JSON")
    info.add_argument("--window", type=float, default=None, metavar="S",
                      help="also print per-window rate and token statistics for S-second windows")

    gen = sub.add_parser("generate", help="draw a generated trace fitted to a real one")
    gen.add_argument("kind", choices=sorted(GENERATORS))
    gen.add_argument("--like", required=True, help="source trace: a shipped name or a CSV path")
    gen.add_argument("--duration", type=float, default=None, metavar="S",
                     help="seconds to generate (default: the source's span)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True, help="CSV file to write (.csv or .csv.gz)")
    gen.add_argument("--rate", type=float, default=None, dest="rate_per_s",
                     help="mean req/s (default: the source's mean rate)")
    g = gen.add_argument_group("kind options (defaults are fitted or documented in traces/generate.py)")
    g.add_argument("--cv", type=float, help="gamma: inter-arrival coefficient of variation")
    g.add_argument("--window", type=float, dest="window_s", help="mmpp: fitting window (s)")
    g.add_argument("--amplitude", type=float, help="diurnal: cosine amplitude in [0, 1]")
    g.add_argument("--peak-hour", type=float, help="diurnal: hour of the daily peak")
    g.add_argument("--period", type=float, dest="period_s", help="diurnal: seconds per day shape")
    g.add_argument("--start-hour", type=float, help="diurnal: hour of the day at t=0")
    g.add_argument("--shape", type=lambda s: [float(x) for x in s.split(",")],
                   help="diurnal: comma-separated multipliers evenly spaced over the period")
    g.add_argument("--factor", type=float, help="surge: rate multiplier during the surge")
    g.add_argument("--at", type=float, dest="at_s", help="surge: start (s)")
    g.add_argument("--length", type=float, dest="length_s", help="surge: length (s)")
    return p


_FLAGS = {"cv": "--cv", "window_s": "--window", "amplitude": "--amplitude", "peak_hour": "--peak-hour",
          "period_s": "--period", "start_hour": "--start-hour", "shape": "--shape", "factor": "--factor",
          "at_s": "--at", "length_s": "--length"}
_KIND_OPTIONS = {
    "poisson": (),
    "gamma": ("cv",),
    "mmpp": ("window_s",),
    "diurnal": ("amplitude", "peak_hour", "period_s", "start_hour", "shape"),
    "surge": ("factor", "at_s", "length_s"),
}


def _generate(args: argparse.Namespace) -> int:
    opts = {k: v for ks in _KIND_OPTIONS.values() for k in ks if (v := getattr(args, k)) is not None}
    wrong = [k for k in opts if k not in _KIND_OPTIONS[args.kind]]
    if wrong:
        raise ValueError(f"option(s) {', '.join(_FLAGS[w] for w in wrong)} do not apply to {args.kind}")
    source = load_trace(args.like)
    duration = source.duration_s if args.duration is None else args.duration
    tr = generate(args.kind, source, duration, seed=args.seed, rate_per_s=args.rate_per_s, **opts)
    tr.to_csv(args.out)
    print(f"wrote {args.out}: {tr.name}, {len(tr):,} requests over {tr.duration_s:,.1f} s "
          f"({tr.mean_rate_per_s:.2f} req/s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "generate":
            return _generate(args)
        tr = load_trace(args.trace)
        st = tr.stats()
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            print(format_info(st))
        if args.window is not None:
            print()
            print(tr.window_stats(args.window).to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    except (TraceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
