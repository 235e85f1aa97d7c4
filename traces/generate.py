"""Seeded workload generators fitted to a real trace, for longer or harsher workloads.

Every generator takes a *source* trace and a duration, fits its arrival process to the
source's mean rate (requests per second; override with ``rate_per_s``) and draws token
counts by resampling whole requests (prompt, output, images, service) from the source,
so the empirical joint token distribution is kept. The result is a :class:`Trace` with
``generated=True`` and a name ``generated:KIND(SOURCE, seed=N)``.

Kinds:

- ``poisson``: homogeneous Poisson arrivals at the source's rate.
- ``gamma``: bursty renewal process, gamma inter-arrival times with the source's mean and
  coefficient of variation (``cv``, fitted from the source's inter-arrival gaps).
- ``mmpp``: bursty two-state Markov-modulated Poisson process; high/low rates and mean
  dwell times fitted from the source's per-window counts, rescaled to the source's mean.
- ``diurnal``: non-homogeneous Poisson with a day shape (cosine with ``amplitude`` peaking
  at ``peak_hour``, or a user ``shape``) whose mean over a period equals the source's rate.
- ``surge``: the source's rate with a step to ``factor`` x rate for ``length_s`` seconds
  starting at ``at_s``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from traces.trace import Trace

#: Seconds in a day: the default period of the diurnal shape.
DAY_S = 86_400.0


def _check(source: Trace, duration_s: float, rate_per_s: Optional[float]) -> float:
    if len(source) == 0:
        raise ValueError(f"source trace {source.name!r} has no requests to fit")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s={duration_s} must be a finite number > 0")
    rate = source.mean_rate_per_s if rate_per_s is None else float(rate_per_s)
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate {rate} req/s must be a finite number > 0 (source {source.name!r})")
    return rate


def _build(kind: str, source: Trace, arrival_s: np.ndarray, duration_s: float,
           rng: np.random.Generator, seed: int) -> Trace:
    """Attach resampled requests of ``source`` to sorted arrival times."""
    arrival_s = np.sort(arrival_s[arrival_s < duration_s])
    idx = rng.integers(0, len(source), size=arrival_s.shape[0])
    return Trace(
        arrival_s=arrival_s,
        prompt_tokens=source.prompt_tokens[idx],
        output_tokens=source.output_tokens[idx],
        num_images=source.num_images[idx],
        service=None if source.service is None else source.service[idx],
        name=f"generated:{kind}({source.name}, seed={seed})",
        generated=True,
        duration_s=duration_s,
    )


def _segments(rng: np.random.Generator, starts: np.ndarray, ends: np.ndarray,
              rates: np.ndarray) -> np.ndarray:
    """Poisson arrivals on consecutive segments ``[starts[i], ends[i])`` at ``rates[i]``/s."""
    counts = rng.poisson(rates * (ends - starts))
    seg = np.repeat(np.arange(len(starts)), counts)
    return starts[seg] + rng.random(seg.shape[0]) * (ends - starts)[seg]


def interarrival_cv(trace: Trace) -> float:
    """Coefficient of variation (std / mean) of the gaps between arrivals (1 for Poisson)."""
    gaps = np.diff(trace.arrival_s)
    if gaps.size < 2 or gaps.mean() <= 0:
        raise ValueError(f"trace {trace.name!r} has too few distinct arrivals to fit a cv")
    return float(gaps.std() / gaps.mean())


def poisson(source: Trace, duration_s: float, seed: int = 0,
            rate_per_s: Optional[float] = None) -> Trace:
    """Homogeneous Poisson arrivals at the source's mean rate for ``duration_s`` seconds."""
    rate = _check(source, duration_s, rate_per_s)
    rng = np.random.default_rng(seed)
    t = _segments(rng, np.array([0.0]), np.array([float(duration_s)]), np.array([rate]))
    return _build("poisson", source, t, duration_s, rng, seed)


