"""A faster twin of ``runtime.codec.ObservationEncoder.encode`` for the training env.

Same layout and values (tests/test_env.py checks equality against the codec on simulated
states); it avoids per-feature numpy calls, which made the codec's encoder the slowest
part of an env step. The codec stays the one definition: if its layout changes, the
equality test fails and this twin must follow (or the env must go back to the codec).
"""
from __future__ import annotations

import math

import numpy as np

from runtime.codec import CodecConfig, ObservationEncoder
from runtime.control import PLACEMENTS, ClusterState
from runtime.models import OPERATOR_GROUPS

from envs.memo import RecurringTable, put
from envs.world import shared_plan

_LOG9 = math.log(9.0)
_INT64 = np.dtype(np.int64)


def _in_box(x: float, high: float) -> float:
    """What ``np.clip(np.nan_to_num(float32 array, nan=0.0), 0.0, high)`` makes of the entry
    ``np.float32(x)``, for an ``x`` outside [0, ``high``) (inside, it is ``x`` itself, as float32
    rounding is monotone, 0 and ``high`` are float32 values and np.clip keeps a zero's sign):
    ``high`` from ``high`` up (inf included), 0.0 for NaN, 0.0 for a negative unless float32
    rounds it to -0.0 (then -0.0, as np.clip keeps it)."""
    if x >= high:
        return high
    if x != x:
        return 0.0
    if x == 0.0:
        return x
    if x < -1.0:  # (negative in float32 too: 0.0; and no float32 overflow below)
        return 0.0
    return -0.0 if float(np.float32(x)) == 0.0 else 0.0


class FastObservationEncoder:
    """``encode(state)`` equal to ``ObservationEncoder(config).encode(state)``."""

    def __init__(self, config: CodecConfig) -> None:
        self.config = config
        self.size = ObservationEncoder(config).size
        self.levels = tuple(config.batch_levels)
        self._level_cache: dict[int, float] = {}

    def _level(self, mb: int) -> float:
        hit = self._level_cache.get(mb)
        if hit is None:
            lv = np.asarray(self.levels)
            hit = float(int(np.argmin(np.abs(lv - mb))) / max(len(lv) - 1, 1))
            self._level_cache[mb] = hit
        return hit

    def encode(self, state: ClusterState, high: float | None = None) -> np.ndarray:
        """The codec's vector for ``state``; with ``high``, also what the env makes of it
        (``np.clip(np.nan_to_num(obs, nan=0.0), 0.0, high)``, value for value: see
        :func:`_in_box`), without the three numpy calls over the array. A zero of either sign
        is kept as it is, as np.clip keeps it."""
        c = self.config
        vals: list[float] = []
        slo_tbt = max(state.slo.tbt_s, 1e-9)
        slo_ttft = max(state.slo.ttft_s, 1e-9)
        mr = c.max_replicas
        levels = self._level_cache
        log1p = math.log1p
        for g in OPERATOR_GROUPS:
            op = state.operators[g]
            pl = op.placement
            level = levels.get(op.max_batch)
            rate, queue, util, tp = op.arrival_rate / 1000.0, op.queue_len / 100.0, op.utilisation, op.tp
            # (the codec's squash log1p(max(x, 0)) and clip to [0, 1] written out: this runs each env step)
            vals += (op.replicas / mr, op.pending_replicas / mr,
                     self._level(op.max_batch) if level is None else level,
                     1.0 if pl == PLACEMENTS[0] else 0.0, 1.0 if pl == PLACEMENTS[1] else 0.0,
                     1.0 if pl == PLACEMENTS[2] else 0.0,
                     log1p(rate) if rate > 0 else 0.0, log1p(queue) if queue > 0 else 0.0,
                     0.0 if util < 0.0 else (1.0 if util > 1.0 else util),
                     min(op.latency_p50_s / slo_tbt, 10.0), min(op.latency_p99_s / slo_tbt, 10.0),
                     (log1p(tp) if tp > 0 else 0.0) / _LOG9)
        # (squash and clip written out, as above)
        att, kvf = state.slo_attainment, state.kv_used_frac
        nq, nr, pm = state.queued_requests, state.running_requests, state.prompt_tokens_mean
        vals += (min(state.ttft_p50_s / slo_ttft, 10.0), min(state.ttft_p99_s / slo_ttft, 10.0),
                 min(state.tbt_p50_s / slo_tbt, 10.0), min(state.tbt_p99_s / slo_tbt, 10.0),
                 0.0 if att < 0.0 else (1.0 if att > 1.0 else att), state.gpus_in_use / c.max_gpus,
                 state.power_w / (c.max_gpus * c.gpu_peak_w), 0.0 if kvf < 0.0 else (1.0 if kvf > 1.0 else kvf),
                 (log1p(nq) if nq > 0 else 0.0) / 5.0, (log1p(nr) if nr > 0 else 0.0) / 5.0,
                 (log1p(pm) if pm > 0 else 0.0) / 10.0)
        hist = state.request_rate_history  # (an array in the simulators: read as Python floats, same values)
        hist = (hist.tolist() if isinstance(hist, np.ndarray) else list(hist))[-c.history_len:]
        pad = self.size - len(vals) - len(hist)
        if pad > 0:
            vals += [0.0] * pad
        rs = c.rate_scale
        vals += [math.log1p((h if h > 0 else 0.0) / rs) for h in hist]
        if high is not None:
            vals = [v if 0.0 <= v < high else _in_box(v, high) for v in vals]
        return np.asarray(vals, dtype=np.float32)


