"""How much of the next control interval's load its past predicts.

The hindsight oracle (bench/hindsight_oracle.py) holds the SLO at about half static's GPUs when it
may read 5-10 s ahead, and a rule that knows every past interval's exact need but nothing ahead
needs about 0.75x static (docs/RESULTS.md "Oracle over time"). The difference is foresight. This
measures how much foresight the trace's own past offers: per interval of ``--interval`` seconds,
the load (prompt tokens arriving: prefill work, which is what bursts are made of; and request
arrivals) is forecast from the previous ``--history`` intervals by

* ``last``: the previous interval's load;
* ``mean3``: the mean of the last three;
* ``max2``: the larger of the last two (the reactive rule's provisioning);
* ``ar``: least squares on log(1 + load) of the last ``--history`` intervals plus a constant,
  fitted on the train split (what a policy seeing the rate history could at best learn linearly).

For each forecaster on the evaluation split: R^2 of the load (1 - SSE / variance; below 0 is worse
than forecasting the split's mean), and the share of intervals whose load exceeds the forecast by
more than 25 % and 50 % (an under-forecast burst is what a controller must carry headroom for).

    python bench/forecastability.py --split test --json docs/results/forecastability_test.json

Units: tokens or requests per interval; the forecasters see only intervals before the one forecast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.envtools import load_scenario, load_split  # noqa: E402
from envs import SPLITS  # noqa: E402

SERIES = ("prompt_tokens", "requests")


def per_interval(trace, interval_s: float) -> dict[str, np.ndarray]:  # noqa: ANN001 - a traces.Trace
    """Prompt tokens and requests arriving in each interval of ``trace``."""
    n = max(int(np.ceil(trace.duration_s / interval_s)), 1)
    idx = np.minimum((np.asarray(trace.arrival_s) // interval_s).astype(np.int64), n - 1)
    return {"prompt_tokens": np.bincount(idx, weights=np.asarray(trace.prompt_tokens, dtype=float), minlength=n),
            "requests": np.bincount(idx, minlength=n).astype(float)}


def lagged(x: np.ndarray, history: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the ``history`` values before each interval, oldest first; the interval's value)."""
    if len(x) <= history:
        raise ValueError(f"{len(x)} intervals: need more than --history {history}")
    rows = np.lib.stride_tricks.sliding_window_view(x[:-1], history)
    return rows, x[history:]


def fit_ar(x: np.ndarray, history: int) -> np.ndarray:
    """Least-squares weights (constant last) of log1p(load) on its last ``history`` log1p values."""
    rows, y = lagged(np.log1p(x), history)
    a = np.hstack([rows, np.ones((len(rows), 1))])
    w, *_ = np.linalg.lstsq(a, y, rcond=None)
    return w


def forecasts(x: np.ndarray, history: int, w: np.ndarray) -> dict[str, np.ndarray]:
    """Each forecaster's prediction of x[history:] from the intervals before each."""
    rows, _ = lagged(x, history)
    logrows = np.log1p(rows)
    return {"last": rows[:, -1], "mean3": rows[:, -3:].mean(axis=1), "max2": rows[:, -2:].max(axis=1),
            "ar": np.expm1(np.hstack([logrows, np.ones((len(rows), 1))]) @ w)}


def scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """R^2 and the shares of intervals whose load exceeds the forecast by > 25 % and > 50 %."""
    var = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / var if var > 0 else float("nan")
    over = y / np.maximum(pred, 1e-9)
    return {"r2": r2, "over_25pct": float(np.mean(over > 1.25)), "over_50pct": float(np.mean(over > 1.5))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=SPLITS, help="split the forecasters are scored on")
    ap.add_argument("--fit-split", default="train", choices=SPLITS, help="split the AR weights are fitted on")
    ap.add_argument("--interval", type=float, default=None, help="seconds (default: the scenario's interval_s)")
    ap.add_argument("--history", type=int, default=8, help="past intervals the AR forecaster sees")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.history < 3:
        ap.error(f"--history {a.history}: at least 3 (mean3 needs three intervals)")
    sc = load_scenario()
    dt = float(a.interval or sc.interval_s)
    if dt <= 0:
        ap.error(f"--interval {a.interval}: must be positive")
    fit = per_interval(load_split(sc, a.fit_split), dt)
    ev = per_interval(load_split(sc, a.split), dt)
    out: dict = {"split": a.split, "fit_split": a.fit_split, "interval_s": dt, "history": a.history, "series": {}}
    for name in SERIES:
        w = fit_ar(fit[name], a.history)
        _, y = lagged(ev[name], a.history)
        rows = {f: scores(p, y) for f, p in forecasts(ev[name], a.history, w).items()}
        out["series"][name] = {"intervals": int(len(y)), "mean": float(y.mean()),
                               "cv": float(y.std() / max(y.mean(), 1e-9)), "forecasters": rows}
        print(f"{name} per {dt:g} s on {a.split} ({len(y)} intervals, mean {y.mean():.0f}, "
              f"cv {y.std() / max(y.mean(), 1e-9):.2f}); AR fitted on {a.fit_split}")
        for f, r in rows.items():
            print(f"  {f:6s} R^2 {r['r2']:6.3f}   load > forecast x1.25 in {r['over_25pct']:.1%}, "
                  f"x1.5 in {r['over_50pct']:.1%} of intervals")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
