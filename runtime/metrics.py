"""Runtime measurements: per-interval statistics for ``observe()`` and Prometheus series.

:class:`RuntimeMetrics` is fed by the engine (work items done, tokens emitted, requests
finished or rejected) and answers two readers: the control loop, which takes the
statistics of the interval since its last call (:meth:`RuntimeMetrics.take_interval`), and
``GET /metrics``, which renders cumulative Prometheus series from a registry owned by the
metrics object (one per engine, so several engines in one process do not collide).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from runtime.models import OPERATOR_GROUPS

#: Histogram buckets (seconds) for TTFT, TBT and operator latency.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def pct(xs: list[float] | np.ndarray, q: float) -> float:
    """``q``-th percentile of ``xs`` (0.0 when empty)."""
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else 0.0


@dataclass
class GroupInterval:
    """What one operator group did over an interval.

    Attributes:
        tokens: token-steps that arrived at the group (one per token per layer pass).
        busy_s: summed service time of its replicas (seconds).
        latencies_s: per work item, queue wait + service (seconds).
    """

    tokens: int = 0
    busy_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)


@dataclass
class Interval:
    """Statistics of one control interval (see :meth:`RuntimeMetrics.take_interval`)."""

    start_s: float
    end_s: float
    groups: dict[str, GroupInterval]
    ttft_s: list[float]
    tbt_s: list[float]
    finished: int
    finished_ok: int
    arrivals: int
    rejected: int
    prompt_tokens: list[int]
    output_tokens: list[int]


class RuntimeMetrics:
    """Thread-safe counters of a running engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        r = self.registry
        self.op_queue = Gauge("opscale_operator_queue_tokens", "Token-steps waiting at the group's replicas",
                              ["group"], registry=r)
        self.op_batch = Gauge("opscale_operator_batch_last", "Sequences in the group's last batch", ["group"],
                              registry=r)
        self.op_max_batch = Gauge("opscale_operator_max_batch", "Batch limit of the group (sequences)", ["group"],
                                  registry=r)
        self.op_replicas = Gauge("opscale_operator_replicas", "Replicas of the group by state",
                                 ["group", "state"], registry=r)
        self.op_latency = Histogram("opscale_operator_latency_seconds", "Queue wait + service of a batch",
                                    ["group"], buckets=LATENCY_BUCKETS, registry=r)
        self.op_tokens = Counter("opscale_operator_tokens", "Token-steps processed by the group", ["group"],
                                 registry=r)
        self.ttft = Histogram("opscale_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tbt = Histogram("opscale_tbt_seconds", "Time between tokens", buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("opscale_requests", "Requests by outcome", ["outcome"], registry=r)
        self.running = Gauge("opscale_running_requests", "Requests admitted and not finished", registry=r)
        self.waiting = Gauge("opscale_waiting_requests", "Requests waiting for KV admission", registry=r)
        self.kv_used = Gauge("opscale_kv_used_fraction", "Share of KV blocks reserved", registry=r)
        self.gpus = Gauge("opscale_gpus_in_use", "GPUs (CPU: placement slots) holding replicas", registry=r)
        self.plan_changes = Counter("opscale_plan_changes", "Plans applied", registry=r)
        self.worker_deaths = Counter("opscale_worker_deaths", "Replicas that died", ["group"], registry=r)
        self.preemptions = Counter("opscale_preemptions", "Sequences preempted for KV memory (recomputed later)",
                                   registry=r)
        for g in OPERATOR_GROUPS:
            for c in (self.op_queue, self.op_batch, self.op_max_batch, self.op_tokens):
                c.labels(group=g)
            self.op_latency.labels(group=g)
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._start = now
        self._groups = {g: GroupInterval() for g in OPERATOR_GROUPS}
        self._ttft: list[float] = []
        self._tbt: list[float] = []
        self._finished = self._finished_ok = self._arrivals = self._rejected = 0
        self._prompt: list[int] = []
        self._output: list[int] = []

    # ---- feeds ------------------------------------------------------------------------
    def item_done(self, group: str, tokens: int, seqs: int, wait_s: float, service_s: float) -> None:
        """A replica of ``group`` finished a batch of ``seqs`` sequences / ``tokens`` token-steps."""
        with self._lock:
            gi = self._groups[group]
            gi.tokens += tokens
            gi.busy_s += service_s
            gi.latencies_s.append(wait_s + service_s)
        self.op_latency.labels(group=group).observe(wait_s + service_s)
        self.op_batch.labels(group=group).set(seqs)
        self.op_tokens.labels(group=group).inc(tokens)

    def arrival(self, prompt_tokens: int, output_tokens: int) -> None:
        """A request was submitted."""
        with self._lock:
            self._arrivals += 1
            self._prompt.append(prompt_tokens)
            self._output.append(output_tokens)

    def first_token(self, ttft_s: float) -> None:
        """A request got its first token ``ttft_s`` seconds after arrival."""
        with self._lock:
            self._ttft.append(ttft_s)
        self.ttft.observe(ttft_s)

    def next_token(self, tbt_s: float) -> None:
        """A request got another token ``tbt_s`` seconds after its previous one."""
        with self._lock:
            self._tbt.append(tbt_s)
        self.tbt.observe(tbt_s)

    def finished(self, ok_slo: bool, outcome: str = "completed") -> None:
        """A request finished; ``ok_slo`` when its TTFT and worst TBT met the SLO."""
        with self._lock:
            self._finished += 1
            self._finished_ok += int(ok_slo)
        self.requests.labels(outcome=outcome).inc()

    def rejected(self, reason: str) -> None:
        """A request was refused (``reason`` is a short label such as ``queue_full``)."""
        with self._lock:
            self._rejected += 1
        self.requests.labels(outcome=f"rejected_{reason}").inc()

    # ---- readers ----------------------------------------------------------------------
    def take_interval(self) -> Interval:
        """Statistics since the previous call (or construction), and start a new interval."""
        now = time.perf_counter()
        with self._lock:
            out = Interval(self._start, now, self._groups, self._ttft, self._tbt, self._finished,
                           self._finished_ok, self._arrivals, self._rejected, self._prompt, self._output)
            self._reset(now)
        return out

    def render(self) -> bytes:
        """Prometheus text exposition of every series."""
        return generate_latest(self.registry)
