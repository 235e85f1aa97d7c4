"""Scale-down stabilisation for any controller (Kubernetes HPA's stabilisation window).

A controller that cuts replicas the moment load dips pays for it at the next burst: the
replicas it removed must load their weights again before they serve. Production
autoscalers therefore scale up at once and scale down only to the *highest* count
recommended within a trailing window (Kubernetes HPA ``behavior.scaleDown.
stabilizationWindowSeconds``; Ray Serve's ``downscale_delay_s`` is the same idea).
:class:`DownscaleStabilizer` applies that rule per operator group to whatever controller it
wraps, so it serves the simulator and the live runtime alike.
"""
from __future__ import annotations

import math
from collections import deque

from runtime.control import ClusterState, Controller, Plan


class DownscaleStabilizer(Controller):
    """Wraps ``inner``: each group's replica count is the highest ``inner`` asked for within
    the last ``window_s`` seconds (the current decision included); scale-ups pass at once.

    Only earlier decisions with the group's current batch limit, placement and tensor
    parallelism count (a group that moved starts a fresh window).

    Args:
        inner: the controller whose plans are stabilised.
        window_s: stabilisation window (seconds, >= 0; 0 passes plans through unchanged).
        interval_s: the control interval (seconds) the controller is called at.
    """

    def __init__(self, inner: Controller, window_s: float, interval_s: float) -> None:
        if not (math.isfinite(window_s) and window_s >= 0):
            raise ValueError(f"downscale window must be a finite number of seconds >= 0, got {window_s!r}")
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"control interval must be a finite number of seconds > 0, got {interval_s!r}")
        self.inner = inner
        self.name = inner.name
        self.window_s = float(window_s)
        #: earlier decisions inside the window (the current one is added on top)
        self.n_past = int(math.ceil(self.window_s / float(interval_s) - 1e-9))
        self._past: deque[Plan] = deque(maxlen=max(self.n_past, 1))

    def reset(self, state: ClusterState | None = None) -> None:
        self.inner.reset(state)
        self._past.clear()

    def decide(self, state: ClusterState) -> Plan:
        asked = self.inner.decide(state)
        if self.n_past == 0:
            return asked
        plan = asked
        for g, op in asked.ops.items():
            keep = op.replicas
            for p in self._past:
                q = p.ops.get(g)
                if q is not None and (q.max_batch, q.placement, q.tp) == (op.max_batch, op.placement, op.tp):
                    keep = max(keep, q.replicas)
            if keep != op.replicas:
                plan = plan.with_op(g, replicas=keep)
        self._past.append(asked)
        return plan
