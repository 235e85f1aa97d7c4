"""Compare opscale-profiler measurements with what the ProfileDB predicts without them.

    python bench/profile_compare.py bench/results/gpu/profile_llama-2-7b_h200.csv \\
        --against h100 --against h200 --markdown out.md

For every measured row (one op, tokens, context, batch), the ProfileDB built from the
shipped data only (no ``profiles/data/measured``) is asked for the same point on each
``--against`` GPU: Vidur's measured H100 curves for the linear/norm/elementwise ops, the
roofline for attention and sampling, and whatever the DB derives for GPUs without shipped
rows. The report is the ratio measured / predicted per op: median, spread and the share
of points within 20 %. A ratio above 1 means the real kernel is slower than the simulator
assumes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiles import ProfileDB, ProfileError  # noqa: E402
from profiles.schema import read_profile_csv  # noqa: E402


def compare(measured: pd.DataFrame, db: ProfileDB, against: str) -> pd.DataFrame:
    """One row per measured point with the DB's prediction on ``against`` (ms) and the ratio."""
    rows = []
    for r in measured.itertuples(index=False):
        context = 0.0 if pd.isna(r.context) else float(r.context)
        batch = 1 if pd.isna(r.batch) else int(r.batch)
        try:
            est = db.estimate(r.op, against, r.model, float(r.tokens), context, batch, int(r.tp))
        except ProfileError as e:  # an op the DB cannot answer on that GPU
            rows.append({"op": r.op, "tokens": r.tokens, "context": context, "batch": batch,
                         "measured_ms": r.latency_ms_median, "predicted_ms": np.nan, "ratio": np.nan,
                         "source": f"error: {e}"})
            continue
        rows.append({"op": r.op, "tokens": r.tokens, "context": context, "batch": batch,
                     "measured_ms": r.latency_ms_median, "predicted_ms": est.ms,
                     "ratio": r.latency_ms_median / est.ms, "source": est.source})
    out = pd.DataFrame(rows)
    out.insert(0, "against", against)
    return out


def summarise(points: pd.DataFrame) -> pd.DataFrame:
    """Per (against, op): points, median / min / max ratio, share within 20 %, DB sources."""
    ok = points.dropna(subset=["ratio"])
    g = ok.groupby(["against", "op"], sort=False)
    out = pd.DataFrame({
        "points": g.size(),
        "median_ratio": g["ratio"].median(),
        "min_ratio": g["ratio"].min(),
        "max_ratio": g["ratio"].max(),
        "within_20pct": g["ratio"].apply(lambda x: float(np.mean(np.abs(x - 1.0) <= 0.2))),
        "large_tokens_median": g.apply(lambda d: d.loc[d["tokens"] >= 256, "ratio"].median(), include_groups=False),
        "db_source": g["source"].agg(lambda s: ",".join(sorted(set(s)))),
    })
    return out.reset_index()


def to_markdown(summary: pd.DataFrame) -> str:
    cols = ["against", "op", "points", "median_ratio", "min_ratio", "max_ratio", "large_tokens_median",
            "within_20pct", "db_source"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary[cols].itertuples(index=False):
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="profiler CSV(s) (python -m runtime.profile --out)")
    p.add_argument("--against", action="append", default=None,
                   help="GPU whose shipped/modelled numbers to compare with (repeatable; default h100)")
    p.add_argument("--points", default=None, help="write every point's comparison to this CSV")
    p.add_argument("--markdown", default=None, help="write the summary table to this file")
    args = p.parse_args(argv)
    measured = pd.concat([read_profile_csv(c) for c in args.csv], ignore_index=True)
    db = ProfileDB.load(measured_dir=None)
    points = pd.concat([compare(measured, db, g) for g in (args.against or ["h100"])], ignore_index=True)
    summary = summarise(points)
    md = to_markdown(summary)
    print(md)
    if args.points:
        points.to_csv(args.points, index=False)
    if args.markdown:
        Path(args.markdown).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
