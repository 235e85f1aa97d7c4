"""The published operator-level method: per-operator M/M/c queues, greedy (batch, replicas).

Each operator group is an M/M/c queue whose customers are decode batches (``max_batch``
sequences' token-steps) and prefills (one mean prompt). Service times come from the
latency model (profiles); waiting from Erlang C. A decode step passes through every
group, so the TBT estimate is the sum over groups of wait + decode service; a prompt
passes through every group once, so the TTFT estimate is the sum of wait + prefill
service. Both add the per-iteration serving overhead and the pool-to-pool transfers. A greedy planner starts every group at its cheapest stable (batch, replicas) and
repeatedly takes the change that removes the most SLO violation per GPU it costs, until
both estimates are within ``headroom`` x SLO. Replicas are placed ``pack`` (interference-
aware best fit on GPUs in use, done by the simulator or runtime).

Scale-up takes effect at once; the replicas set are the largest target of the last
``downscale_delay_s`` seconds, so scale-down waits out that window. A multiplicative margin on the planned rate grows
while the observed SLO is missed and decays back to 1 while it is met.

Units: seconds, requests per second, token-steps per second, bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from agents.context import ControllerContext
from agents.queueing import mmc_wait, mmc_wait_quantile
from agents.sizing import LoadEstimator
from runtime.control import ClusterState, Controller, OperatorPlan, Plan
from runtime.models import OPERATOR_GROUPS

#: Pool-to-pool transfers per layer when every group has its own replicas.
HOPS_PER_LAYER = 4


@dataclass
class OperatorQueueingConfig:
    """Knobs of the operator-queueing controller.

    Attributes:
        headroom: plan so that estimated TBT and TTFT stay within this share of the SLO.
        max_utilisation: busiest a group's replicas may be planned (0..1).
        wait_quantile: plan on this quantile of the Erlang-C wait (None: the mean wait).
        downscale_delay_s: a lower target must persist this long before replicas shrink (s).
        margin_up, margin_down, margin_max: growth per interval with an SLO miss, decay per
            interval without, and cap of the rate margin.
        max_iterations: bound on greedy steps per decision.
        batch_levels: batch limits considered; empty means the codec's levels.
    """

    headroom: float = 0.8
    max_utilisation: float = 0.85
    wait_quantile: float | None = None
    downscale_delay_s: float = 5.0
    margin_up: float = 1.15
    margin_down: float = 0.98
    margin_max: float = 2.0
    max_iterations: int = 100
    batch_levels: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 0.0 < self.headroom <= 1.0:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom}")
        if not 0.0 < self.max_utilisation < 1.0:
            raise ValueError(f"max_utilisation must be in (0, 1), got {self.max_utilisation}")


@dataclass(frozen=True)
class GroupLoad:
    """One group at one batch level: service times (s) and offered load (Erlangs)."""

    batch: int
    decode_s: float
    prefill_s: float
    arrivals: float  # customers (decode batches + prefills) per second
    offered: float  # Erlangs

    @property
    def service_rate(self) -> float:
        """Customers per second one replica serves (mean over decode and prefill)."""
        return self.arrivals / self.offered if self.offered > 0 else 1.0 / max(self.decode_s, 1e-12)


@dataclass
class QueueingPlan:
    """The greedy's answer and its latency estimates (seconds)."""

    batch: dict[str, int]
    replicas: dict[str, int]
    tbt_s: float
    ttft_s: float
    gpus: float
    feasible: bool


