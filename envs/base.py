"""What both fidelities share: the plan timeline, cost accounting and the ClusterState they emit.

A simulator is built for one scenario and one trace. ``reset(plan)`` puts the plan in place
(loaded at time 0) and returns the state at t=0; ``step(plan)`` applies the plan (repaired
to fit memory and ``max_gpus``; a plan that cannot be repaired is refused and the previous
one kept, with the reason in ``last_repairs``) and advances one control interval.
Subclasses implement ``_run(t0, t1)``, which advances the queues and returns an
:class:`IntervalMetrics`.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field, fields

import numpy as np

from runtime.control import SLO, ClusterState, OperatorState, Plan, PlanError
from runtime.models import OPERATOR_GROUPS

from envs.cluster import ClusterTimeline
from envs.memo import RecurringTable, freeze_gc_once, put
from envs.predictor import ExecutionPredictor
from envs.scenario import Scenario
from envs.world import MODEL, Layout, Placer, StepModel, StepShape

#: the field orders :meth:`Simulator._state` builds OperatorState and ClusterState in, positionally
#: (keywords cost twice as much, six objects a step); checked here, so a reordered field fails
#: at import instead of filling the wrong field
_STATE_FIELDS = {
    OperatorState: ("replicas", "max_batch", "placement", "tp", "pending_replicas", "arrival_rate", "queue_len",
                    "utilisation", "latency_p50_s", "latency_p99_s", "memory_bytes"),
    ClusterState: ("time_s", "interval_s", "operators", "slo", "plan", "ttft_p50_s", "ttft_p99_s", "tbt_p50_s",
                   "tbt_p99_s", "slo_attainment", "gpus_in_use", "power_w", "energy_j", "request_rate_history",
                   "prompt_tokens_mean", "output_tokens_mean", "queued_requests", "running_requests",
                   "rejected_requests", "kv_used_frac"),
}
for _cls, _names in _STATE_FIELDS.items():
    if tuple(f.name for f in fields(_cls)) != _names:
        raise ImportError(f"envs.base: {_cls.__name__}'s fields are {[f.name for f in fields(_cls)]}, "
                          f"but Simulator._state builds it positionally as {list(_names)}: update both")


@dataclass(slots=True)
class IntervalMetrics:
    """What happened in one control interval (seconds, tokens, counts)."""

    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    tbt_p50_s: float = 0.0
    tbt_p99_s: float = 0.0
    finished: float = 0.0
    met: float = 0.0
    rejected: float = 0.0
    arrivals: float = 0.0
    prompt_mean: float = 0.0
    output_mean: float = 0.0
    queued: float = 0.0
    running: float = 0.0
    kv_used_frac: float = 0.0
    queue_tokens: float = 0.0
    util: dict[str, float] = field(default_factory=dict)
    group_ms: dict[str, float] = field(default_factory=dict)
    group_ms_p99: dict[str, float] = field(default_factory=dict)


def _sorted_by_interval(vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``vals`` ordered by interval ``idx``, then value, as float64: ``vals[np.lexsort((vals,
    idx))]``. Token counts (non-negative integers) are sorted as one packed integer key
    (interval << bits | value), ten times faster than the two-key lexsort (an env reset builds
    this index for its episode's window); any other input takes the lexsort."""
    v = np.asarray(vals)
    if len(v) and v.dtype.kind in "iu" and int(v.min()) >= 0 and int(idx.min()) >= 0:
        bits = max(int(v.max()).bit_length(), 1)
        if (int(idx.max()) + 1) << bits < 1 << 62:
            key = (idx.astype(np.int64) << bits) | v.astype(np.int64)
            key.sort()
            return (key & ((1 << bits) - 1)).astype(np.float64)
    return np.asarray(v, dtype=np.float64)[np.lexsort((v, idx))]


