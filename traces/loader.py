"""Load traces: the shipped Azure 2023 traces by name, or any CSV in a known schema by path.

Schemas (column names exact, extra columns ignored):

- Azure: ``TIMESTAMP`` (e.g. ``2023-11-16 18:17:03.9799600``), ``ContextTokens``,
  ``GeneratedTokens``, optional ``NumImages`` (the 2023, 2024 week-long and 2025
  multimodal Azure LLM inference traces).
- Seconds: ``arrived_at`` (seconds), ``num_prefill_tokens``, ``num_decode_tokens``,
  optional ``num_images``, ``service`` and ``generator`` (what ``python -m traces
  generate`` writes; also the Vidur processed-trace schema).

Azure timestamps are re-based so the first request arrives at 0 s; times in seconds are
kept as written (so a generated trace survives a round trip), shifted only when some are
negative. Parsed files are cached
per process (keyed by path, size and modification time); traces are immutable, so the
cache hands out the same object.
"""
from __future__ import annotations

import functools
import os
import warnings
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from traces.trace import Trace, TraceError, TraceWarning

DATA_DIR = Path(__file__).resolve().parent / "data"

#: Shipped single-service traces: name -> (file in traces/data, service label).
SHIPPED_FILES: dict[str, tuple[str, str]] = {
    "azure-conv": ("AzureLLMInferenceTrace_conv.csv.gz", "conv"),
    "azure-code": ("AzureLLMInferenceTrace_code.csv.gz", "code"),
}
#: Every name :func:`load_trace` knows; ``azure`` is conv and code merged by wall-clock time.
TRACE_NAMES: tuple[str, ...] = ("azure-conv", "azure-code", "azure")

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
SECONDS_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
_OPTIONAL = ("NumImages", "num_images", "service", "generator")
_TIMESTAMP_EXAMPLE = "2023-11-16 18:17:03.9799600"


def _row(i: int) -> str:
    """Data row i (0-based) as users count it: 1-based data row and file line (header = line 1)."""
    return f"row {i + 1} (line {i + 2})"


def _raw_value(path: Path, col: str, i: int) -> str:
    """The text of one cell, re-read as strings (only on the error path)."""
    try:
        raw = pd.read_csv(path, usecols=[col], dtype=str, keep_default_na=False)
        return raw[col].iloc[i]
    except Exception:  # pragma: no cover - best effort for the message only
        return "?"


