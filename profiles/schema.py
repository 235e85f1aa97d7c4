"""The project's profile CSV schema and a validating reader.

One row per measurement point (docs/ARCHITECTURE.md, "profiles"):

``gpu, model, op, tokens, context, batch, tp, latency_ms_median, latency_ms_p90,
latency_ms_mean, latency_ms_min, latency_ms_max, latency_ms_std, memory_bytes, power_w,
source, device_name, torch_version, dtype``

``tokens`` = tokens in the batch, ``context`` = KV length (decode) or prompt length
(prefill), ``batch`` = sequences. Latencies are per call of one layer's op (ms). Cells a
source did not measure are empty. Files may be gzip-compressed (``.csv.gz``).

The network CSV (our own schema for the converted Vidur collectives) is
``node, collective, nbytes, num_workers, devices_per_node, latency_ms_median,
latency_ms_mean, latency_ms_min, latency_ms_max, latency_ms_std, source``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from profiles.ops import ALL_OPS
from runtime.models import MODELS

COLUMNS: tuple[str, ...] = (
    "gpu", "model", "op", "tokens", "context", "batch", "tp",
    "latency_ms_median", "latency_ms_p90", "latency_ms_mean", "latency_ms_min", "latency_ms_max",
    "latency_ms_std", "memory_bytes", "power_w", "source", "device_name", "torch_version", "dtype",
)
NUMERIC: tuple[str, ...] = (
    "tokens", "context", "batch", "tp", "latency_ms_median", "latency_ms_p90", "latency_ms_mean",
    "latency_ms_min", "latency_ms_max", "latency_ms_std", "memory_bytes", "power_w",
)
NETWORK_COLUMNS: tuple[str, ...] = (
    "node", "collective", "nbytes", "num_workers", "devices_per_node", "latency_ms_median",
    "latency_ms_mean", "latency_ms_min", "latency_ms_max", "latency_ms_std", "source",
)
#: Tensor-parallel degrees a profile row may carry.
TP_DEGREES: tuple[int, ...] = (1, 2, 4, 8)


class ProfileError(ValueError):
    """A profile query or file the database cannot answer or read; the message names the value."""


def _bad(path: Path, row: int, col: str, value: object, why: str) -> ProfileError:
    # row is the 1-based line number in the file (header = line 1).
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return ProfileError(f"{path}: line {row}, column {col!r}: value {value!r} {why}")


def read_profile_csv(path: str | Path) -> pd.DataFrame:
    """Read and validate one profile CSV in the project schema.

    Raises ProfileError naming the file, line, column and value of the first problem:
    missing columns, non-numeric cells, unknown op or model, tokens < 1, tp not in
    {1, 2, 4, 8}, or a missing / non-positive median latency.
    """
    path = Path(path)
    if not path.exists():
        raise ProfileError(f"profile file {path} does not exist")
    try:
        df = pd.read_csv(path, dtype={"gpu": str, "model": str, "op": str, "source": str,
                                      "device_name": str, "torch_version": str, "dtype": str})
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise ProfileError(f"{path}: cannot parse as CSV: {e}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ProfileError(f"{path}: missing columns {missing}; the schema is {list(COLUMNS)}")
    for col in NUMERIC:
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() & df[col].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise _bad(path, i + 2, col, df[col].iloc[i], "is not a number")
        df[col] = num.astype(np.float64)
    for col, known in (("op", ALL_OPS), ("model", tuple(MODELS))):
        bad = ~df[col].isin(known)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise _bad(path, i + 2, col, df[col].iloc[i], f"is unknown; known: {', '.join(known)}")
    bad = df["gpu"].isna()
    if bad.any():
        raise _bad(path, int(np.flatnonzero(bad.to_numpy())[0]) + 2, "gpu", None, "is empty")
    bad = ~(df["tokens"] >= 1)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise _bad(path, i + 2, "tokens", df["tokens"].iloc[i], "must be >= 1")
    bad = ~df["tp"].isin(TP_DEGREES)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise _bad(path, i + 2, "tp", df["tp"].iloc[i], f"must be one of {TP_DEGREES}")
    bad = ~(df["latency_ms_median"] > 0)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise _bad(path, i + 2, "latency_ms_median", df["latency_ms_median"].iloc[i], "must be > 0 ms")
    df["gpu"] = df["gpu"].str.lower()
    df["tp"] = df["tp"].astype(int)
    return df


def read_network_csv(path: str | Path) -> pd.DataFrame:
    """Read and validate the converted network CSV; ProfileError names file, line, column, value."""
    path = Path(path)
    if not path.exists():
        raise ProfileError(f"network profile file {path} does not exist")
    df = pd.read_csv(path)
    missing = [c for c in NETWORK_COLUMNS if c not in df.columns]
    if missing:
        raise ProfileError(f"{path}: missing columns {missing}; the schema is {list(NETWORK_COLUMNS)}")
    for col in ("nbytes", "latency_ms_median"):
        bad = ~(pd.to_numeric(df[col], errors="coerce") > 0)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise _bad(path, i + 2, col, df[col].iloc[i], "must be a number > 0")
    return df
