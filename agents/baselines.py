"""Whole-model baselines: a static plan sized for the peak, and a model-level autoscaler.

Both only ever return :meth:`Plan.model_level` plans: ``replicas`` monolithic instances of
``tp`` GPUs each, every operator group placed ``model``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from agents.context import ControllerContext
from agents.sizing import InstanceCapacity, LoadEstimator, instance_capacity, replicas_for_rate
from runtime.control import ClusterState, Controller, Plan


def peak_rate(arrival_s: np.ndarray, window_s: float = 60.0) -> float:
    """Highest arrival rate over any ``window_s``-long window starting at an arrival (req/s)."""
    t = np.asarray(arrival_s, dtype=np.float64)
    if t.size == 0:
        return 0.0
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    ends = np.searchsorted(t, t + window_s, side="left")
    return float((ends - np.arange(t.size)).max()) / window_s


class StaticController(Controller):
    """Always the same plan."""

    name = "static"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    @classmethod
    def for_trace(cls, ctx: ControllerContext, arrival_s: np.ndarray, prompt_tokens: np.ndarray,
                  output_tokens: np.ndarray, window_s: float = 60.0, target_utilisation: float = 0.8,
                  max_replicas: int | None = None) -> "StaticController":
        """Whole-model instances provisioned for the trace's peak ``window_s`` rate at the SLO.

        Capacity per instance comes from :func:`agents.sizing.instance_capacity` at the
        trace's mean prompt and output lengths; instances are loaded to
        ``target_utilisation`` at the peak.
        """
        cap = instance_capacity(ctx, float(np.mean(prompt_tokens)) if len(prompt_tokens) else ctx.default_prompt_tokens,
                                float(np.mean(output_tokens)) if len(output_tokens) else ctx.default_output_tokens)
        n = replicas_for_rate(peak_rate(arrival_s, window_s), cap, target_utilisation, cap=max_replicas)
        return cls(Plan.model_level(n, cap.max_batch, ctx.tp))

    @classmethod
    def search(cls, attains: Callable[[Plan], float], tp: int, max_batch: int, target: float,
               max_instances: int) -> "StaticController":
        """The fewest whole-model instances whose fixed plan reaches ``target`` attainment.

        ``attains(plan)`` runs the plan over the trace to be served (a simulator run) and
        returns its SLO attainment; attainment is taken to grow with instances, so the
        count is found by bisection. When even ``max_instances`` falls short, that is used.
        """
        lo, hi = 1, max(1, max_instances)
        cache: dict[int, float] = {}

        def ok(n: int) -> bool:
            if n not in cache:
                cache[n] = attains(Plan.model_level(n, max_batch, tp))
            return cache[n] >= target

        if not ok(hi):
            return cls(Plan.model_level(hi, max_batch, tp))
        while lo < hi:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid + 1
        ctl = cls(Plan.model_level(lo, max_batch, tp))
        ctl.searched = dict(sorted(cache.items()))
        return ctl

    def decide(self, state: ClusterState) -> Plan:
        return self.plan


@dataclass
class ModelLevelConfig:
    """Knobs of the model-level autoscaler.

    Attributes:
        mode: ``ongoing`` scales on ongoing requests per replica (Ray Serve's
            ``target_ongoing_requests``, Kubernetes HPA on a custom metric); ``slo`` sizes
            replicas from the profiled per-instance capacity at the SLO for the estimated
            rate and adds one on an observed SLO miss (DynamoLLM-style).
        target_ongoing: ongoing requests per replica to aim for (``ongoing`` mode); 0 means
            ``target_utilisation x`` the profiled batch limit.
        target_utilisation: load per instance to aim for (0..1).
        capacity_rps: requests per second one instance sustains at the SLO (``slo`` mode);
            0 means the profile estimate of :func:`agents.sizing.instance_capacity`.
        queue_drain_s: queued requests are planned to drain within this time (``slo``
            mode adds ``queued / queue_drain_s`` to the rate), seconds.
        upscale_delay_s: a larger desired count must persist this long before scaling up (s).
        downscale_delay_s: a smaller desired count must persist this long before scaling down (s).
        min_replicas, max_replicas: bounds on whole-model instances.
    """

    mode: str = "slo"
    target_ongoing: float = 0.0
    target_utilisation: float = 0.8
    capacity_rps: float = 0.0
    queue_drain_s: float = 10.0
    upscale_delay_s: float = 20.0
    downscale_delay_s: float = 20.0
    min_replicas: int = 1
    max_replicas: int = 32

    def __post_init__(self) -> None:
        if self.mode not in ("ongoing", "slo"):
            raise ValueError(f"model-level mode must be 'ongoing' or 'slo', got {self.mode!r}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")


class ModelLevelController(Controller):
    """Model-level autoscaler with up/down-scale delays, whole-model replicas only."""

    name = "model-level"

    def __init__(self, ctx: ControllerContext, config: ModelLevelConfig | None = None) -> None:
        self.ctx = ctx
        self.config = config or ModelLevelConfig()
        self.estimator = LoadEstimator(ctx)
        self.reset()

    def reset(self, state: ClusterState | None = None) -> None:
        self.estimator.reset()
        self.replicas: int | None = state.plan["mlp"].replicas if state is not None else None
        self._since: float | None = None  # when the desired count started differing in the current direction
        self._direction = 0
        self._pending: list[int] = []
        self.capacity: InstanceCapacity = instance_capacity(self.ctx, self.ctx.default_prompt_tokens,
                                                           self.ctx.default_output_tokens)

    def desired(self, state: ClusterState) -> int:
        """Instances the metric asks for now, before the delays."""
        c = self.config
        load = self.estimator.update(state)
        self.capacity = instance_capacity(self.ctx, load.prompt_tokens, load.output_tokens)
        current = self.replicas or c.min_replicas
        if c.mode == "ongoing":
            target = c.target_ongoing or c.target_utilisation * self.capacity.max_batch
            want = int(np.ceil((state.running_requests + state.queued_requests) / max(target, 1e-9)))
        else:
            cap = self.capacity if c.capacity_rps <= 0 else InstanceCapacity(
                self.capacity.max_batch, c.capacity_rps, self.capacity.decode_step_s, self.capacity.prefill_s)
            rate = load.rate + state.queued_requests / max(c.queue_drain_s, 1e-9)
            want = replicas_for_rate(rate, cap, c.target_utilisation)
            missed = (state.ttft_p99_s > self.ctx.slo.ttft_s or state.tbt_p99_s > self.ctx.slo.tbt_s
                      or state.slo_attainment < self.ctx.slo.attainment_target)
            if missed:
                want = max(want, current + 1)
        return int(np.clip(want, c.min_replicas, c.max_replicas))

    def decide(self, state: ClusterState) -> Plan:
        c = self.config
        self.ctx.slo = state.slo  # the targets in force
        if self.replicas is None:
            self.replicas = int(np.clip(state.plan["mlp"].replicas, c.min_replicas, c.max_replicas))
        want = self.desired(state)
        direction = int(np.sign(want - self.replicas))
        if direction == 0:
            self._since, self._direction, self._pending = None, 0, []
        else:
            if direction != self._direction:
                self._since, self._direction, self._pending = state.time_s, direction, []
            self._pending.append(want)
            delay = c.upscale_delay_s if direction > 0 else c.downscale_delay_s
            assert self._since is not None
            if state.time_s - self._since + self.ctx.interval_s >= delay - 1e-9:
                # Up: the latest desired count (Ray Serve); down: the largest desired count
                # seen during the delay window (Kubernetes HPA stabilisation window).
                self.replicas = want if direction > 0 else max(self._pending)
                self._since, self._direction, self._pending = None, 0, []
        return Plan.model_level(self.replicas, self.capacity.max_batch, self.ctx.tp)