class TraceIndex:
    """Per-interval aggregates of a trace, computed once (counts, token sums and quantiles)."""

    def __init__(self, arrival_s: np.ndarray, prompt: np.ndarray, output: np.ndarray, interval_s: float,
                 n_intervals: int, quantiles: bool = True) -> None:
        self.interval_s = interval_s
        idx = np.minimum((arrival_s // interval_s).astype(np.int64), max(n_intervals - 1, 0))
        self.count = np.bincount(idx, minlength=n_intervals).astype(np.float64)
        self.prompt_sum = np.bincount(idx, weights=prompt, minlength=n_intervals)
        self.output_sum = np.bincount(idx, weights=output, minlength=n_intervals)
        self.start = np.searchsorted(idx, np.arange(n_intervals), side="left")
        self.end = np.searchsorted(idx, np.arange(n_intervals), side="right")
        p99 = np.zeros(n_intervals)
        p50 = np.zeros(n_intervals)
        o99 = np.zeros(n_intervals)
        if quantiles and len(idx):
            # per-interval percentiles (numpy's linear interpolation), vectorised over intervals
            cnt = self.count.astype(np.int64)
            has = cnt > 0
            starts = self.start
            by_prompt = _sorted_by_interval(prompt, idx)  # (sorted once for both quantiles)
            for srt, q, out in ((by_prompt, 50, p50), (by_prompt, 99, p99),
                                (_sorted_by_interval(output, idx), 99, o99)):
                pos = (cnt - 1) * (q / 100.0)
                lo = np.floor(pos).astype(np.int64)
                hi = np.minimum(lo + 1, np.maximum(cnt - 1, 0))
                frac = pos - lo
                base = starts
                v_lo = srt[np.minimum(base + lo, len(srt) - 1)]
                v_hi = srt[np.minimum(base + hi, len(srt) - 1)]
                out[has] = (v_lo + (v_hi - v_lo) * frac)[has]
        self.prompt_p50, self.prompt_p99, self.output_p99 = p50, p99, o99


class Simulator(ABC):
    """Base of both fidelities (see module docstring).

    Args:
        scenario: the scenario (interval, SLO scales, physical constants).
        trace: a traces.Trace (already windowed / rate-scaled as wanted).
        pred: the execution-time predictor.
        slo: the SLO in force.
        seed: seed for anything random (the reference breaks ties with it).
    """

    fidelity = "base"

    def __init__(self, scenario: Scenario, trace, pred: ExecutionPredictor, slo: SLO, seed: int = 0,
                 cache: dict | None = None) -> None:
        self.sc = scenario
        self.trace = trace
        self.pred = pred
        self.slo = slo
        self.seed = seed
        # placements and step models are pure functions of the plan: share them across
        # simulators of one scenario (the env builds one simulator per episode)
        self.cache = cache if cache is not None else {}
        placer = self.cache.get("placer")  # (not setdefault: its argument, a Placer, would be built each time)
        self.placer = placer if placer is not None else self.cache.setdefault("placer", Placer(scenario, pred))
        self.dt = float(scenario.interval_s)
        self.arrival = np.asarray(trace.arrival_s, dtype=np.float64)
        prompt = np.maximum(np.asarray(trace.prompt_tokens, dtype=np.int64), 1)
        output = np.maximum(np.asarray(trace.output_tokens, dtype=np.int64), 1)
        limit = int(scenario.max_request_tokens or pred.cfg.max_seq_len)
        self.output = np.minimum(output, max(limit // 2, 1))
        self.prompt = np.minimum(prompt, np.maximum(limit - self.output, 1))
        #: requests whose prompt or output was clipped to the context limit
        self.clipped = int(np.count_nonzero((self.output != output) | (self.prompt != prompt)))
        dur = float(trace.duration_s or (self.arrival[-1] if len(self.arrival) else 0.0))
        self.duration_s = max(dur, self.arrival[-1] if len(self.arrival) else 0.0)
        self.n_intervals = max(int(math.ceil(self.duration_s / self.dt - 1e-9)), 1)
        self.index = TraceIndex(self.arrival, self.prompt, self.output, self.dt, self.n_intervals)
        #: prompt + output tokens arriving per interval (work every group will see)
        self._tok_sum = (self.index.prompt_sum + self.index.output_sum).tolist()
        self._steps: RecurringTable = self.cache.setdefault("steps", RecurringTable())
        #: identity cache of step_model, {id(layout): (layout, its step model)}: a layout recurs
        #: within a step and across steps (the serving layouts at each replica becoming ready)
        self._sm_ids: dict[int, tuple] = self.cache.setdefault("step_ids", {})
        #: step-model structures shared by plans of the same instances and tp (world.StepShape)
        self._shapes: dict[tuple, StepShape] = self.cache.setdefault("step_shapes", {})
        self.timeline: ClusterTimeline | None = None
        self.now = 0.0
        self.k = 0
        self.last_repairs: list[str] = []
        self.history: deque[float] = deque(maxlen=scenario.history_len)
        self.gpu_seconds = 0.0
        #: the part of gpu_seconds paid for draining attention units (GPU-seconds)
        self.drain_gpu_seconds = 0.0
        self.energy_j = 0.0
        self._acc_t = 0.0
        self._watts: tuple = (None, None, 0.0)
        #: power of one idle GPU (watts)
        self._idle_w = pred.power_w(0.0)
        self._power_pct = pred.power_by_percent()
        self.util: dict[str, float] = {}
        self.wall_s = 0.0
        self.last_metrics = IntervalMetrics()

    # ------------------------------------------------------------------ helpers for subclasses
    def step_model(self, layout: Layout) -> StepModel:
        """The (cached) step model of a layout."""
        hit = self._sm_ids.get(id(layout))
        if hit is not None and hit[0] is layout:
            return hit[1]
        key = layout.ops_key
        sm = self._steps.get(key)
        if sm is None:
            sm = self._steps.put(key, StepModel(layout, self.pred, self.sc, self._shapes))
        put(self._sm_ids, id(layout), (layout, sm), 256)  # (holds the layout: its id stays unique)
        return sm

    def serving_layout(self, t: float) -> Layout:
        """Layout of the replicas serving at ``t``."""
        assert self.timeline is not None
        return self.timeline.serving(t)[1]

    def account(self, t: float, util: dict[str, float] | None = None) -> None:
        """Add GPU-seconds and joules from the last accounting time up to ``t``.

        Each paid GPU draws power(u) where u is the summed busy share of the replica shards on it
        (capped at 1); GPUs that are loading or draining draw idle power.
        """
        assert self.timeline is not None
        span = t - self._acc_t
        if span <= 0:
            return
        util = self.util if util is None else util
        tl = self.timeline
        paid = tl.gpus(self._acc_t)
        layout = tl.serving(self._acc_t)[1]
        cached = self._watts  # (layout, busy shares, watts of its GPUs): util dicts are replaced, never mutated
        if cached[0] is layout and cached[1] is util:
            watts = cached[2]
        else:
            watts = 0.0
            pw = self._power_pct  # (pw[power_percent(u)] = self.pred.power_w(u))
            get = util.get
            for count, procs in layout.power_terms:  # (= (c.count, c.procs.items()) of layout.gpus)
                # = envs.predictor.power_percent(min(runtime.colocation.gpu_busy(c.procs, util), 1.0)),
                # written out (an accounting runs at each replica becoming ready: 4.8 a step of
                # train.py's stream; tests/test_colocation.py checks the energy by hand)
                u = 0.0
                for proc, k in procs:
                    u += k * get(proc, 0.0)
                watts += count * pw[int(round((0.0 if u < 0.0 else (1.0 if u > 1.0 else u)) * 100))]
            self._watts = (layout, util, watts)
        extra = paid - layout.n_gpus  # GPUs paid beyond the serving layout's: loading or draining, idle
        if extra > 0:
            watts += extra * self._idle_w
        self.gpu_seconds += paid * span
        if tl.draining_units:  # as ClusterTimeline.gpus charges them, within what is paid beyond the target
            self.drain_gpu_seconds += min(tl.draining_units * max(tl.target.unit_tp, 1),
                                          max(paid - tl.target.n_gpus, 0)) * span
        self.energy_j += watts * span
        self._acc_t = t

    # ------------------------------------------------------------------ API
    def reset(self, plan: Plan) -> ClusterState:
        """Start the run with ``plan`` loaded; returns the state at t=0."""
        freeze_gc_once()
        self.timeline = ClusterTimeline(self.placer, plan)
        self.last_repairs = list(self.timeline.repairs)
        self.now = 0.0
        self.k = 0
        self._acc_t = 0.0
        self.gpu_seconds = 0.0
        self.drain_gpu_seconds = 0.0
        self.energy_j = 0.0
        self.util = {}
        self.history.clear()
        self.wall_s = 0.0
        self._reset_queues()
        self.last_metrics = IntervalMetrics()
        return self._state(self.last_metrics, 0.0)

    def step(self, plan: Plan | None = None) -> ClusterState:
        """Apply ``plan`` (None keeps the current one) and advance one control interval."""
        if self.timeline is None:
            raise RuntimeError("call reset(plan) before step()")
        w0 = time.perf_counter()
        self.last_repairs = []
        target = self.timeline.target.plan  # (= target_plan)
        if plan is not None and plan is not target and plan != target:
            try:
                self.account(self.now)
                draining = self.timeline.draining_units
                self.last_repairs = self.timeline.apply(plan, self.now)
                if self.timeline.draining_units > draining:
                    self._on_drain(self.timeline.draining_units - draining)
            except PlanError as e:
                self.last_repairs = [f"plan refused, previous plan kept: {e}"]
        t0, t1 = self.now, self.now + self.dt
        e0 = self.energy_j
        m = self._run(t0, t1)
        self.account(t1)
        self.timeline.advance(t1)
        self.now = t1
        self.k += 1
        self.history.append(m.arrivals / self.dt)
        self.wall_s += time.perf_counter() - w0
        self.last_metrics = m
        return self._state(m, self.energy_j - e0)

    @property
    def done(self) -> bool:
        """The trace is exhausted and no work is left."""
        return self.now >= self.duration_s - 1e-9 and self._idle()

    def _state(self, m: IntervalMetrics, energy: float) -> ClusterState:
        assert self.timeline is not None
        tl = self.timeline
        serving, layout = tl.serving(self.now)
        ops = {}
        k = self.k - 1
        rate = (self._tok_sum[k] / self.dt) if 0 <= k < self.n_intervals else 0.0
        target_ops = tl.target.plan.ops  # (= tl.target_plan)
        mono = layout.mono
        pending = tl.pending_all(self.now)
        sops = serving.ops
        util, p50, p99, mem = m.util, m.group_ms, m.group_ms_p99, layout.memory_bytes
        for i, g in enumerate(OPERATOR_GROUPS):
            target = target_ops[g]
            # (positional, in OperatorState's field order: see _STATE_FIELDS)
            ops[g] = OperatorState(
                sops[g].replicas, target.max_batch, target.placement, target.tp, pending[i], rate,
                m.queue_tokens if g == "attn" else 0.0,
                util.get(MODEL if g in mono else g, 0.0),  # (= layout.proc_of(g))
                p50.get(g, 0.0) / 1000.0, p99.get(g, 0.0) / 1000.0, float(mem.get(g, 0.0)))
        att = m.met / (m.finished + m.rejected) if (m.finished + m.rejected) > 0 else 1.0
        # (positional, in ClusterState's field order: see _STATE_FIELDS)
        return ClusterState(
            self.now, self.dt, ops, self.slo, tl.target.plan,
            m.ttft_p50_s, m.ttft_p99_s, m.tbt_p50_s, m.tbt_p99_s,
            float(att), float(tl.gpus(self.now)),
            energy / self.dt if self.k else 0.0, energy,
            np.fromiter(self.history, np.float64, len(self.history)),
            m.prompt_mean, m.output_mean,
            int(round(m.queued)), int(round(m.running)),
            int(round(m.rejected)), float(min(max(m.kv_used_frac, 0.0), 1.0)),
        )

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _reset_queues(self) -> None:
        """Empty all queues and per-request records."""

    @abstractmethod
    def _run(self, t0: float, t1: float) -> IntervalMetrics:
        """Advance the cluster from t0 to t1 under the timeline; call account() at changes."""

    def _on_drain(self, units: int) -> None:
        """``units`` serving attention units were removed and now drain (subclasses track them)."""

    @abstractmethod
    def _idle(self) -> bool:
        """No request waiting or running."""

    @abstractmethod
    def summary(self) -> dict:
        """Whole-run metrics: slo_attainment, ttft/tbt p50/p99 (s), gpu_seconds, energy_j, counts."""

    def _cost_summary(self) -> dict:
        return {"gpu_seconds": self.gpu_seconds, "drain_gpu_seconds": self.drain_gpu_seconds,
                "energy_j": self.energy_j,
                "mean_gpus": self.gpu_seconds / self.now if self.now > 0 else 0.0,
                "sim_time_s": self.now, "wall_s": self.wall_s, "fidelity": self.fidelity,
                "slo_ttft_s": self.slo.ttft_s, "slo_tbt_s": self.slo.tbt_s, "clipped_requests": self.clipped}
