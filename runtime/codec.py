"""The one observation encoder and the one action decoder.

The Gymnasium env, the PPO controller in the simulator and the PPO controller in the live
runtime all turn a :class:`ClusterState` into the policy's input with
:class:`ObservationEncoder`, and the policy's MultiDiscrete action into a :class:`Plan`
with :class:`ActionDecoder`. Checkpoints record :data:`SPEC_VERSION` and the codec's
:meth:`CodecConfig.to_dict`; a loader refuses a checkpoint whose codec differs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

import numpy as np

from runtime.control import PLACEMENTS, ClusterState, OperatorPlan, Plan
from runtime.models import OPERATOR_GROUPS

#: Bump when the meaning or layout of observations or actions changes.
SPEC_VERSION = "opscale-codec-1"


@dataclass(frozen=True)
class CodecConfig:
    """Limits and levels that fix the observation and action layout.

    Attributes:
        replica_deltas: replica changes an action may pick per group per interval (delta mode).
        replica_levels: when non-empty, the replica sub-action picks an absolute replica count
            from these levels (level mode) instead of a change from ``replica_deltas``. A delta
            action space lets a policy cycle (+1 per interval, then -4) without reading the
            state; levels map a state to a plan directly (docs/TRAINING.md).
        batch_levels: max_batch values an action may pick (sequences per iteration).
        max_replicas: upper bound on replicas per group (the decoder clips to it).
        min_replicas: lower bound on replicas per group.
        max_gpus: GPUs the cluster may use; normalises the GPU count feature.
        history_len: intervals of request-rate history in the observation.
        rate_scale: requests per second that maps to 1.0 in rate features (log-scaled).
        gpu_peak_w: peak watts of one GPU; normalises the power feature.
    """

    replica_deltas: tuple[int, ...] = (-4, -1, 0, 1, 4)
    replica_levels: tuple[int, ...] = ()
    batch_levels: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    max_replicas: int = 32
    min_replicas: int = 1
    max_gpus: int = 64
    history_len: int = 8
    rate_scale: float = 10.0
    gpu_peak_w: float = 700.0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict[str, object]) -> "CodecConfig":
        """Inverse of :meth:`to_dict`."""
        return CodecConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})  # type: ignore[arg-type]


def _squash(x: float) -> float:
    """log1p compression for non-negative magnitudes with heavy tails."""
    return float(np.log1p(max(x, 0.0)))


@dataclass
class ObservationEncoder:
    """ClusterState -> float32 vector of fixed length :attr:`size`.

    Layout, per group in :data:`OPERATOR_GROUPS` order (12 features): replicas / max,
    pending replicas / max, batch level index / (levels - 1), placement one-hot (3),
    log1p(arrival token-steps/s / 1000), log1p(queue token-steps / 100), utilisation,
    p50 and p99 group latency / TBT SLO (clipped at 10), log1p(tp) / log(8).
    Then cluster features (11): TTFT p50, p99 / SLO, TBT p50, p99 / SLO (clipped at 10),
    SLO attainment, GPUs / max, power / (max GPUs x peak), KV used share,
    log1p(queued requests), log1p(running requests) / 5, log1p(prompt mean)/10 ... and the request
    rate history (``history_len`` values, log1p(rate / rate_scale)).
    """

    config: CodecConfig = field(default_factory=CodecConfig)

    PER_GROUP = 12
    CLUSTER = 11

    @property
    def size(self) -> int:
        """Length of the observation vector."""
        return len(OPERATOR_GROUPS) * self.PER_GROUP + self.CLUSTER + self.config.history_len

    def encode(self, state: ClusterState) -> np.ndarray:
        """Encode ``state``; missing history is zero-padded at the old end."""
        c = self.config
        out = np.zeros(self.size, dtype=np.float32)
        i = 0
        levels = np.asarray(c.batch_levels)
        slo_tbt = max(state.slo.tbt_s, 1e-9)
        slo_ttft = max(state.slo.ttft_s, 1e-9)
        for g in OPERATOR_GROUPS:
            op = state.operators[g]
            level = int(np.argmin(np.abs(levels - op.max_batch)))
            vals = [
                op.replicas / c.max_replicas,
                op.pending_replicas / c.max_replicas,
                level / max(len(levels) - 1, 1),
                *[1.0 if op.placement == p else 0.0 for p in PLACEMENTS],
                _squash(op.arrival_rate / 1000.0),
                _squash(op.queue_len / 100.0),
                float(np.clip(op.utilisation, 0.0, 1.0)),
                min(op.latency_p50_s / slo_tbt, 10.0),
                min(op.latency_p99_s / slo_tbt, 10.0),
                _squash(op.tp) / np.log(9.0),
            ]
            out[i:i + self.PER_GROUP] = vals
            i += self.PER_GROUP
        cluster = [
            min(state.ttft_p50_s / slo_ttft, 10.0),
            min(state.ttft_p99_s / slo_ttft, 10.0),
            min(state.tbt_p50_s / slo_tbt, 10.0),
            min(state.tbt_p99_s / slo_tbt, 10.0),
            float(np.clip(state.slo_attainment, 0.0, 1.0)),
            state.gpus_in_use / c.max_gpus,
            state.power_w / (c.max_gpus * c.gpu_peak_w),
            float(np.clip(state.kv_used_frac, 0.0, 1.0)),
            _squash(state.queued_requests) / 5.0,
            _squash(state.running_requests) / 5.0,
            _squash(state.prompt_tokens_mean) / 10.0,
        ]
        out[i:i + self.CLUSTER] = cluster
        i += self.CLUSTER
        hist = np.asarray(state.request_rate_history, dtype=np.float64)[-c.history_len:]
        if hist.size:
            out[self.size - hist.size:] = np.log1p(np.maximum(hist, 0.0) / c.rate_scale)
        return out


@dataclass
class ActionDecoder:
    """MultiDiscrete action -> Plan, as a change to the previous plan.

    Per group three sub-actions: replica index (into ``replica_deltas``, or into
    ``replica_levels`` when the config has levels: an absolute count), batch level
    index into ``batch_levels``, placement index into :data:`PLACEMENTS`. Replicas are
    clipped to [min_replicas, max_replicas]; tensor parallelism is kept from the previous
    plan (it is a property of the scenario, not of the interval). Every action decodes to
    a valid Plan; whether it fits memory is the simulator's or runtime's to repair.
    """

    config: CodecConfig = field(default_factory=CodecConfig)
    #: masks already built, by what they depend on (read-only arrays; see :meth:`action_mask`)
    _masks: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    #: :meth:`nearest_replica_choices` already computed, by (current, want)
    _nearest: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def nvec(self) -> np.ndarray:
        """Sizes of the MultiDiscrete sub-actions, group-major."""
        c = self.config
        return np.array([self.n_replica_choices, len(c.batch_levels), len(PLACEMENTS)] * len(OPERATOR_GROUPS),
                        dtype=np.int64)

    @property
    def n_replica_choices(self) -> int:
        """Choices of the replica sub-action (levels in level mode, deltas otherwise)."""
        c = self.config
        return len(c.replica_levels) if c.replica_levels else len(c.replica_deltas)

    def replicas_for(self, index: int, current: int) -> int:
        """Replica count the replica sub-action ``index`` gives a group now at ``current``."""
        c = self.config
        r = c.replica_levels[index] if c.replica_levels else current + c.replica_deltas[index]
        return int(min(max(r, c.min_replicas), c.max_replicas))

    def nearest_replica_choices(self, current: int, want: int) -> np.ndarray:
        """Boolean mask over the replica sub-action: the choices whose count, from ``current``,
        lands nearest ``want`` (read-only; cached, it is asked for at every step of a frozen group)."""
        key = (int(current), int(want))
        hit = self._nearest.get(key)
        if hit is None:
            if len(self._nearest) >= 4096:
                self._nearest.clear()
            dist = np.array([abs(self.replicas_for(i, key[0]) - key[1]) for i in range(self.n_replica_choices)])
            hit = self._nearest[key] = dist == dist.min()
            hit.flags.writeable = False
        return hit

    def decode(self, action: np.ndarray, prev: Plan) -> Plan:
        """Apply ``action`` to ``prev``; raises ValueError if the action has the wrong shape."""
        c = self.config
        a = np.asarray(action, dtype=np.int64).reshape(-1)
        if a.shape[0] != len(self.nvec):
            raise ValueError(f"action has {a.shape[0]} entries, expected {len(self.nvec)}")
        a = np.clip(a, 0, self.nvec - 1)
        ops: dict[str, OperatorPlan] = {}
        for k, g in enumerate(OPERATOR_GROUPS):
            d_idx, b_idx, p_idx = a[3 * k:3 * k + 3]
            old = prev[g]
            replicas = self.replicas_for(int(d_idx), old.replicas)
            ops[g] = OperatorPlan(replicas, int(c.batch_levels[b_idx]), PLACEMENTS[p_idx], old.tp)
        return Plan(ops)

    def encode(self, plan: Plan, prev: Plan) -> np.ndarray:
        """The action that moves ``prev`` closest to ``plan`` (for imitation and tests)."""
        c = self.config
        out = []
        levels = np.asarray(c.batch_levels)
        deltas = np.asarray(c.replica_deltas)
        rlevels = np.asarray(c.replica_levels)
        for g in OPERATOR_GROUPS:
            if c.replica_levels:
                out.append(int(np.argmin(np.abs(rlevels - plan[g].replicas))))
            else:
                out.append(int(np.argmin(np.abs(deltas - (plan[g].replicas - prev[g].replicas)))))
            out.append(int(np.argmin(np.abs(levels - plan[g].max_batch))))
            out.append(PLACEMENTS.index(plan[g].placement))
        return np.array(out, dtype=np.int64)

    def action_mask(self, prev: Plan, freeze_layout: bool = False) -> np.ndarray:
        """Flat boolean mask over all sub-action choices (MaskablePPO layout).

        Replica deltas that would leave [min_replicas, max_replicas] are masked, except the
        zero delta which is always allowed; in level mode, levels outside that range are masked
        (the level nearest the range stays allowed, so a group always has a choice). With
        ``freeze_layout`` each group's batch level and placement are fixed to ``prev``'s (the
        nearest batch level): only replica counts are left to choose (agents/wrappers.py).

        The mask depends on ``prev`` only through its replica counts (delta mode; not at all in
        level mode) and, frozen, its batch limits and placements, so masks are built once per
        such key; each call returns a fresh copy (callers hand masks to torch, which warns on
        read-only arrays, and may change them).
        """
        c = self.config
        key = () if c.replica_levels else tuple(prev[g].replicas for g in OPERATOR_GROUPS)
        if freeze_layout:
            key += tuple((prev[g].max_batch, prev[g].placement) for g in OPERATOR_GROUPS)
        hit = self._masks.get((freeze_layout, key))
        if hit is None:
            if len(self._masks) >= 4096:
                self._masks.clear()
            hit = self._masks[(freeze_layout, key)] = self._build_mask(prev, freeze_layout)
        return hit.copy()

    def _build_mask(self, prev: Plan, freeze_layout: bool) -> np.ndarray:
        c = self.config
        levels = np.asarray(c.batch_levels)
        parts: list[np.ndarray] = []
        for g in OPERATOR_GROUPS:
            r = prev[g].replicas
            if c.replica_levels:
                ok = np.array([c.min_replicas <= lv <= c.max_replicas for lv in c.replica_levels])
                if not ok.any():
                    mid = (c.min_replicas + c.max_replicas) / 2
                    ok[int(np.argmin([abs(lv - mid) for lv in c.replica_levels]))] = True
                parts.append(ok)
            else:
                parts.append(np.array([(c.min_replicas <= r + d <= c.max_replicas) or d == 0
                                       for d in c.replica_deltas]))
            if freeze_layout:
                batch = np.zeros(len(c.batch_levels), dtype=bool)
                batch[int(np.argmin(np.abs(levels - prev[g].max_batch)))] = True
                place = np.array([p == prev[g].placement for p in PLACEMENTS])
            else:
                batch = np.ones(len(c.batch_levels), dtype=bool)
                place = np.ones(len(PLACEMENTS), dtype=bool)
            parts.append(batch)
            parts.append(place)
        mask = np.concatenate(parts)
        mask.flags.writeable = False
        return mask


def tp_follows_placement(plan: Plan, prev: Plan, model_tp: int, group_tp: Mapping[str, int]) -> Plan:
    """Set tp for groups whose placement changed between ``prev`` and ``plan``.

    The decoder keeps each group's tensor parallelism (a property of the scenario); a group
    that moves takes the tp its new placement runs at: ``model_tp`` inside a whole-model
    instance, ``group_tp[group]`` in its own pool (a group missing there keeps its tp). The
    env and the PPO controller both call this, so a policy's plan means the same in the
    simulator and the live runtime.
    """
    ops = dict(plan.ops)
    changed = False
    before = prev.ops
    for g, op in plan.ops.items():
        if op.placement != before[g].placement:
            tp = int(model_tp) if op.placement == "model" else int(group_tp.get(g, op.tp))
            if tp != op.tp:
                ops[g] = replace(op, tp=tp)
                changed = True
    return Plan(ops) if changed else plan
