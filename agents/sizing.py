"""Load estimation and whole-model sizing shared by the static and model-level controllers.

Units: request rates in requests per second, lengths in tokens, times in seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agents.context import ControllerContext
from runtime.control import ClusterState


@dataclass
class LoadEstimate:
    """Request rate (req/s) and mean request shape (tokens) a controller plans for."""

    rate: float
    prompt_tokens: float
    output_tokens: float


class LoadEstimator:
    """Tracks request rate and request shape from successive ClusterStates.

    The rate planned for is the larger of an exponentially weighted mean (weight ``alpha``
    on the newest interval) and the mean of the last ``burst_window`` intervals, so that a
    burst is seen at once while a single quiet interval does not shed capacity.
    """

    def __init__(self, ctx: ControllerContext, alpha: float = 0.3, burst_window: int = 2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.ctx, self.alpha, self.burst_window = ctx, alpha, max(1, burst_window)
        self.reset()

    def reset(self) -> None:
        self.ewma: float | None = None
        self.prompt = self.ctx.default_prompt_tokens
        self.output = self.ctx.default_output_tokens

    def update(self, state: ClusterState) -> LoadEstimate:
        hist = np.asarray(state.request_rate_history, dtype=np.float64)
        latest = float(hist[-1]) if hist.size else 0.0
        self.ewma = latest if self.ewma is None else self.alpha * latest + (1 - self.alpha) * self.ewma
        recent = float(hist[-self.burst_window:].mean()) if hist.size else 0.0
        if state.prompt_tokens_mean > 0:
            self.prompt = 0.8 * self.prompt + 0.2 * state.prompt_tokens_mean
        if state.output_tokens_mean > 0:
            self.output = 0.8 * self.output + 0.2 * state.output_tokens_mean
        return LoadEstimate(max(self.ewma, recent), self.prompt, self.output)


@dataclass(frozen=True)
class InstanceCapacity:
    """What one whole-model instance sustains at the SLO.

    Attributes:
        max_batch: batch limit chosen (sequences per iteration).
        rate: requests per second one instance sustains.
        decode_step_s: decode step time at that batch (seconds).
        prefill_s: prefill time of one mean prompt (seconds).
    """

    max_batch: int
    rate: float
    decode_step_s: float
    prefill_s: float


def instance_capacity(ctx: ControllerContext, prompt_tokens: float, output_tokens: float,
                      tbt_headroom: float = 0.8) -> InstanceCapacity:
    """Best batch level and sustained request rate of one whole-model instance.

    A batch level qualifies when its decode step (at mean context ``prompt + output / 2``)
    stays within ``tbt_headroom`` x the TBT SLO and its sequences' KV fits the instance.
    An instance spends ``prefill_s`` per request on its prompt and ``output x step / batch``
    on its decode share, so it sustains ``1 / (prefill_s + output x step / batch)`` req/s.
    """
    p = max(1, int(round(prompt_tokens)))
    o = max(1.0, float(output_tokens))
    context = int(p + o / 2)
    kv_cap = ctx.kv_capacity_tokens()
    prefill_s = ctx.model_step_s(1, p, phase="prefill", tokens=p)
    best: InstanceCapacity | None = None
    for b in sorted(ctx.codec.batch_levels):
        step = ctx.model_step_s(b, context)
        fits_kv = b * (p + o) <= kv_cap
        if best is not None and (step > tbt_headroom * ctx.slo.tbt_s or not fits_kv):
            continue
        rate = 1.0 / (prefill_s + o * step / b)
        if best is None or (rate > best.rate and step <= tbt_headroom * ctx.slo.tbt_s and fits_kv):
            best = InstanceCapacity(b, rate, step, prefill_s)
    assert best is not None
    return best


def replicas_for_rate(rate: float, capacity: InstanceCapacity, target_utilisation: float,
                      floor: int = 1, cap: int | None = None) -> int:
    """Whole-model instances so that ``rate`` loads each to ``target_utilisation`` or less."""
    if not 0.0 < target_utilisation <= 1.0:
        raise ValueError(f"target_utilisation must be in (0, 1], got {target_utilisation}")
    n = max(floor, math.ceil(rate / (capacity.rate * target_utilisation) - 1e-9))
    return n if cap is None else min(n, cap)