def _read_frame(path: Path) -> pd.DataFrame:
    wanted = set(AZURE_COLUMNS + SECONDS_COLUMNS + _OPTIONAL)
    try:
        df = pd.read_csv(path, usecols=lambda c: str(c).strip() in wanted, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise TraceError(f"{path}: empty file (no header and no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, zlib.error) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"{path}: cannot parse as CSV ({type(e).__name__}: {first})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _schema(path: Path, df: pd.DataFrame) -> tuple[str, ...]:
    cols = set(df.columns)
    for schema in (AZURE_COLUMNS, SECONDS_COLUMNS):
        if set(schema) <= cols:
            return schema
    # Name the missing column of the schema the file is closest to.
    best = max((AZURE_COLUMNS, SECONDS_COLUMNS), key=lambda s: len(cols & set(s)))
    missing = [c for c in best if c not in cols]
    try:
        header = ", ".join(pd.read_csv(path, nrows=0).columns.astype(str))
    except Exception:  # pragma: no cover - message only
        header = ", ".join(sorted(cols))
    raise TraceError(
        f"{path}: header (line 1): missing column {missing[0]!r} (header has: {header or 'nothing'}); "
        f"expected {', '.join(AZURE_COLUMNS)} [NumImages] or {', '.join(SECONDS_COLUMNS)}")


def _counts(path: Path, df: pd.DataFrame, col: str) -> np.ndarray:
    """A token/image count column as int64, or a TraceError naming the first bad cell."""
    s = df[col]
    num = pd.to_numeric(s, errors="coerce") if s.dtype.kind not in "iuf" else s
    values = num.to_numpy(dtype=np.float64, na_value=np.nan) if num.dtype.kind != "i" else num.to_numpy()
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            raw = _raw_value(path, col, i)
            what = "is empty" if raw.strip() == "" else f"{raw!r} is not a number"
            raise TraceError(f"{path}: {_row(i)}, column {col!r}: token count {what}")
        frac = values != np.round(values)
        if frac.any():
            i = int(np.argmax(frac))
            raise TraceError(f"{path}: {_row(i)}, column {col!r}: token count {_raw_value(path, col, i)!r} "
                             f"is not a whole number")
    neg = values < 0
    if neg.any():
        i = int(np.argmax(neg))
        raise TraceError(f"{path}: {_row(i)}, column {col!r}: token count {_raw_value(path, col, i)} is negative")
    return values.astype(np.int64)


def _arrivals_ns(path: Path, df: pd.DataFrame, schema: tuple[str, ...]) -> np.ndarray:
    """Arrival times in integer nanoseconds (absolute for Azure, as written for seconds)."""
    col = schema[0]
    s = df[col]
    if schema is AZURE_COLUMNS:
        ts = pd.to_datetime(s.astype("string").str.strip(), format="ISO8601", errors="coerce", utc=True)
        bad = ts.isna().to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raw = _raw_value(path, col, i)
            what = "is empty" if raw.strip() == "" else f"cannot parse timestamp {raw!r}"
            raise TraceError(f"{path}: {_row(i)}, column {col!r}: {what} (expected e.g. {_TIMESTAMP_EXAMPLE})")
        return ts.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]").astype(np.int64)
    num = pd.to_numeric(s, errors="coerce") if s.dtype.kind not in "iuf" else s
    values = num.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raw = _raw_value(path, col, i)
        what = "is empty" if raw.strip() == "" else f"{raw!r} is not a number of seconds"
        raise TraceError(f"{path}: {_row(i)}, column {col!r}: arrival time {what}")
    return np.round(values * 1e9).astype(np.int64)


class _Parsed:
    """A parsed file: the trace re-based to 0 and its first arrival in absolute ns."""

    def __init__(self, trace: Trace, start_ns: int, absolute: bool):
        self.trace, self.start_ns, self.absolute = trace, start_ns, absolute


def _parse(path: Path, name: str, service: Optional[str]) -> _Parsed:
    df = _read_frame(path)
    schema = _schema(path, df)
    if len(df) == 0:
        raise TraceError(f"{path}: no requests (header only)")
    t_ns = _arrivals_ns(path, df, schema)
    prompt = _counts(path, df, schema[1])
    output = _counts(path, df, schema[2])
    img_col = next((c for c in ("NumImages", "num_images") if c in df.columns), None)
    images = _counts(path, df, img_col) if img_col else np.zeros(len(df), np.int64)
    svc = None
    if "service" in df.columns:
        svc = df["service"].fillna("").astype(str).to_numpy()
    elif service is not None:
        svc = np.full(len(df), service)
    generated, label = False, name
    if "generator" in df.columns:
        gens = df["generator"].dropna().astype(str).unique()
        if len(gens):
            generated = True
            label = gens[0] if len(gens) == 1 else f"generated:mixed({name})"
    if np.any(np.diff(t_ns) < 0):
        first = int(np.argmax(np.diff(t_ns) < 0)) + 1
        n_bad = int(np.sum(np.diff(t_ns) < 0))
        warnings.warn(f"{path}: {n_bad} arrival(s) out of order (first at {_row(first)}, column "
                      f"{schema[0]!r}); sorted by time", TraceWarning, stacklevel=4)
        order = np.argsort(t_ns, kind="stable")
        t_ns, prompt, output, images = t_ns[order], prompt[order], output[order], images[order]
        svc = None if svc is None else svc[order]
    absolute = schema is AZURE_COLUMNS
    # Wall-clock timestamps start at 0; seconds are kept as written unless some are negative.
    start = int(t_ns[0]) if absolute or t_ns[0] < 0 else 0
    trace = Trace((t_ns - start) / 1e9, prompt, output, images, svc, name=label, generated=generated)
    return _Parsed(trace, start, absolute)


@functools.lru_cache(maxsize=32)
def _parse_cached(path: str, size: int, mtime_ns: int, name: str, service: Optional[str]) -> _Parsed:
    return _parse(Path(path), name, service)


def _load_file(path: Path, name: str, service: Optional[str] = None) -> _Parsed:
    try:
        st = path.stat()
    except OSError as e:
        raise TraceError(f"{path}: cannot open ({e.strerror})") from None
    if path.is_dir():
        raise TraceError(f"{path}: is a directory, not a CSV file")
    return _parse_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, name, service)


@functools.lru_cache(maxsize=None)
def _merged_azure() -> Trace:
    parts = [_load_file(DATA_DIR / f, n, svc) for n, (f, svc) in SHIPPED_FILES.items()]
    t0 = min(p.start_ns for p in parts)
    arrival = np.concatenate([p.trace.arrival_s + (p.start_ns - t0) / 1e9 for p in parts])
    order = np.argsort(arrival, kind="stable")

    def cat(attr: str) -> np.ndarray:
        return np.concatenate([getattr(p.trace, attr) for p in parts])[order]

    return Trace(arrival[order], cat("prompt_tokens"), cat("output_tokens"), cat("num_images"),
                 cat("service"), name="azure")


def load_trace(name_or_path: str | os.PathLike) -> Trace:
    """Load a shipped trace by name or a CSV trace by path.

    Args:
        name_or_path: ``azure-conv``, ``azure-code``, ``azure`` (both services merged by
            wall-clock time, ``service`` set to "conv"/"code"), or the path of a CSV (gzip
            allowed) in the Azure or the seconds schema (see module docstring).

    Returns:
        An immutable :class:`Trace` with arrivals in seconds from 0.

    Raises:
        TraceError: unknown name, unreadable or empty file, missing column, non-numeric
            or negative token count, unparseable timestamp; the message names the file,
            row and column. Out-of-order timestamps are sorted with a :class:`TraceWarning`.
    """
    key = os.fspath(name_or_path)
    if key == "azure":
        return _merged_azure()
    if key in SHIPPED_FILES:
        file, svc = SHIPPED_FILES[key]
        return _load_file(DATA_DIR / file, key, svc).trace
    path = Path(key)
    if not path.exists():
        raise TraceError(f"{key}: no such trace file, and not a shipped trace name "
                         f"({', '.join(TRACE_NAMES)})")
    name = path.name
    for suffix in (".gz", ".csv"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return _load_file(path, name).trace
