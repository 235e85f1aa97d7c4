"""The control vocabulary shared by the simulator, the controllers and the live runtime.

A controller sees a :class:`ClusterState` once per control interval and answers with a
:class:`Plan`. The simulator (envs/) and the serving runtime (runtime/) both produce
ClusterStates and both apply Plans, so any :class:`Controller` runs unchanged in either.

Units: times in seconds, rates in requests or tokens per second, memory in bytes,
power in watts, energy in joules.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np

from runtime.models import OPERATOR_GROUPS, ModelConfig

#: Where an operator group's replicas go.
#: - ``model``: part of a whole-model instance; every group with placement ``model``
#:   shares the instance's GPUs (a monolithic replica, no transfers between pools).
#: - ``dedicated``: the group's replicas get GPUs of their own.
#: - ``pack``: interference-aware best fit onto GPUs already in use, a new GPU only when
#:   none has room.
PLACEMENTS: tuple[str, ...] = ("model", "dedicated", "pack")


class PlanError(ValueError):
    """A plan that names unknown groups or holds impossible values."""


@dataclass(frozen=True)
class SLO:
    """Latency targets a request must meet to count as served well.

    Attributes:
        ttft_s: time-to-first-token target at the given percentile (seconds).
        tbt_s: time-between-tokens target at the given percentile (seconds).
        percentile: which percentile the targets bind (99 = p99).
        attainment_target: share of requests that must meet both targets (0..1).
    """

    ttft_s: float
    tbt_s: float
    percentile: float = 99.0
    attainment_target: float = 0.99


@dataclass(frozen=True)
class OperatorSpec:
    """An operator group of a model and what one copy of it costs.

    Attributes:
        name: group name, one of :data:`runtime.models.OPERATOR_GROUPS`.
        weight_bytes: weights of the group over all layers, unsharded (bytes).
        flops_per_token: matmul FLOPs per token over all layers (FLOPs).
        kv_bytes_per_token: KV-cache bytes per cached token (attn only, else 0).
        layers: how many times a token step passes through the group (per-layer multiplicity).
    """

    name: str
    weight_bytes: int
    flops_per_token: float
    kv_bytes_per_token: int
    layers: int

    @staticmethod
    def for_model(cfg: ModelConfig) -> dict[str, "OperatorSpec"]:
        """The five operator groups of ``cfg``, keyed by name."""
        per_layer = {"embed": 1, "head": 1}
        return {
            g: OperatorSpec(
                name=g,
                weight_bytes=cfg.group_weight_bytes(g),
                flops_per_token=cfg.group_flops_per_token(g),
                kv_bytes_per_token=cfg.kv_bytes_per_token if g == "attn" else 0,
                layers=per_layer.get(g, cfg.n_layers),
            )
            for g in OPERATOR_GROUPS
        }


@dataclass(frozen=True, slots=True)
class OperatorPlan:
    """What a controller sets for one operator group.

    Attributes:
        replicas: number of replicas (each replica spans ``tp`` GPUs' worth of shards).
        max_batch: most sequences one replica batches in one iteration.
        placement: one of :data:`PLACEMENTS`.
        tp: tensor-parallel degree of each replica.
    """

    replicas: int
    max_batch: int
    placement: str = "pack"
    tp: int = 1

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise PlanError(f"replicas must be >= 0, got {self.replicas}")
        if self.max_batch < 1:
            raise PlanError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.placement not in PLACEMENTS:
            raise PlanError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.tp not in (1, 2, 4, 8):
            raise PlanError(f"tp must be 1, 2, 4 or 8, got {self.tp}")


@dataclass(frozen=True, slots=True)
class Plan:
    """Per operator group: replicas, batch limit, placement and tensor parallelism."""

    ops: Mapping[str, OperatorPlan]

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(OPERATOR_GROUPS)
        if unknown:
            raise PlanError(f"unknown operator groups {sorted(unknown)}; expected {OPERATOR_GROUPS}")
        missing = set(OPERATOR_GROUPS) - set(self.ops)
        if missing:
            raise PlanError(f"plan lacks operator groups {sorted(missing)}")
        for g, op in self.ops.items():
            if op.replicas < 1:
                raise PlanError(f"operator {g!r} needs at least one replica to serve, got {op.replicas}")

    def __getitem__(self, group: str) -> OperatorPlan:
        return self.ops[group]

    def __deepcopy__(self, memo: dict) -> "Plan":
        return self  # a value: frozen, and nothing changes its ops after construction

    def with_op(self, group: str, **changes: object) -> "Plan":
        """A copy with one group's fields changed."""
        ops = dict(self.ops)
        ops[group] = replace(ops[group], **changes)  # type: ignore[arg-type]
        return Plan(ops)

    @staticmethod
    def model_level(replicas: int, max_batch: int, tp: int) -> "Plan":
        """``replicas`` whole-model instances of ``tp`` GPUs each (placement ``model``)."""
        return Plan({g: OperatorPlan(replicas, max_batch, "model", tp) for g in OPERATOR_GROUPS})

    def to_dict(self) -> dict[str, dict[str, object]]:
        """JSON-ready form: ``{group: {replicas, max_batch, placement, tp}}``."""
        return {g: {"replicas": o.replicas, "max_batch": o.max_batch, "placement": o.placement, "tp": o.tp}
                for g, o in self.ops.items()}

    @staticmethod
    def from_dict(data: Mapping[str, Mapping[str, object]]) -> "Plan":
        """Inverse of :meth:`to_dict`; raises PlanError naming the bad group or field."""
        ops: dict[str, OperatorPlan] = {}
        for g, fields in data.items():
            if not isinstance(fields, Mapping):
                raise PlanError(f"plan entry for {g!r} must be an object, got {type(fields).__name__}")
            extra = set(fields) - {"replicas", "max_batch", "placement", "tp"}
            if extra:
                raise PlanError(f"plan entry for {g!r} has unknown fields {sorted(extra)}")
            try:
                ops[g] = OperatorPlan(
                    replicas=int(fields["replicas"]),  # type: ignore[arg-type]
                    max_batch=int(fields["max_batch"]),  # type: ignore[arg-type]
                    placement=str(fields.get("placement", "pack")),
                    tp=int(fields.get("tp", 1)),  # type: ignore[arg-type]
                )
            except KeyError as e:
                raise PlanError(f"plan entry for {g!r} lacks field {e.args[0]!r}") from None
            except (TypeError, ValueError) as e:
                if isinstance(e, PlanError):
                    raise PlanError(f"plan entry for {g!r}: {e}") from None
                raise PlanError(f"plan entry for {g!r} has a non-integer value: {e}") from None
        return Plan(ops)


@dataclass(slots=True)
class OperatorState:
    """What a controller sees of one operator group over the last interval.

    Attributes:
        replicas: replicas serving now (loading ones excluded).
        pending_replicas: replicas loading weights, not yet serving.
        max_batch: current batch limit (sequences per iteration).
        placement: current placement.
        tp: tensor-parallel degree.
        arrival_rate: work arriving at the group (token-steps per second).
        queue_len: token-steps waiting for the group at the end of the interval.
        utilisation: busy share of the group's replicas over the interval (0..1).
        latency_p50_s: median time a batch spent in the group (wait + service), seconds.
        latency_p99_s: p99 of the same, seconds.
        memory_bytes: memory the group's replicas hold (weights + KV + activations).
    """

    replicas: int
    max_batch: int
    placement: str
    tp: int = 1
    pending_replicas: int = 0
    arrival_rate: float = 0.0
    queue_len: float = 0.0
    utilisation: float = 0.0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    memory_bytes: float = 0.0


@dataclass
class ClusterState:
    """What a controller sees each control interval.

    Attributes:
        time_s: time at the end of the interval (seconds since the start of the run).
        interval_s: length of the interval (seconds).
        operators: per-group state, keyed by group name.
        slo: the targets in force.
        ttft_p50_s, ttft_p99_s: time to first token of requests that got it this interval.
        tbt_p50_s, tbt_p99_s: gaps between tokens emitted this interval.
        slo_attainment: share of requests finished this interval meeting both targets (0..1;
            1.0 when none finished).
        gpus_in_use: GPUs holding any replica (loading ones included: they cost).
        power_w: mean cluster power over the interval (watts).
        energy_j: energy over the interval (joules).
        request_rate_history: arrivals per second in the most recent intervals, oldest first.
        prompt_tokens_mean, output_tokens_mean: of requests that arrived this interval.
        queued_requests: requests waiting for admission (prefill not started).
        running_requests: requests admitted and not finished.
        rejected_requests: requests rejected this interval (each with a reason in the logs).
        kv_used_frac: share of KV-cache capacity in use (0..1).
        plan: the plan in force during the interval.
    """

    time_s: float
    interval_s: float
    operators: dict[str, OperatorState]
    slo: SLO
    plan: Plan
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    tbt_p50_s: float = 0.0
    tbt_p99_s: float = 0.0
    slo_attainment: float = 1.0
    gpus_in_use: float = 0.0
    power_w: float = 0.0
    energy_j: float = 0.0
    request_rate_history: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    prompt_tokens_mean: float = 0.0
    output_tokens_mean: float = 0.0
    queued_requests: int = 0
    running_requests: int = 0
    rejected_requests: int = 0
    kv_used_frac: float = 0.0


class Controller(ABC):
    """Decides a plan from the state of the cluster, once per control interval.

    Implementations must be deterministic given their seed and inputs, and must return a
    valid :class:`Plan` for any state (the caller repairs plans that do not fit memory).
    """

    #: short name used on command lines (``static``, ``model-level``, ...).
    name: str = "controller"

    def reset(self, state: ClusterState | None = None) -> None:
        """Forget any history; called at the start of an episode or a serving run."""

    @abstractmethod
    def decide(self, state: ClusterState) -> Plan:
        """Return the plan for the next interval."""
