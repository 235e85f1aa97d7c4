"""Fit the per-iteration overhead and the power curve on measured A100 serving (splitwise-sim data).

``python -m profiles.calibrate`` prints (and with ``--markdown FILE`` writes) the fitted
parameters and a per-configuration table of predicted vs measured times. The fitted
constants are copied into profiles/overhead.py (OVERHEAD) and profiles/gpus.py
(IDLE_FRACTION_OF_TDP, BUSY_FRACTION_OF_TDP); tests/test_profiles_calibration.py re-runs the fit
and checks that they match.

Data: profiles/data/calibration/splitwise_a100_perf.csv, Llama-2-70B on a DGX-A100 at TP
2/4/8; per configuration (tp, batch, prompt, output tokens) the median of its repeats.
Kernel sums come from :meth:`ProfileDB.model_step_latency` with ``calibrated=False``:
decode = ``batch`` sequences at the mean KV length ``prompt + output / 2``; prefill =
``batch`` prompts of ``prompt`` tokens.

Excluded: the TP2 batch-64 prefill (prompt_time 794 ms, below the 6,633 ms of batch 32 with
half the work: not a complete prefill of 64 prompts).

Fit: for each floor value on a 0.001 ms/layer grid, the remaining parameters are linear and
solved by least squares on relative errors (each row weighted by 1 / measured); the floor
with the smallest total squared relative error wins.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from profiles.db import ProfileDB
from profiles.overhead import OverheadModel
from profiles.paths import CALIBRATION_CSV
from runtime.models import MODELS

GPU, MODEL, CSV_MODEL = "a100", "llama-2-70b", "llama2-70b"
#: Power limit the calibration CSV's power fractions refer to (A100 80GB SXM, watts).
A100_POWER_LIMIT_W = 400.0
FLOOR_GRID = np.round(np.arange(0.0, 1.0005, 0.001), 3)


@dataclass
class CalibrationResult:
    """Fitted overhead model, the per-configuration table and the power fit."""

    model: OverheadModel
    table: pd.DataFrame  # tp, batch, prompt, output, phase, measured_ms, kernel_ms, predicted_ms, err_pct, excluded
    power: dict[str, float]
    power_table: pd.DataFrame

    def mean_abs_pct(self, phase: str | None = None) -> float:
        """Mean |predicted - measured| / measured in % over fitted rows (optionally one phase)."""
        t = self.table[~self.table["excluded"]]
        if phase:
            t = t[t["phase"] == phase]
        return float(t["err_pct"].abs().mean())


def load_configs(path: Path = CALIBRATION_CSV) -> pd.DataFrame:
    """One row per Llama-2-70B configuration: medians of prompt_time and token_time (ms)."""
    df = pd.read_csv(path)
    d = df[df["model"] == CSV_MODEL]
    if d.empty:
        raise ValueError(f"{path}: no rows with model == {CSV_MODEL!r}")
    keys = ["tensor_parallel", "batch_size", "prompt_size", "token_size"]
    g = d.groupby(keys).agg(prompt_ms=("prompt_time", "median"), token_ms=("token_time", "median"),
                            e2e_ms=("e2e_time", "median"), avg_power=("average_power", "median"),
                            repeats=("token_time", "size")).reset_index()
    return g.rename(columns={"tensor_parallel": "tp", "batch_size": "batch", "prompt_size": "prompt",
                             "token_size": "output"})


def kernel_sums(db: ProfileDB, cfg: pd.DataFrame) -> pd.DataFrame:
    """Adds decode_kernel_ms and prefill_kernel_ms (uncalibrated kernel sums) to ``cfg``."""
    out = cfg.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prefills above 4096 tokens are extrapolated; counted in db.flags
        out["decode_kernel_ms"] = [
            db.model_step_latency(GPU, MODEL, r.batch, r.prompt + r.output / 2, r.batch, int(r.tp), "decode")
            for r in out.itertuples()]
        out["prefill_kernel_ms"] = [
            db.model_step_latency(GPU, MODEL, r.batch * r.prompt, r.prompt, r.batch, int(r.tp), "prefill")
            for r in out.itertuples()]
    return out


def _rows(cfg: pd.DataFrame) -> pd.DataFrame:
    dec = pd.DataFrame({"tp": cfg.tp, "batch": cfg.batch, "prompt": cfg.prompt, "output": cfg.output,
                        "phase": "decode", "measured_ms": cfg.token_ms, "kernel_ms": cfg.decode_kernel_ms})
    pre = pd.DataFrame({"tp": cfg.tp, "batch": cfg.batch, "prompt": cfg.prompt, "output": cfg.output,
                        "phase": "prefill", "measured_ms": cfg.prompt_ms, "kernel_ms": cfg.prefill_kernel_ms})
    rows = pd.concat([dec, pre], ignore_index=True)
    # Prefill runs that took less time than the next smaller batch at the same TP did not
    # prefill the whole batch (see module docstring).
    rows["excluded"] = False
    for tp, g in rows[rows.phase == "prefill"].groupby("tp"):
        g = g[(g.prompt == 512) & (g.output == 128)].sort_values("batch")
        prev = np.maximum.accumulate(g["measured_ms"].to_numpy())
        bad = g["measured_ms"].to_numpy() < np.concatenate([[0], prev[:-1]])
        rows.loc[g.index[bad], "excluded"] = True
    return rows


def fit(rows: pd.DataFrame, layers: int) -> OverheadModel:
    """Least-squares fit of :class:`OverheadModel` on relative errors (module docstring)."""
    use = rows[~rows["excluded"]]
    dec = (use.phase == "decode").to_numpy()
    y = use["measured_ms"].to_numpy()
    k = use["kernel_ms"].to_numpy()
    b = use["batch"].to_numpy(np.float64)
    best = None
    for f in FLOOR_GRID:
        floor = np.maximum(k, f * layers)
        # decode rows: step - floor = base_d + per_seq * batch; prefill rows: = base_p + scale * kernel
        A = np.column_stack([dec, b * dec, ~dec, k * ~dec]).astype(np.float64)
        w = 1.0 / y
        coef, *_ = np.linalg.lstsq(A * w[:, None], (y - floor) * w, rcond=None)
        coef = np.maximum(coef, 0.0)
        pred = floor + A @ coef
        sse = float(np.sum(((pred - y) / y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, f, coef)
    _, f, (base_d, per_seq, base_p, m) = best
    return OverheadModel(floor_ms_per_layer=float(f), base_ms=round(float(base_d), 3),
                         per_seq_ms=round(float(per_seq), 4), prefill_base_ms=round(float(base_p), 3),
                         prefill_kernel_scale=round(float(m), 4))


def fit_power(cfg: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame]:
    """Fit P = idle + (busy - idle) * u on the rows that recorded power (A100, watts).

    u = kernel-busy share of the request's end-to-end time, (prefill kernels + output x
    decode kernels) / e2e, clipped to 1. P = average_power x 400 W (the A100 power limit the
    CSV's fractions refer to). idle and busy (the power at u = 1) are fitted by least
    squares; both are reported as fractions of the 400 W TDP so they carry to other GPUs.
    Rows whose average power is below 25% of the limit (the three prompt-8192 runs, 69-73 W,
    while the GPUs are busy 45-94% of the time) look like a logging fault and are excluded.
    """
    p = cfg[cfg["avg_power"] > 0].copy()
    p["util"] = ((p.prefill_kernel_ms + p.output * p.decode_kernel_ms) / p.e2e_ms).clip(0, 1)
    p["power_w"] = p["avg_power"] * A100_POWER_LIMIT_W
    p["excluded"] = p["avg_power"] < 0.25
    use = p[~p.excluded]
    A = np.column_stack([1.0 - use["util"], use["util"]])
    (idle, busy), *_ = np.linalg.lstsq(A, use["power_w"].to_numpy(), rcond=None)
    p["predicted_w"] = idle + (busy - idle) * p["util"]
    used = p[~p.excluded]
    mape = float(np.mean(np.abs(used.predicted_w - used.power_w) / used.power_w) * 100)
    return ({"idle_w": round(float(idle), 1), "busy_w": round(float(busy), 1),
             "idle_fraction": round(float(idle) / A100_POWER_LIMIT_W, 3),
             "busy_fraction": round(float(busy) / A100_POWER_LIMIT_W, 3),
             "mean_abs_pct": round(mape, 1), "rows": int(len(used)), "excluded": int(p.excluded.sum())}, p)


def calibrate(db: ProfileDB | None = None, path: Path = CALIBRATION_CSV) -> CalibrationResult:
    """Run the whole calibration: kernel sums, overhead fit, power fit."""
    db = db or ProfileDB.load()
    cfg = kernel_sums(db, load_configs(path))
    rows = _rows(cfg)
    model = fit(rows, MODELS[MODEL].n_layers)
    layers = MODELS[MODEL].n_layers
    rows["predicted_ms"] = [
        float(model.step_ms(r.kernel_ms, layers, int(r.tp), r.batch, r.batch * (r.prompt if r.phase == "prefill" else 1),
                            r.phase)) for r in rows.itertuples()]
    rows["err_pct"] = (rows.predicted_ms - rows.measured_ms) / rows.measured_ms * 100
    power, ptable = fit_power(cfg)
    return CalibrationResult(model, rows, power, ptable)


def to_markdown(res: CalibrationResult) -> str:
    """The fit as a markdown section (parameters, error summary, per-configuration table)."""
    m = res.model
    t = res.table
    lines = [
        f"Fitted overhead model: floor {m.floor_ms_per_layer:.3f} ms/layer, decode base {m.base_ms:.3f} ms, "
        f"per sequence {m.per_seq_ms:.4f} ms, prefill base {m.prefill_base_ms:.3f} ms, "
        f"prefill kernel scale {m.prefill_kernel_scale:.4f}.",
        "",
        f"Mean absolute error over fitted rows: decode {res.mean_abs_pct('decode'):.1f}%, "
        f"prefill {res.mean_abs_pct('prefill'):.1f}%, all {res.mean_abs_pct():.1f}% "
        f"(uncalibrated kernel sum: decode "
        f"{(t[(t.phase == 'decode') & ~t.excluded].eval('(kernel_ms - measured_ms) / measured_ms').abs().mean() * 100):.1f}%, "
        f"prefill "
        f"{(t[(t.phase == 'prefill') & ~t.excluded].eval('(kernel_ms - measured_ms) / measured_ms').abs().mean() * 100):.1f}%).",
        "",
        "| tp | batch | prompt | output | phase | measured ms | kernel sum ms | predicted ms | error % |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in t.sort_values(["phase", "tp", "batch", "prompt", "output"]).itertuples():
        err = "excluded" if r.excluded else f"{r.err_pct:+.1f}"
        lines.append(f"| {r.tp} | {r.batch} | {r.prompt} | {r.output} | {r.phase} | {r.measured_ms:.1f} | "
                     f"{r.kernel_ms:.1f} | {r.predicted_ms:.1f} | {err} |")
    p = res.power
    lines += ["", f"Power fit (A100, TDP {A100_POWER_LIMIT_W:.0f} W): idle {p['idle_w']} W "
              f"({p['idle_fraction']} of TDP), fully busy {p['busy_w']} W ({p['busy_fraction']} of TDP), "
              f"mean abs error {p['mean_abs_pct']}% over {p['rows']} configurations ({p['excluded']} excluded)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: run the calibration, print the result, optionally write it as markdown."""
    ap = argparse.ArgumentParser(prog="python -m profiles.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=CALIBRATION_CSV, help="calibration CSV (splitwise format)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    res = calibrate(path=args.csv)
    md = to_markdown(res)
    print(md)
    print("\npower rows:")
    print(res.power_table[["tp", "batch", "prompt", "output", "util", "power_w", "predicted_w", "excluded"]]
          .round(3).to_string(index=False))
    if args.markdown:
        args.markdown.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
