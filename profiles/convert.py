"""Convert the shipped Vidur profiles into the project's schema.

``python -m profiles.convert`` reads profiles/data/vidur/ and writes

* profiles/data/operators.csv.gz: one row per (gpu, model, op, tokens, tp), the
  per-layer time of one call in ms (``source="vidur"``; context, batch, p90, memory,
  power, device and torch version are empty: Vidur's MLP-side ops depend on tokens only and
  it did not record the rest);
* profiles/data/network.csv.gz: all_reduce and send_recv times against message bytes.

Rules (also in docs/PROFILES.md):

* model names are opscale's (runtime/models.py), matched by the Hugging Face folder name;
  the shape columns of each file are checked against runtime/models.py (Vidur pads
  Llama-2 / CodeLlama vocabularies to 32768; that difference is reported, not an error);
* ``mlp_up_proj`` is Vidur's fused gate+up GEMM (2 x d_ff outputs for gated MLPs);
* Vidur measured a few points twice (tokens 2048 and 4096 in every TP; 16384 and 32768
  in the Llama-3 files). Repeats are merged: median and mean = mean of the repeats,
  min = min, max = max, std = pooled (mean of variances + variance of means).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from profiles.ops import VIDUR_OPS
from profiles.paths import DATA, NETWORK_CSV, OPERATORS_CSV, VIDUR
from profiles.schema import COLUMNS, NETWORK_COLUMNS, ProfileError
from runtime.models import MODELS
STATS = ("min", "max", "mean", "median", "std")

_HF_TO_NAME = {m.hf_name: m.name for m in MODELS.values()}


def _merge_repeats(df: pd.DataFrame, keys: list[str], prefix: str) -> pd.DataFrame:
    """Merge rows with equal ``keys``; statistics combined as the module docstring says."""
    # sum / count rather than mean(): a single row then keeps its exact value.
    g = df.groupby(keys, sort=True)
    n = g.size()
    out = pd.DataFrame({
        f"{prefix}.median": g[f"{prefix}.median"].sum() / n,
        f"{prefix}.mean": g[f"{prefix}.mean"].sum() / n,
        f"{prefix}.min": g[f"{prefix}.min"].min(),
        f"{prefix}.max": g[f"{prefix}.max"].max(),
    })
    var_of_means = g[f"{prefix}.mean"].var(ddof=0).where(n > 1, 0.0)
    mean_var = (df[f"{prefix}.std"] ** 2).groupby([df[k] for k in keys]).sum() / n
    out[f"{prefix}.std"] = np.sqrt(mean_var + var_of_means)
    return out.reset_index()


def convert_compute_file(path: Path, gpu: str, model: str) -> tuple[pd.DataFrame, list[str]]:
    """One Vidur mlp.csv.gz as project-schema rows; also returns notes on shape differences."""
    raw = pd.read_csv(path)
    cfg = MODELS[model]
    notes: list[str] = []
    expect = {"n_head": cfg.n_heads, "n_kv_head": cfg.n_kv_heads, "n_embd": cfg.d_model,
              "n_expanded_embd": cfg.d_ff}
    for col, want in expect.items():
        got = set(raw[col].unique().tolist())
        if got != {want}:
            raise ProfileError(f"{path}: column {col!r} holds {sorted(got)}, but runtime/models.py "
                               f"says {model} has {want}")
    vocab = set(raw["vocab_size"].unique().tolist())
    if vocab != {cfg.vocab_size}:
        notes.append(f"{gpu}/{model}: Vidur profiled vocab_size {sorted(vocab)}, "
                     f"runtime/models.py has {cfg.vocab_size}")
    frames = []
    for op in VIDUR_OPS:
        prefix = f"time_stats.{op}"
        if f"{prefix}.median" not in raw.columns:
            continue  # phi-2 has no post_attention_layernorm (parallel attention block)
        cols = [f"{prefix}.{s}" for s in STATS] + ["num_tokens", "num_tensor_parallel_workers"]
        sub = _merge_repeats(raw[cols], ["num_tokens", "num_tensor_parallel_workers"], prefix)
        frames.append(pd.DataFrame({
            "gpu": gpu, "model": model, "op": op,
            "tokens": sub["num_tokens"].astype(int), "context": np.nan, "batch": np.nan,
            "tp": sub["num_tensor_parallel_workers"].astype(int),
            "latency_ms_median": sub[f"{prefix}.median"], "latency_ms_p90": np.nan,
            "latency_ms_mean": sub[f"{prefix}.mean"], "latency_ms_min": sub[f"{prefix}.min"],
            "latency_ms_max": sub[f"{prefix}.max"], "latency_ms_std": sub[f"{prefix}.std"],
            "memory_bytes": np.nan, "power_w": np.nan, "source": "vidur", "device_name": "",
            "torch_version": "", "dtype": "",
        }))
    return pd.concat(frames, ignore_index=True)[list(COLUMNS)], notes


def convert_compute(vidur: Path = VIDUR) -> tuple[pd.DataFrame, list[str]]:
    """All Vidur compute profiles under ``vidur/compute`` in the project schema."""
    frames, notes = [], []
    files = sorted((vidur / "compute").glob("*/*/*/mlp.csv.gz"))
    if not files:
        raise ProfileError(f"no Vidur compute profiles under {vidur / 'compute'}")
    for f in files:
        gpu = f.parts[-4]
        hf = f"{f.parts[-3]}/{f.parts[-2]}"
        if hf not in _HF_TO_NAME:
            raise ProfileError(f"{f}: model folder {hf!r} is not in runtime/models.py "
                               f"(known: {', '.join(sorted(_HF_TO_NAME))})")
        df, n = convert_compute_file(f, gpu, _HF_TO_NAME[hf])
        frames.append(df)
        notes += n
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["gpu", "model", "op", "tp", "tokens"], kind="stable").reset_index(drop=True), notes


def convert_network(vidur: Path = VIDUR) -> pd.DataFrame:
    """All Vidur network profiles (all_reduce, send_recv) in the network schema."""
    frames = []
    for f in sorted((vidur / "network").glob("*/*.csv.gz")):
        node, coll = f.parts[-2], f.name.split(".")[0]
        raw = pd.read_csv(f)
        prefix = f"time_stats.{coll}"
        cols = [f"{prefix}.{s}" for s in STATS] + ["size", "num_workers", "devices_per_node"]
        sub = _merge_repeats(raw[cols], ["size", "num_workers", "devices_per_node"], prefix)
        frames.append(pd.DataFrame({
            "node": node, "collective": coll, "nbytes": sub["size"].astype(np.int64),
            "num_workers": sub["num_workers"].astype(int), "devices_per_node": sub["devices_per_node"].astype(int),
            "latency_ms_median": sub[f"{prefix}.median"], "latency_ms_mean": sub[f"{prefix}.mean"],
            "latency_ms_min": sub[f"{prefix}.min"], "latency_ms_max": sub[f"{prefix}.max"],
            "latency_ms_std": sub[f"{prefix}.std"], "source": "vidur",
        }))
    if not frames:
        raise ProfileError(f"no Vidur network profiles under {vidur / 'network'}")
    return pd.concat(frames, ignore_index=True)[list(NETWORK_COLUMNS)]


def main(argv: list[str] | None = None) -> int:
    """CLI: regenerate operators.csv.gz and network.csv.gz from the Vidur files."""
    ap = argparse.ArgumentParser(prog="python -m profiles.convert", description=__doc__.splitlines()[0])
    ap.add_argument("--vidur", type=Path, default=VIDUR, help="folder holding compute/ and network/")
    ap.add_argument("--out", type=Path, default=DATA, help="folder to write the converted CSVs into")
    args = ap.parse_args(argv)
    ops, notes = convert_compute(args.vidur)
    net = convert_network(args.vidur)
    args.out.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes reproducible run to run.
    comp = {"method": "gzip", "mtime": 0}
    # Default float formatting is the shortest repr that round-trips, so medians stay bit-exact.
    ops.to_csv(args.out / OPERATORS_CSV.name, index=False, compression=comp)
    net.to_csv(args.out / NETWORK_CSV.name, index=False, compression=comp)
    for n in sorted(set(notes)):
        print("note:", n)
    print(f"wrote {len(ops)} operator rows ({ops.groupby(['gpu', 'model']).ngroups} gpu/model pairs) "
          f"to {args.out / OPERATORS_CSV.name}")
    print(f"wrote {len(net)} network rows to {args.out / NETWORK_CSV.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