class FastActionDecoder:
    """``decode(action, prev)`` equal to ``runtime.codec.ActionDecoder(config).decode``, memoised.

    The env decodes against the current target plan, which stays the same object while the
    policy keeps it, so (plan, action) pairs repeat and are answered from a cache.
    """

    def __init__(self, config: CodecConfig) -> None:
        from runtime.codec import ActionDecoder

        self.config = config
        self.slow = ActionDecoder(config)
        self.nvec = tuple(int(x) for x in self.slow.nvec)
        self._cache: dict[tuple, tuple[object, object]] = {}
        self._hi = tuple(n - 1 for n in self.nvec)
        self._deltas = tuple(int(d) for d in config.replica_deltas)
        self._rlevels = tuple(int(r) for r in config.replica_levels)
        self._levels = tuple(int(b) for b in config.batch_levels)
        self._plans = RecurringTable()  # one Plan per content (see _decode)

    def decode(self, action, prev):  # noqa: ANN001 - same signature as the codec
        if type(action) is np.ndarray and action.dtype is _INT64 and action.ndim == 1:
            a = action.tolist()  # (what a VecEnv passes: one numpy call, not five)
        else:
            a = np.asarray(action).reshape(-1).astype(np.int64).tolist()
        if len(a) != len(self.nvec):
            return self.slow.decode(action, prev)  # raises the codec's error
        key = (id(prev), *a)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is prev:
            return hit[1]
        plan = self._decode(a, prev)
        put(self._cache, key, (prev, plan), 256)
        return plan

    def _decode(self, a: list[int], prev):  # noqa: ANN001, ANN202
        """The codec's decode on a list of ints (same clipping, same OperatorPlan fields)."""
        c = self.config
        lo, hi_r = c.min_replicas, c.max_replicas
        hi = self._hi
        fields = []
        for k, g in enumerate(OPERATOR_GROUPS):
            i = 3 * k
            # (each index clipped to its range, as the codec clips; compared first: in range, as
            # a sampled action always is, no builtin call)
            d_idx, b_idx, p_idx = a[i], a[i + 1], a[i + 2]
            if not 0 <= d_idx <= hi[i]:
                d_idx = min(max(d_idx, 0), hi[i])
            if not 0 <= b_idx <= hi[i + 1]:
                b_idx = min(max(b_idx, 0), hi[i + 1])
            if not 0 <= p_idx <= hi[i + 2]:
                p_idx = min(max(p_idx, 0), hi[i + 2])
            old = prev.ops[g]
            r = self._rlevels[d_idx] if self._rlevels else old.replicas + self._deltas[d_idx]
            replicas = r if lo <= r <= hi_r else min(max(r, lo), hi_r)
            fields.append((replicas, self._levels[b_idx], PLACEMENTS[p_idx], old.tp))
        # equal plans as one object (plans are immutable): the env's caches keyed by the decoded
        # plan's identity (tp follow-up, placement) then hit when a policy revisits a plan
        return shared_plan(self._plans, tuple(fields))