def gamma(source: Trace, duration_s: float, seed: int = 0, rate_per_s: Optional[float] = None,
          cv: Optional[float] = None) -> Trace:
    """Stationary gamma renewal process: gaps with mean ``1/rate`` and the given ``cv``.

    ``cv`` defaults to the source's inter-arrival cv (conv ~1.09, code ~13.2); cv > 1 is
    burstier than Poisson. The first arrival uses the forward-recurrence law, so the rate
    is stationary from t = 0.
    """
    rate = _check(source, duration_s, rate_per_s)
    cv = interarrival_cv(source) if cv is None else float(cv)
    if not (math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv={cv} must be a finite number > 0")
    shape = 1.0 / cv**2
    scale = 1.0 / (rate * shape)
    rng = np.random.default_rng(seed)
    first = rng.random() * rng.gamma(shape + 1.0, scale)
    chunks, t_end = [np.array([first])], first
    expect = rate * duration_s
    while t_end < duration_s:
        n = int(expect + 6 * cv * math.sqrt(expect) + 64)
        gaps = rng.gamma(shape, scale, size=n)
        c = t_end + np.cumsum(gaps)
        chunks.append(c)
        t_end = float(c[-1])
    return _build("gamma", source, np.concatenate(chunks), duration_s, rng, seed)


@dataclass(frozen=True)
class MMPPFit:
    """Two-state Markov-modulated Poisson parameters.

    Attributes:
        high_rate_per_s, low_rate_per_s: arrival rate in each state (req/s).
        high_dwell_s, low_dwell_s: mean time spent in each state (seconds, exponential).
    """

    high_rate_per_s: float
    low_rate_per_s: float
    high_dwell_s: float
    low_dwell_s: float

    @property
    def mean_rate_per_s(self) -> float:
        """Stationary mean rate (req/s)."""
        p = self.high_dwell_s / (self.high_dwell_s + self.low_dwell_s)
        return p * self.high_rate_per_s + (1 - p) * self.low_rate_per_s


def fit_mmpp(source: Trace, window_s: float = 60.0, rate_per_s: Optional[float] = None) -> MMPPFit:
    """Fit a two-state MMPP to ``source``'s counts per ``window_s``-second window.

    Windows above the mean count are "high", the rest "low"; each state's rate is the mean
    rate of its windows and its dwell time the mean run length of its windows x window_s.
    Both rates are then scaled so the stationary mean equals ``rate_per_s`` (default: the
    source's mean rate).
    """
    rate = _check(source, source.duration_s or 1.0, rate_per_s)
    r = source.rate_per_window(window_s)
    high = r > r.mean()
    if high.all() or not high.any():
        return MMPPFit(rate, rate, window_s, window_s)
    edges = np.flatnonzero(np.diff(high.astype(np.int8))) + 1
    runs = np.split(high, edges)
    dwell_h = np.mean([len(x) for x in runs if x[0]]) * window_s
    dwell_l = np.mean([len(x) for x in runs if not x[0]]) * window_s
    fit = MMPPFit(float(r[high].mean()), float(r[~high].mean()), float(dwell_h), float(dwell_l))
    k = rate / fit.mean_rate_per_s
    return MMPPFit(fit.high_rate_per_s * k, fit.low_rate_per_s * k, fit.high_dwell_s, fit.low_dwell_s)


def mmpp(source: Trace, duration_s: float, seed: int = 0, rate_per_s: Optional[float] = None,
         window_s: float = 60.0, fit: Optional[MMPPFit] = None) -> Trace:
    """Two-state Markov-modulated Poisson arrivals (see :func:`fit_mmpp`), stationary start."""
    _check(source, duration_s, rate_per_s)
    fit = fit_mmpp(source, window_s, rate_per_s) if fit is None else fit
    rng = np.random.default_rng(seed)
    dwell = np.array([fit.low_dwell_s, fit.high_dwell_s])
    rates = np.array([fit.low_rate_per_s, fit.high_rate_per_s])
    state = int(rng.random() < dwell[1] / dwell.sum())
    # Alternating states; draw enough sojourns to pass duration_s, in chunks.
    starts_l, states_l, t = [], [], 0.0
    while t < duration_s:
        n = int(2 * duration_s / dwell.mean()) + 16
        st = (state + np.arange(n)) % 2
        lengths = rng.exponential(dwell[st])
        s0 = t + np.concatenate([[0.0], np.cumsum(lengths[:-1])])
        starts_l.append(s0)
        states_l.append(st)
        t = float(s0[-1] + lengths[-1])
        state = int(1 - st[-1])
    starts = np.concatenate(starts_l)
    states = np.concatenate(states_l)
    ends = np.minimum(np.append(starts[1:], t), duration_s)
    keep = starts < duration_s
    arr = _segments(rng, starts[keep], ends[keep], rates[states[keep]])
    return _build("mmpp", source, arr, duration_s, rng, seed)


def day_shape(period_s: float = DAY_S, amplitude: float = 0.5, peak_hour: float = 14.0,
              shape: Optional[Sequence[float]] = None) -> Callable[[np.ndarray], np.ndarray]:
    """Rate multiplier m(t) with mean 1 over one period (t in seconds, period = 24 "hours").

    Default: ``1 + amplitude * cos(2 pi (hour - peak_hour) / 24)``. With ``shape`` (K >= 2
    non-negative values evenly spaced over the period, e.g. 24 hourly values), m(t) is the
    periodic linear interpolation of ``shape`` divided by its mean.
    """
    if not (math.isfinite(period_s) and period_s > 0):
        raise ValueError(f"period_s={period_s} must be a finite number > 0")
    if shape is not None:
        knots = np.asarray(shape, dtype=np.float64)
        if knots.ndim != 1 or knots.size < 2 or np.any(knots < 0) or not np.all(np.isfinite(knots)) \
                or knots.sum() <= 0:
            raise ValueError(f"shape must hold >= 2 finite non-negative values, not all 0; got {shape}")
        knots = knots / knots.mean()
        xs = np.arange(knots.size + 1) / knots.size
        ys = np.append(knots, knots[0])
        return lambda t: np.interp((np.asarray(t) / period_s) % 1.0, xs, ys)
    if not 0 <= amplitude <= 1:
        raise ValueError(f"amplitude={amplitude} must lie in [0, 1] (rate never negative)")
    return lambda t: 1.0 + amplitude * np.cos(2 * np.pi * ((np.asarray(t) / period_s) * 24.0 - peak_hour) / 24.0)


def diurnal(source: Trace, duration_s: float, seed: int = 0, rate_per_s: Optional[float] = None,
            amplitude: float = 0.5, peak_hour: float = 14.0, period_s: float = DAY_S,
            start_hour: float = 0.0, shape: Optional[Sequence[float]] = None) -> Trace:
    """Non-homogeneous Poisson with rate ``rate * m(t)`` (see :func:`day_shape`), by thinning.

    ``start_hour`` is the hour of the day at t = 0. Over whole periods the mean rate is the
    source's mean rate; with the default shape the peak/trough ratio is (1+a)/(1-a).
    """
    rate = _check(source, duration_s, rate_per_s)
    m = day_shape(period_s, amplitude, peak_hour, shape)
    offset = float(start_hour) / 24.0 * period_s
    grid = np.linspace(0.0, period_s, 4097)
    m_max = float(m(grid).max()) * 1.001 + 1e-12
    rng = np.random.default_rng(seed)
    cand = _segments(rng, np.array([0.0]), np.array([float(duration_s)]), np.array([rate * m_max]))
    keep = rng.random(cand.shape[0]) * m_max < m(cand + offset)
    return _build("diurnal", source, cand[keep], duration_s, rng, seed)


def surge(source: Trace, duration_s: float, seed: int = 0, rate_per_s: Optional[float] = None,
          factor: float = 3.0, at_s: Optional[float] = None, length_s: Optional[float] = None) -> Trace:
    """Poisson at the source's rate with a step to ``factor`` x rate on ``[at_s, at_s + length_s)``.

    Defaults: the surge starts at 40 % of the duration and lasts 20 % of it.
    """
    rate = _check(source, duration_s, rate_per_s)
    at = 0.4 * duration_s if at_s is None else float(at_s)
    length = 0.2 * duration_s if length_s is None else float(length_s)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor={factor} must be a finite number > 0")
    if not (0 <= at < duration_s) or not (length > 0):
        raise ValueError(f"surge at_s={at}, length_s={length} must start inside [0, {duration_s}) "
                         f"and last > 0 s")
    end = min(at + length, float(duration_s))
    starts = np.array([0.0, at, end])
    ends = np.array([at, end, float(duration_s)])
    rng = np.random.default_rng(seed)
    t = _segments(rng, starts, ends, rate * np.array([1.0, factor, 1.0]))
    return _build("surge", source, t, duration_s, rng, seed)


#: Generator functions by kind, as used by :func:`generate` and the CLI.
GENERATORS: dict[str, Callable[..., Trace]] = {
    "poisson": poisson,
    "gamma": gamma,
    "mmpp": mmpp,
    "diurnal": diurnal,
    "surge": surge,
}


def generate(kind: str, source: Trace, duration_s: float, seed: int = 0, **params) -> Trace:
    """Run the generator ``kind`` (a key of :data:`GENERATORS`) with keyword ``params``."""
    try:
        fn = GENERATORS[kind]
    except KeyError:
        raise ValueError(f"unknown generator {kind!r}; choose one of {', '.join(GENERATORS)}") from None
    return fn(source, duration_s, seed=seed, **params)