class OperatorQueueingController(Controller):
    """Per-operator M/M/c planning on profiled latencies, greedy replicas and batch."""

    name = "operator-queueing"

    def __init__(self, ctx: ControllerContext, config: OperatorQueueingConfig | None = None) -> None:
        self.ctx = ctx
        self.config = config or OperatorQueueingConfig()
        self.levels = tuple(sorted(self.config.batch_levels or ctx.codec.batch_levels))
        self.estimator = LoadEstimator(ctx)
        usable = ctx.gpu_memory_bytes * ctx.memory_util
        # GPUs one replica's weights take (memory is what a packed replica adds; its compute
        # is the group's work, which does not grow with replicas).
        self.replica_gpus = {g: max(ctx.model.group_weight_bytes(g) / usable, 1e-3) for g in OPERATOR_GROUPS}
        self.last: QueueingPlan | None = None
        self._prompt = max(1, int(round(ctx.default_prompt_tokens)))
        self._rate = 0.0
        self._output = float(ctx.default_output_tokens)
        self.reset()

    # ----------------------------------------------------------------- planning model
    def group_load(self, group: str, batch: int, rate: float, prompt: float, output: float) -> GroupLoad:
        """Service times and offered load of ``group`` at ``batch`` for ``rate`` req/s."""
        ctx = self.ctx
        p = max(1, int(round(prompt)))
        context = int(p + output / 2)
        tp = ctx.tp_of(group)
        dec = ctx.latency.group_s(group, batch, context, batch, tp, "decode")
        pre = ctx.latency.group_s(group, p, p, 1, tp, "prefill")
        batches = rate * output / batch
        return GroupLoad(batch, dec, pre, batches + rate, batches * dec + rate * pre)

    def wait_s(self, load: GroupLoad, replicas: int) -> float:
        """Waiting time of the group's queue with ``replicas`` servers (s)."""
        if load.arrivals <= 0:
            return 0.0
        mu = load.service_rate
        q = self.config.wait_quantile
        if q is None:
            return mmc_wait(load.arrivals, mu, replicas)
        return mmc_wait_quantile(load.arrivals, mu, replicas, q)

    def attn_slots(self, batch: int, context: float) -> float:
        """Sequences one attention replica at ``batch`` can hold (KV memory bound)."""
        ctx = self.ctx
        if ctx.kv_reserve_tokens > 0:
            return float(batch)
        tp = ctx.tp_of("attn")
        free = tp * ctx.gpu_memory_bytes * ctx.memory_util - ctx.model.group_weight_bytes("attn")
        return min(float(batch), free / max(ctx.model.kv_bytes_per_token, 1) / max(context, 1.0))

    def attn_batch_fits(self, batch: int, context: float) -> bool:
        """Whether one attention replica at ``batch`` fits GPU memory (weights + KV)."""
        ctx = self.ctx
        tp = ctx.tp_of("attn")
        per_seq = ctx.kv_reserve_tokens if ctx.kv_reserve_tokens > 0 else context
        need = ctx.model.group_weight_bytes("attn") + batch * per_seq * ctx.model.kv_bytes_per_token
        return need <= tp * ctx.gpu_memory_bytes * ctx.memory_util

    def min_replicas_for(self, load: GroupLoad, group: str, in_flight: float, context: float) -> int:
        """Fewest replicas that keep utilisation within bounds and, for attention, hold
        every sequence in flight (may exceed the codec's max_replicas: then the level is
        not feasible)."""
        c = self.ctx.codec
        n = max(c.min_replicas, math.ceil(load.offered / self.config.max_utilisation - 1e-9))
        if group == "attn" and in_flight > 0:
            n = max(n, math.ceil(in_flight / max(self.attn_slots(load.batch, context), 1e-9) - 1e-9))
        return int(n)

    def estimate(self, loads: dict[str, GroupLoad], replicas: dict[str, int]) -> tuple[float, float]:
        """(TBT p99, TTFT) estimates in seconds.

        A decode iteration passes every group: sum of wait (Erlang C) + decode service, plus
        the per-iteration serving overhead and the pool-to-pool transfers. The tail gap
        (TBT p99) is an iteration that also carries prefill chunks (:meth:`chunk_s`). A
        prompt needs ``ceil(prompt / chunk)`` such iterations after it is admitted; it
        waits for admission in an M/M/c queue whose servers are the attention batch slots
        and whose service time is a request's whole stay (prefill + output x TBT).
        """
        step = 0.0
        kern_dec = 0.0
        for g in OPERATOR_GROUPS:
            w = self.wait_s(loads[g], replicas[g])
            step += w + loads[g].decode_s
            kern_dec += loads[g].decode_s
        b = loads["attn"].batch
        lat, tp = self.ctx.latency, max(self.ctx.tp_of(g) for g in OPERATOR_GROUPS)
        step += lat.iteration_overhead_s(b, b, tp, "decode", kern_dec) + self.hop_s(b)
        tail = step + self.chunk_s(step, replicas)
        p = self._prompt
        chunk = min(p, self.ctx.prefill_chunk_tokens) if self.ctx.prefill_chunk_tokens > 0 else p
        prefill = math.ceil(p / chunk) * tail
        stay = prefill + self._output * step
        slots = max(1, int(replicas["attn"] * self.attn_slots(b, p + self._output / 2)))
        if not math.isfinite(stay):
            return math.inf, math.inf
        admit = mmc_wait(self._rate, 1.0 / max(stay, 1e-9), slots) if self._rate > 0 else 0.0
        return tail, admit + prefill

    def chunk_s(self, step_s: float, replicas: dict[str, int]) -> float:
        """Extra time of a decode iteration that also carries prefill chunks (seconds).

        With chunked prefill a token's gap at the tail (p99) is an iteration that carries a
        chunk of ``min(prompt, prefill_chunk_tokens)`` tokens on its attention replica,
        while the shared pools also serve the chunks of the other replicas prefilling in
        the same iteration (``rate x chunks per prompt x step`` of them, at least one).
        """
        ctx = self.ctx
        p = self._prompt
        chunk = min(p, ctx.prefill_chunk_tokens) if ctx.prefill_chunk_tokens > 0 else p
        chunks_per_prompt = math.ceil(p / chunk)
        concurrent = min(max(1.0, self._rate * chunks_per_prompt * step_s), float(replicas["attn"]))
        out = ctx.latency.group_s("attn", chunk, p, 1, ctx.tp_of("attn"), "prefill")
        for g in OPERATOR_GROUPS:
            if g == "attn":
                continue
            tokens = int(math.ceil(chunk * max(1.0, concurrent / max(replicas[g], 1))))
            out += ctx.latency.group_s(g, tokens, 0, 1, ctx.tp_of(g), "prefill")
        return out

    def hop_s(self, tokens: int) -> float:
        """Transfers of one step between pools on different GPUs: per layer QKV -> attention
        -> O projection -> MLP -> next layer (4 hops), plus embedding and LM head (seconds)."""
        return (HOPS_PER_LAYER * self.ctx.model.n_layers + 2) * self.ctx.latency.send_s(tokens)

    def plan_for(self, rate: float, prompt: float, output: float) -> QueueingPlan:
        """Greedy (batch, replicas) per group for ``rate`` req/s of the given shape.

        Sequences in flight follow Little's law, ``rate x (TTFT + output x TBT)``; the
        first pass assumes TBT and TTFT at their targets, the second uses the first
        pass's estimates, and the attention pool must hold their KV cache.
        """
        ctx = self.ctx
        self._prompt = max(1, int(round(prompt)))
        self._output = max(1.0, float(output))
        self._rate = rate
        tbt, ttft = self.config.headroom * ctx.slo.tbt_s, self.config.headroom * ctx.slo.ttft_s
        qp = self._greedy(rate, prompt, output, rate * (ttft + output * tbt))
        if qp.feasible:
            qp = self._greedy(rate, prompt, output, rate * (qp.ttft_s + output * qp.tbt_s))
        return qp

    def _greedy(self, rate: float, prompt: float, output: float, in_flight: float) -> QueueingPlan:
        ctx, cfg = self.ctx, self.config
        slo_tbt, slo_ttft = cfg.headroom * ctx.slo.tbt_s, cfg.headroom * ctx.slo.ttft_s
        context = prompt + output / 2
        levels = {g: self.levels for g in OPERATOR_GROUPS}
        # An attention replica must hold the KV of the batch it runs.
        levels["attn"] = tuple(b for b in self.levels if self.attn_batch_fits(b, context)) or self.levels[:1]
        table = {g: {b: self.group_load(g, b, rate, prompt, output) for b in levels[g]} for g in OPERATOR_GROUPS}
        floor = {g: {b: self.min_replicas_for(table[g][b], g, in_flight, context) for b in levels[g]}
                 for g in OPERATOR_GROUPS}

        usable = ctx.gpu_memory_bytes * ctx.memory_util
        per_seq = ctx.kv_reserve_tokens if ctx.kv_reserve_tokens > 0 else context
        kv_gpus = {b: b * per_seq * ctx.model.kv_bytes_per_token / usable for b in self.levels}

        def cost(g: str, b: int, n: int) -> float:
            # GPUs: memory of the replicas' weights (all shards; attention adds the KV of its
            # batch slots) plus the busy share of the group's work (a busy replica occupies
            # its tp GPUs).
            mem = self.replica_gpus[g] + (kv_gpus[b] if g == "attn" else 0.0)
            return n * mem + ctx.tp_of(g) * table[g][b].offered

        batch: dict[str, int] = {}
        reps: dict[str, int] = {}
        cap = ctx.codec.max_replicas
        for g in OPERATOR_GROUPS:
            b = min(levels[g], key=lambda lv: (floor[g][lv] > cap, cost(g, lv, floor[g][lv]), table[g][lv].decode_s))
            batch[g], reps[g] = b, min(floor[g][b], cap)

        def violation(rp: dict[str, int], bt: dict[str, int]) -> float:
            tbt, ttft = self.estimate({g: table[g][bt[g]] for g in OPERATOR_GROUPS}, rp)
            return max(0.0, tbt - slo_tbt) / slo_tbt + max(0.0, ttft - slo_ttft) / slo_ttft

        v = violation(reps, batch)
        for _ in range(cfg.max_iterations):
            if v <= 0.0:
                break
            best: tuple[float, dict[str, int], dict[str, int], float] | None = None
            for g in OPERATOR_GROUPS:
                here = cost(g, batch[g], reps[g])
                moves = []
                if reps[g] < ctx.codec.max_replicas:
                    moves.append((batch[g], reps[g] + 1))
                for b in levels[g]:
                    if b != batch[g] and floor[g][b] <= cap:
                        moves.append((b, max(floor[g][b], reps[g])))
                for b, n in moves:
                    nb, nr = dict(batch), dict(reps)
                    nb[g], nr[g] = b, n
                    nv = violation(nr, nb)
                    gain = v - nv
                    if gain <= 1e-12:
                        continue
                    score = gain / max(cost(g, b, n) - here, 1e-3)
                    if best is None or score > best[0]:
                        best = (score, nb, nr, nv)
            if best is None:
                break
            _, batch, reps, v = best
        loads = {g: table[g][batch[g]] for g in OPERATOR_GROUPS}
        tbt, ttft = self.estimate(loads, reps)
        gpus = sum(cost(g, batch[g], reps[g]) for g in OPERATOR_GROUPS)
        return QueueingPlan(batch, reps, tbt, ttft, gpus, v <= 0.0)

    # ----------------------------------------------------------------- control loop
    def reset(self, state: ClusterState | None = None) -> None:
        self.estimator.reset()
        self.margin = 1.0
        self._targets: list[tuple[float, dict[str, int]]] = []
        self.last = None

    def decide(self, state: ClusterState) -> Plan:
        ctx, cfg = self.ctx, self.config
        ctx.slo = slo = state.slo  # the targets in force
        if len(state.request_rate_history) == 0:
            return state.plan  # nothing observed yet: keep the plan in force
        missed = (state.ttft_p99_s > slo.ttft_s or state.tbt_p99_s > slo.tbt_s
                  or state.slo_attainment < slo.attainment_target)
        self.margin = min(cfg.margin_max, self.margin * cfg.margin_up) if missed else max(1.0, self.margin * cfg.margin_down)
        load = self.estimator.update(state)
        qp = self.plan_for(load.rate * self.margin, load.prompt_tokens, load.output_tokens)
        self.last = qp
        now = state.time_s
        self._targets = [(t, r) for t, r in self._targets if now - t < cfg.downscale_delay_s - 1e-9]
        self._targets.append((now, qp.replicas))
        # Up at once; down only to the largest target of the last downscale_delay_s.
        out = {g: max(r[g] for _, r in self._targets) for g in OPERATOR_GROUPS}
        return Plan({g: OperatorPlan(max(ctx.codec.min_replicas, out[g]), qp.batch[g], "pack", ctx.tp_of(g))
                     for g in OPERATOR_GROUPS})
