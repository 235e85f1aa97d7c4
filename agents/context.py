"""What a non-learned controller knows about the deployment besides the ClusterState.

A :class:`ControllerContext` carries the model shape, GPU, tensor-parallel degree, SLO and
a :class:`LatencyModel` that answers how long one operator group takes for a batch. The
profile-backed latency model wraps ``profiles.ProfileDB.group_latency``; the linear one is
a closed-form model (fixed + per-token + per-context-token cost) for a quick what-if and
for tests with hand-computed numbers.

Units: seconds for latencies returned here, bytes for memory, tokens for lengths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Protocol

from runtime.codec import CodecConfig
from runtime.control import SLO
from runtime.models import OPERATOR_GROUPS, ModelConfig

PHASES = ("prefill", "decode")


class LatencyModel(Protocol):
    """Time one replica of an operator group needs for one batch, all layers (seconds)."""

    def group_s(self, group: str, tokens: int, context: int, batch: int, tp: int, phase: str) -> float:
        """Seconds for ``batch`` sequences holding ``tokens`` new tokens and mean KV length
        ``context`` to pass through every layer of ``group`` once."""
        ...

    def iteration_overhead_s(self, batch: int, tokens: int, tp: int, phase: str, kernel_s: float) -> float:
        """Seconds a serving stack adds to one iteration whose kernels take ``kernel_s``."""
        ...

    def send_s(self, tokens: int) -> float:
        """Seconds to move ``tokens`` hidden states between two GPUs."""
        ...


@dataclass(frozen=True)
class LinearLatency:
    """Closed-form latency: ``fixed_ms + per_token_ms * tokens + per_ctx_ms * tokens * context``,
    divided by ``tp`` for the token-proportional parts.

    Attributes:
        fixed_ms: per-group fixed cost of one batch (ms), e.g. weight reads.
        per_token_ms: per-group cost per token in the batch (ms).
        per_ctx_ms: per-group cost per token per KV token it attends to (ms); attention only.
        overhead_ms: per-iteration framework overhead (ms), independent of the batch.
    """

    fixed_ms: Mapping[str, float]
    per_token_ms: Mapping[str, float]
    per_ctx_ms: Mapping[str, float] = field(default_factory=dict)
    overhead_ms: float = 0.0
    send_ms_per_token: float = 0.0

    def iteration_overhead_s(self, batch: int, tokens: int, tp: int, phase: str, kernel_s: float) -> float:
        return self.overhead_ms / 1000.0

    def send_s(self, tokens: int) -> float:
        return self.send_ms_per_token * tokens / 1000.0

    def group_s(self, group: str, tokens: int, context: int, batch: int, tp: int, phase: str) -> float:
        if group not in OPERATOR_GROUPS:
            raise KeyError(f"unknown operator group {group!r}; expected one of {OPERATOR_GROUPS}")
        ms = self.fixed_ms.get(group, 0.0) + (self.per_token_ms.get(group, 0.0) * tokens
                                              + self.per_ctx_ms.get(group, 0.0) * tokens * context) / tp
        return ms / 1000.0


def _grid(x: float) -> int:
    """Round a token count to a grid (exact up to 64, then 16 steps per power of two) so
    memoised profile answers are reused; at least 1."""
    x = max(float(x), 1.0)
    if x <= 64:
        return int(round(x))
    step = 1 << (int(math.floor(math.log2(x))) - 4)
    return int(round(x / step)) * step


class ProfileLatency:
    """Adapter from ``profiles.ProfileDB.group_latency`` (ms) to :class:`LatencyModel` (s).

    Answers are memoised on a grid of (tokens, context, batch) (16 steps per power of two)
    since controllers ask the same questions every interval.
    """

    def __init__(self, db: Any, gpu: str, model: str, cache_size: int = 65536) -> None:
        self.db, self.gpu, self.model = db, gpu, model
        self._cached = lru_cache(maxsize=cache_size)(self._query)
        self._send = lru_cache(maxsize=4096)(self._send_query)
        self._overhead = lru_cache(maxsize=65536)(self._overhead_query)
        from runtime.models import get_model

        cfg = get_model(model)
        self._token_bytes = cfg.d_model * cfg.dtype_bytes

    def _send_query(self, tokens: int) -> float:
        return float(self.db.send_recv_ms(self.gpu, tokens * self._token_bytes)) / 1000.0

    def send_s(self, tokens: int) -> float:
        """ProfileDB.send_recv_ms of ``tokens`` hidden states (seconds)."""
        return self._send(_grid(tokens))

    def _query(self, group: str, tokens: int, context: int, batch: int, tp: int, phase: str) -> float:
        return float(self.db.group_latency(group, self.gpu, self.model, tokens, context=context,
                                           batch=batch, tp=tp, phase=phase)) / 1000.0

    def group_s(self, group: str, tokens: int, context: int, batch: int, tp: int, phase: str) -> float:
        return self._cached(group, _grid(tokens), _grid(context), _grid(batch), int(tp), phase)

    def iteration_overhead_s(self, batch: int, tokens: int, tp: int, phase: str, kernel_s: float) -> float:
        """The calibrated per-iteration overhead of ``ProfileDB.iteration_overhead_ms`` (s)."""
        return self._overhead(_grid(batch), _grid(tokens), int(tp), phase, round(kernel_s * 1e4))

    def _overhead_query(self, batch: int, tokens: int, tp: int, phase: str, kernel_tenth_ms: int) -> float:
        return float(self.db.iteration_overhead_ms(self.gpu, self.model, tp, batch, tokens, phase,
                                                   kernel_ms=kernel_tenth_ms / 10.0)) / 1000.0


@dataclass
class ControllerContext:
    """Deployment facts a controller plans with.

    Attributes:
        model: model shape.
        slo: TTFT/TBT targets.
        latency: per-group latency model.
        gpu_memory_bytes: memory of one GPU (bytes).
        tp: tensor-parallel degree of whole-model instances.
        group_tp: tensor-parallel degree of each group's replicas when placed on their own
            (``dedicated``/``pack``); groups not named use ``tp``.
        interval_s: control interval of the environment (seconds).
        codec: codec limits (batch levels, replica bounds) that plans must respect.
        memory_util: share of GPU memory usable for weights + KV cache (0..1).
        default_prompt_tokens, default_output_tokens: request shape assumed before any
            request has been seen (tokens).
        kv_reserve_tokens: KV tokens an operator-level attention replica reserves per batch
            slot (0: it shares its free memory among its sequences by their context).
        prefill_chunk_tokens: most prompt tokens one iteration prefills (0: whole prompts).
    """

    model: ModelConfig
    slo: SLO
    latency: LatencyModel
    gpu_memory_bytes: int
    tp: int = 1
    group_tp: Mapping[str, int] = field(default_factory=dict)
    interval_s: float = 1.0
    codec: CodecConfig = field(default_factory=CodecConfig)
    memory_util: float = 0.9
    default_prompt_tokens: float = 1000.0
    default_output_tokens: float = 200.0
    kv_reserve_tokens: int = 0
    prefill_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        for name, t in [("tp", self.tp)] + [(f"group_tp[{g!r}]", t) for g, t in self.group_tp.items()]:
            if t not in (1, 2, 4, 8):
                raise ValueError(f"{name} must be 1, 2, 4 or 8, got {t}")
        unknown = set(self.group_tp) - set(OPERATOR_GROUPS)
        if unknown:
            raise ValueError(f"group_tp names unknown groups {sorted(unknown)}; expected {OPERATOR_GROUPS}")
        if self.gpu_memory_bytes <= 0:
            raise ValueError(f"gpu_memory_bytes must be > 0, got {self.gpu_memory_bytes}")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")

    def tp_of(self, group: str) -> int:
        """Tensor-parallel degree of ``group``'s own replicas."""
        return int(self.group_tp.get(group, self.tp))

    def model_step_s(self, batch: int, context: int, phase: str = "decode", tokens: int | None = None) -> float:
        """Seconds for one iteration of a whole-model instance: kernels of every group plus
        the latency model's per-iteration overhead."""
        t = batch if tokens is None else tokens
        kernels = sum(self.latency.group_s(g, t, context, batch, self.tp, phase) for g in OPERATOR_GROUPS)
        return kernels + self.latency.iteration_overhead_s(batch, t, self.tp, phase, kernels)

    def kv_capacity_tokens(self) -> int:
        """KV tokens one whole-model instance (``tp`` GPUs) holds besides its weights."""
        free = self.tp * self.gpu_memory_bytes * self.memory_util - self.model.weight_bytes
        return max(0, int(free // max(self.model.kv_bytes_per_token, 1)))
