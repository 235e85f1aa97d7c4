"""The :class:`Trace`: a request arrival stream with prompt and output token counts.

A trace is immutable: its arrays are read-only and every operation (``window``, ``split``,
``scale_rate``) returns a new trace. Units: arrival times and durations in seconds,
rates in requests per second, token counts in tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd


class TraceError(ValueError):
    """Bad trace input: unreadable file, missing column, bad value, impossible trace."""


class TraceWarning(UserWarning):
    """A trace was loaded but repaired (for example timestamps sorted into order)."""


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only array nobody else can write to (copied when the input is writable)."""
    a = np.ascontiguousarray(a)
    if a.flags.writeable:
        a = a.copy()
        a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Trace:
    """Requests of one workload, sorted by arrival.

    Attributes:
        arrival_s: float64[N], arrival times in seconds from the start of the trace, sorted.
        prompt_tokens: int64[N], prompt (context) tokens per request.
        output_tokens: int64[N], generated tokens per request.
        num_images: int64[N], images per request (zeros when the source has none).
        service: str[N] naming the service of each request ("conv"/"code" for the
            shipped Azure traces), or None when the source does not say.
        name: what the trace is, e.g. ``azure-conv`` or ``generated:poisson(azure-conv)``.
        generated: True when the requests were drawn by a generator, not recorded.
        duration_s: length of the trace in seconds. Defaults to the last arrival (the
            span of a recorded trace); windows and generated traces carry their own length.
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    num_images: Optional[np.ndarray] = None
    service: Optional[np.ndarray] = None
    name: str = "trace"
    generated: bool = False
    duration_s: Optional[float] = field(default=None)

    def __post_init__(self) -> None:
        arr = np.asarray(self.arrival_s, dtype=np.float64).reshape(-1)
        n = arr.shape[0]

        def ints(x: Any, what: str) -> np.ndarray:
            a = np.asarray(x)
            if a.shape != (n,):
                raise TraceError(f"trace {self.name!r}: {what} has shape {a.shape}, expected ({n},)")
            if a.dtype.kind == "f":
                if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
                    raise TraceError(f"trace {self.name!r}: {what} must be whole numbers")
            elif a.dtype.kind not in "iu":
                raise TraceError(f"trace {self.name!r}: {what} must be integers, got dtype {a.dtype}")
            a = a.astype(np.int64)
            if n and a.min() < 0:
                raise TraceError(f"trace {self.name!r}: {what} has a negative value {a.min()}")
            return a

        if n and not np.all(np.isfinite(arr)):
            raise TraceError(f"trace {self.name!r}: arrival_s holds a non-finite value")
        if n and arr[0] < 0:
            raise TraceError(f"trace {self.name!r}: arrival_s starts below 0 ({arr[0]})")
        if n > 1 and np.any(np.diff(arr) < 0):
            raise TraceError(f"trace {self.name!r}: arrival_s is not sorted")
        prompt = ints(self.prompt_tokens, "prompt_tokens")
        output = ints(self.output_tokens, "output_tokens")
        images = np.zeros(n, np.int64) if self.num_images is None else ints(self.num_images, "num_images")
        service = None
        if self.service is not None:
            service = np.asarray(self.service).astype(str)
            if service.shape != (n,):
                raise TraceError(f"trace {self.name!r}: service has shape {service.shape}, expected ({n},)")
        last = float(arr[-1]) if n else 0.0
        duration = last if self.duration_s is None else float(self.duration_s)
        if not math.isfinite(duration) or duration < last - 1e-9:
            raise TraceError(
                f"trace {self.name!r}: duration_s={duration} is shorter than the last arrival {last}")
        set_ = object.__setattr__
        set_(self, "arrival_s", _frozen(arr))
        set_(self, "prompt_tokens", _frozen(prompt))
        set_(self, "output_tokens", _frozen(output))
        set_(self, "num_images", _frozen(images))
        set_(self, "service", None if service is None else _frozen(service))
        set_(self, "duration_s", max(duration, last))
        set_(self, "generated", bool(self.generated))

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def __repr__(self) -> str:
        gen = ", generated" if self.generated else ""
        return (f"Trace({self.name!r}, {len(self)} requests, {self.duration_s:.1f} s, "
                f"{self.mean_rate_per_s:.3f} req/s{gen})")

    def __reduce__(self):
        # Rebuild through the constructor so unpickled arrays are validated and read-only.
        return (Trace, (self.arrival_s, self.prompt_tokens, self.output_tokens, self.num_images,
                        self.service, self.name, self.generated, self.duration_s))

    @property
    def mean_rate_per_s(self) -> float:
        """Mean arrival rate over the trace's duration (requests per second); nan if 0 s long."""
        return len(self) / self.duration_s if self.duration_s > 0 else float("nan")

    def _take(self, idx: slice | np.ndarray, shift_s: float, duration_s: float, name: str) -> "Trace":
        return Trace(
            arrival_s=self.arrival_s[idx] - shift_s,
            prompt_tokens=self.prompt_tokens[idx],
            output_tokens=self.output_tokens[idx],
            num_images=self.num_images[idx],
            service=None if self.service is None else self.service[idx],
            name=name, generated=self.generated, duration_s=duration_s,
        )

    # -------------------------------------------------------------- slicing
    def window(self, t0: float, t1: Optional[float] = None) -> "Trace":
        """Requests arriving in ``[t0, t1)`` seconds, re-based so ``t0`` becomes 0.

        ``t1=None`` means to the end of the trace, the last arrival included. The window's
        duration is ``min(t1, duration_s) - t0``.
        """
        t0 = float(t0)
        if not math.isfinite(t0) or t0 < 0:
            raise ValueError(f"window start t0={t0} must be a finite number >= 0")
        if t1 is not None and not (float(t1) > t0):
            raise ValueError(f"window end t1={t1} must be greater than t0={t0}")
        if t0 > self.duration_s:
            raise ValueError(f"window start t0={t0} is past the end of {self.name!r} ({self.duration_s} s)")
        lo = int(np.searchsorted(self.arrival_s, t0, side="left"))
        if t1 is None or float(t1) > self.duration_s:
            hi, end = len(self), self.duration_s
        else:
            end = float(t1)
            hi = int(np.searchsorted(self.arrival_s, end, side="left"))
        name = f"{self.name}[{t0:g}:{end:g}]"
        return self._take(slice(lo, hi), t0, end - t0, name)

    def split(self, train_frac: float = 0.7, gap_s: float = 0.0) -> tuple["Trace", "Trace"]:
        """Cut into a train window ``[0, c)`` and a test window ``[c + gap_s, end]``.

        ``c = train_frac * duration_s``. The two windows share no request and no instant.
        """
        if not 0.0 < float(train_frac) < 1.0:
            raise ValueError(f"train_frac={train_frac} must lie strictly between 0 and 1")
        if gap_s < 0:
            raise ValueError(f"gap_s={gap_s} must be >= 0")
        cut = float(train_frac) * self.duration_s
        if cut + gap_s >= self.duration_s:
            raise ValueError(f"gap_s={gap_s} leaves no test window in {self.duration_s} s")
        return self.window(0.0, cut), self.window(cut + gap_s, None)

    def scale_rate(self, k: float) -> "Trace":
        """Compress time by ``k``: arrivals and duration divided by k, so the rate is x k.

        Token columns are kept as they are. ``k < 1`` stretches time (a slower trace).
        """
        k = float(k)
        if not math.isfinite(k) or k <= 0:
            raise ValueError(f"rate scale k={k} must be a finite number > 0")
        return Trace(self.arrival_s / k, self.prompt_tokens, self.output_tokens, self.num_images,
                     self.service, name=f"{self.name} x{k:g}", generated=self.generated,
                     duration_s=self.duration_s / k)

    # ------------------------------------------------------------ statistics
    def _n_windows(self, window_s: float) -> int:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s={window_s} must be a finite number > 0")
        return max(1, math.ceil(self.duration_s / window_s - 1e-12))

    def _window_index(self, window_s: float) -> tuple[np.ndarray, int]:
        n = self._n_windows(window_s)
        idx = np.minimum((self.arrival_s // window_s).astype(np.int64), n - 1)
        return idx, n

    def counts_per_window(self, window_s: float) -> np.ndarray:
        """Requests arriving in each window ``[i*w, (i+1)*w)`` over the duration (int64).

        The last window may be shorter than ``window_s``; an arrival at exactly the end of
        the trace counts in the last window.
        """
        idx, n = self._window_index(window_s)
        return np.bincount(idx, minlength=n).astype(np.int64)

    def rate_per_window(self, window_s: float) -> np.ndarray:
        """Arrival rate per window in requests per second: ``counts_per_window / window_s``."""
        return self.counts_per_window(window_s) / float(window_s)

    def window_stats(self, window_s: float) -> pd.DataFrame:
        """One row per window: start/end (s), requests, rate (req/s) and token sums/means."""
        idx, n = self._window_index(window_s)
        cnt = np.bincount(idx, minlength=n)
        p = np.bincount(idx, weights=self.prompt_tokens, minlength=n)
        o = np.bincount(idx, weights=self.output_tokens, minlength=n)
        t0 = np.arange(n) * float(window_s)
        with np.errstate(invalid="ignore", divide="ignore"):
            return pd.DataFrame({
                "t0_s": t0,
                "t1_s": np.minimum(t0 + window_s, self.duration_s),
                "requests": cnt.astype(np.int64),
                "rate_per_s": cnt / float(window_s),
                "prompt_tokens_sum": p.astype(np.int64),
                "output_tokens_sum": o.astype(np.int64),
                "prompt_tokens_mean": p / cnt,
                "output_tokens_mean": o / cnt,
            })

    def stats(self) -> dict[str, Any]:
        """Summary numbers (plain Python types, JSON-ready).

        Keys: name, generated, requests, duration_s, mean_rate_per_s, peak_per_s (most
        requests in one second, i.e. the busiest second's req/s), peak_per_min (most requests
        in one minute), peak_rate_per_min_s (that minute's req/s), min_per_min_nonempty,
        empty_minutes, prompt_/output_ mean, p50, p99 (tokens; linear-interpolated
        percentiles), images_total, and services (requests per service, or None).
        Seconds and minutes are counted from the start of the trace.
        """
        n = len(self)
        per_s = self.counts_per_window(1.0) if n else np.zeros(1, np.int64)
        per_min = self.counts_per_window(60.0) if n else np.zeros(1, np.int64)
        nonempty = per_min[per_min > 0]

        def tok(a: np.ndarray) -> dict[str, float]:
            if n == 0:
                return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
            return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
                    "p99": float(np.percentile(a, 99))}

        pt, ot = tok(self.prompt_tokens), tok(self.output_tokens)
        services = None
        if self.service is not None:
            names, counts = np.unique(self.service, return_counts=True)
            services = {str(k): int(v) for k, v in zip(names, counts)}
        return {
            "name": self.name,
            "generated": self.generated,
            "requests": n,
            "duration_s": float(self.duration_s),
            "mean_rate_per_s": float(self.mean_rate_per_s),
            "peak_per_s": int(per_s.max()),
            "peak_per_min": int(per_min.max()),
            "peak_rate_per_min_s": float(per_min.max() / 60.0),
            "min_per_min_nonempty": int(nonempty.min()) if nonempty.size else 0,
            "empty_minutes": int((per_min == 0).sum()),
            "prompt_mean": pt["mean"], "prompt_p50": pt["p50"], "prompt_p99": pt["p99"],
            "output_mean": ot["mean"], "output_p50": ot["p50"], "output_p99": ot["p99"],
            "images_total": int(self.num_images.sum()),
            "services": services,
        }

    # ------------------------------------------------------------------- I/O
    def to_frame(self) -> pd.DataFrame:
        """The requests as a DataFrame in the (arrived_at, num_prefill_tokens,
        num_decode_tokens) schema, plus num_images, service and generator where they apply."""
        df = pd.DataFrame({
            "arrived_at": self.arrival_s,
            "num_prefill_tokens": self.prompt_tokens,
            "num_decode_tokens": self.output_tokens,
        })
        if self.num_images.any():
            df["num_images"] = self.num_images
        if self.service is not None:
            df["service"] = self.service
        if self.generated:
            df["generator"] = self.name
        return df

    def to_csv(self, path: str | Path) -> Path:
        """Write :meth:`to_frame` to ``path`` (gzip when it ends in .gz); returns the path.

        A generated trace carries its name in a ``generator`` column on every row, so it
        stays labelled as generated when loaded back. Arrival times keep microseconds.
        """
        path = Path(path)
        self.to_frame().to_csv(path, index=False, float_format="%.6f")
        return path
