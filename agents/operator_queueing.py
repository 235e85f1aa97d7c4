"""The published operator-level method: per-operator M/M/c queues on profiled service times,
greedy (replicas, batch) per group, interference-aware best-fit (``pack``) placement.

The planning model (:class:`PlanModel`) is calibrated to the iteration model the simulator
uses (docs/SIMULATOR.md, "Step model"), computed from the same latency model (profiles):

* **Service times.** One iteration of an attention replica (a *unit*: it holds its
  sequences' KV) passes, per layer, QKV projection -> attention -> O projection -> MLP.
  With every group on its own pool that is a ring of 4 stages and 4 hops; with ``m``
  micro-batches a layer takes ``max(m x slowest stage, sum of stages and hops)``, stage
  times at the micro-batch size; with ``micro_batching: adaptive`` (the simulator's default)
  each iteration takes the fastest m in 1..micro_batches. A stateless pool of ``c`` replicas serves the concurrent
  micro-batches of all units merged: per replica ``total tokens / c`` tokens in calls of
  at most ``max_batch`` sequences. Embedding and LM head run once per step, one hop away.
  The latency model's per-iteration overhead is added once.
* **Waits.** The attention pool is an M/M/c queue with ``c`` = attention replicas whose
  customers are prompts (service = their chunked prefill, ``ceil(prompt / chunk)`` mixed
  iterations); its Erlang-C waiting-time quantile plus the tail prompt's prefill is the
  TTFT estimate. Requests also wait for a batch slot: an M/M/c queue whose servers are the
  attention batch slots and whose service is a request's whole stay. For the stateless
  pools the wait is either the merged-batch stretch the simulator models (``pool_wait:
  merged``, default) or an Erlang-C wait per pool with ``c`` = its replicas (``erlang``).
* **TBT.** The p99 gap is a full-chunk mixed iteration at the binomial p99 of units
  prefilling at once when more than 1 % of iterations carry a chunk; a request's mean TPOT
  tail mixes decode-only and mixed iterations by its output length.
* **Placement.** Plans are costed by the GPUs an interference-aware best fit needs (the
  simulator's ``pack`` rule: largest replicas first, least free memory first, ties to GPUs
  already hosting the group); co-located groups slow each other by
  ``1 + contention x peer busy share`` (the same contention assumption).
* **Greedy.** From the utilisation floors (every pool's unmerged work within
  ``max_utilisation``, attention slots for the sequences in flight) it adds the replica,
  or changes the attention batch, with the largest SLO-violation reduction per GPU of
  memory it costs, until the TTFT and TBT estimates are within ``headroom`` x SLO and
  every load factor (prefill servers, batch slots) is within ``max_utilisation``. The
  attention batch is chosen by running the greedy at each level and keeping the plan on
  the fewest GPUs; once running, the batch in force is kept (a new batch limit replaces
  every attention replica).

The planned rate is the load estimate, or, with ``peak_window_s``, the highest
``peak_smooth_s``-mean arrival rate of the last ``peak_window_s`` (bursts end before a new
MLP replica has loaded), never below ``min_rate_rps``. Scale-up takes effect at once; the
replicas set are the largest target of the last ``downscale_delay_s`` seconds. A
multiplicative margin on the planned rate grows while the observed SLO is missed and
decays back to 1 while it is met; requests queued for admission add
``queued / queue_drain_s`` to the planned rate.

Units: seconds, requests per second, tokens, bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from agents.context import ControllerContext
from agents.queueing import mmc_wait, mmc_wait_quantile
from agents.sizing import LoadEstimator
from runtime.colocation import co_residence
from runtime.control import ClusterState, Controller, OperatorPlan, Plan
from runtime.models import OPERATOR_GROUPS

#: Pool-to-pool transfers per layer when every group has its own replicas
#: (QKV -> attention -> O projection -> MLP -> next layer's QKV).
HOPS_PER_LAYER = 4
#: Stateless pools (everything but attention).
POOLS = tuple(g for g in OPERATOR_GROUPS if g != "attn")
#: Least GPU cost charged for a greedy move (a tiny replica is not free: it may open a GPU).
MIN_MOVE_GPUS = 0.05
#: Least violation reduction (relative) a greedy move must bring.
MIN_REL_GAIN = 1e-3
#: Rounds of the damped fixed point of :meth:`PlanModel.predict`.
ROUNDS = 12
#: z-score of the 99th percentile of a normal (binomial tails).
Z99 = 2.326


@dataclass
class OperatorQueueingConfig:
    """Knobs of the operator-queueing controller.

    Attributes:
        headroom: plan so that the TTFT and TBT estimates stay within this share of the SLO.
        tbt_headroom: share of the TBT SLO the TBT estimate may use (None: ``headroom``).
        max_utilisation: busiest a pool's replicas may be planned (0..1).
        wait_quantile: quantile of the Erlang-C prefill wait added to the tail prompt's
            prefill in the TTFT estimate (None: the mean wait).
        tail_prompt_tokens: prompt length whose TTFT is planned (tokens; None: the
            model's context length, the longest prompt it serves).
        pool_wait: ``merged`` (stateless pools batch concurrent work, as the simulator
            does) or ``erlang`` (add an M/M/c wait per pool, c = replicas).
        micro_batches: micro-batches ping-ponging between pools (the scenario's).
        micro_batching: ``adaptive`` (each iteration at the count in 1..micro_batches that
            finishes it soonest, ties to fewer) or ``fixed`` (the scenario's).
        micro_batch_slack: with ``adaptive``, the fewest micro-batches within ``1 + slack``
            of the fastest count's time (the scenario's).
        pool_dispatch: ``spread`` or ``fill`` (decode-only calls to a stateless pool on the
            fewest replicas, in parts of at most ``pool_batch`` sequences; the scenario's).
        contention: slowdown per unit of co-located busy share (the scenario's).
        downscale_delay_s: a lower target must persist this long before replicas shrink (s).
        margin_up, margin_down, margin_max: growth per interval with an SLO miss, decay per
            interval without, and cap of the rate margin.
        queue_drain_s: requests waiting for admission are planned to drain in this time
            (s); 0 ignores the queue.
        peak_window_s: plan for the highest arrival rate of the last ``peak_window_s``
            seconds (bursts end before a new MLP replica has loaded its weights); 0 plans
            for the current estimate only.
        peak_smooth_s: the rates compared over that window are means over this many
            seconds (s).
        min_rate_rps: the planned rate never drops below this (req/s): a floor sized on the
            training split, as an autoscaler's minimum replicas are (0: none).
        pool_batch: ``max_batch`` of the stateless pools (sequences per call).
        attn_batch: attention ``max_batch`` the running controller keeps (None: the
            greedy's choice at the first decision, kept from then on, since a new batch
            limit replaces every attention replica).
        max_gpus: GPUs the greedy may use (a fixed budget; None: the codec's limit only).
        max_iterations: bound on greedy steps per decision.
        batch_levels: attention batch limits considered; empty means the codec's levels.
    """

    headroom: float = 0.8
    tbt_headroom: float | None = None
    max_utilisation: float = 0.85
    wait_quantile: float | None = 0.99
    tail_prompt_tokens: int | None = None
    pool_wait: str = "merged"
    micro_batches: int = 2
    micro_batching: str = "adaptive"
    micro_batch_slack: float = 0.0
    pool_dispatch: str = "spread"
    contention: float = 0.5
    downscale_delay_s: float = 5.0
    margin_up: float = 1.15
    margin_down: float = 0.98
    margin_max: float = 2.0
    queue_drain_s: float = 0.0
    peak_window_s: float = 0.0
    peak_smooth_s: float = 10.0
    min_rate_rps: float = 0.0
    pool_batch: int = 256
    attn_batch: int | None = None
    max_gpus: int | None = None
    max_iterations: int = 200
    batch_levels: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 0.0 < self.headroom <= 1.0:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom}")
        if self.tbt_headroom is not None and not 0.0 < self.tbt_headroom <= 1.0:
            raise ValueError(f"tbt_headroom must be in (0, 1], got {self.tbt_headroom}")
        if not 0.0 < self.max_utilisation < 1.0:
            raise ValueError(f"max_utilisation must be in (0, 1), got {self.max_utilisation}")
        if self.wait_quantile is not None and not 0.0 < self.wait_quantile < 1.0:
            raise ValueError(f"wait_quantile must be in (0, 1) or None, got {self.wait_quantile}")
        if self.pool_wait not in ("merged", "erlang"):
            raise ValueError(f"pool_wait must be 'merged' or 'erlang', got {self.pool_wait!r}")
        if self.pool_dispatch not in ("spread", "fill"):
            raise ValueError(f"pool_dispatch must be 'spread' or 'fill', got {self.pool_dispatch!r}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.micro_batching not in ("adaptive", "fixed"):
            raise ValueError(f"micro_batching must be 'adaptive' or 'fixed', got {self.micro_batching!r}")
        if self.contention < 0:
            raise ValueError(f"contention must be >= 0, got {self.contention}")
        if self.pool_batch < 1:
            raise ValueError(f"pool_batch must be >= 1, got {self.pool_batch}")
        self.batch_levels = tuple(int(b) for b in self.batch_levels)


@dataclass(frozen=True)
class GroupLoad:
    """One group at one batch level without co-location: service times (s) and offered
    load (Erlangs) of its work when it runs unmerged (the utilisation floor)."""

    batch: int
    decode_s: float
    prefill_s: float
    arrivals: float  # customers (decode batches + prefills) per second
    offered: float  # Erlangs

    @property
    def service_rate(self) -> float:
        """Customers per second one replica serves (mean over decode and prefill)."""
        return self.arrivals / self.offered if self.offered > 0 else 1.0 / max(self.decode_s, 1e-12)


@dataclass(frozen=True)
class Packing:
    """Best-fit placement of a plan's replicas: GPUs used and, per group, the co-resident
    shards per shard of it, by group (its own entry: its other replicas on the same GPU;
    runtime/colocation.py)."""

    gpus: int
    peers: dict[str, dict[str, float]]


@dataclass(frozen=True)
class Prediction:
    """What :class:`PlanModel` predicts for one plan at one load (seconds unless noted).

    Attributes:
        decode_s, mixed_s: decode-only iteration and mean chunk-carrying iteration of a unit.
        mixed_tail_s: a full-chunk iteration with the p99 number of units prefilling at once.
        decoding: sequences decoding per unit; chunk_share: share of a unit's iterations
            that carry a prefill chunk (its prefill server's utilisation).
        prefill_s: mean prompt's chunked prefill; wait_s: Erlang-C prefill wait (quantile).
        admit_s: mean wait for a batch slot.
        ttft_s, tbt_s, tpot_s: TTFT estimate (tail prompt), p99 gap, tail of a request's mean TPOT.
        util: busy share per group (0..1); gpus: GPUs of the packed plan.
        stable: every queue has spare capacity and the KV in flight fits.
        rho: the highest load factor (prefill server utilisation, decoding sequences over
            batch slots, pool Erlangs over replicas); >= 1 means unstable.
    """

    decode_s: float
    mixed_s: float
    mixed_tail_s: float
    decoding: float
    chunk_share: float
    prefill_s: float
    wait_s: float
    admit_s: float
    ttft_s: float
    tbt_s: float
    tpot_s: float
    util: dict[str, float]
    gpus: int
    stable: bool
    rho: float = 0.0


@dataclass
class QueueingPlan:
    """The greedy's answer and its latency estimates (seconds)."""

    batch: dict[str, int]
    replicas: dict[str, int]
    tbt_s: float
    ttft_s: float
    gpus: float
    feasible: bool
    prediction: Prediction | None = None


class PlanModel:
    """Latency of an all-``pack`` operator-level plan at a given load (see module docstring).

    Args:
        ctx: the deployment (model shape, latency model, memory, tp per group, chunk size).
        config: micro-batches, contention, pool wait model, quantiles.
    """

    def __init__(self, ctx: ControllerContext, config: OperatorQueueingConfig) -> None:
        self.ctx, self.cfg = ctx, config
        m = ctx.model
        self.layers = m.n_layers
        q = m.qkv_out * m.d_model
        o = m.n_heads * m.head_dim * m.d_model
        self.qkv_frac = q / (q + o)
        self.cap_bytes = ctx.gpu_memory_bytes * ctx.memory_util
        self.chunk = int(ctx.prefill_chunk_tokens)
        self.tp = {g: ctx.tp_of(g) for g in OPERATOR_GROUPS}
        self._pack_memo: dict[tuple, Packing] = {}
        #: micro-batch counts an iteration may run as (the fastest is taken, ties to fewer)
        M = config.micro_batches
        self.m_choices = tuple(range(1, M + 1)) if config.micro_batching == "adaptive" else (M,)

    # ------------------------------------------------------------------ memory and placement
    def replica_bytes_per_gpu(self, group: str, batch: int, context: float = 0.0) -> float:
        """Bytes one GPU of a ``group`` replica holds: weights / tp, double-buffered
        activations of ``batch + chunk`` tokens, and for attention its KV reservation
        (``kv_reserve_tokens`` per batch slot, or ``context`` per slot when 0)."""
        m, tp = self.ctx.model, self.tp[group]
        width = {"mlp": 2 * m.d_ff / tp, "proj": m.qkv_out / tp, "head": m.vocab_size / tp}.get(group, m.d_model)
        need = m.group_weight_bytes(group) / tp + 2.0 * (batch + self.chunk) * max(width, m.d_model) * m.dtype_bytes
        if group == "attn":
            per_seq = self.ctx.kv_reserve_tokens if self.ctx.kv_reserve_tokens > 0 else context
            need += batch * per_seq * m.kv_bytes_per_token / tp
        return need

    def pack(self, replicas: dict[str, int], batch: dict[str, int], context: float = 0.0) -> Packing:
        """Interference-aware best fit: replicas in decreasing size, each shard onto the GPU
        with the least free memory that holds it (ties: GPUs already hosting the group), a
        new GPU only when none has room."""
        key = (tuple(replicas[g] for g in OPERATOR_GROUPS), tuple(batch[g] for g in OPERATOR_GROUPS),
               round(context, -1) if self.ctx.kv_reserve_tokens <= 0 else 0)
        hit = self._pack_memo.get(key)
        if hit is not None:
            return hit
        cap = self.cap_bytes
        need = {g: self.replica_bytes_per_gpu(g, batch[g], context) for g in OPERATOR_GROUPS}
        gpus: list[list] = []  # [used bytes, {group: shards}]
        for g in sorted(OPERATOR_GROUPS, key=lambda h: -need[h]):
            for _ in range(replicas[g]):
                left = self.tp[g]
                cands = sorted((x for x in gpus if cap - x[0] >= need[g]), key=lambda x: (cap - x[0], -x[1].get(g, 0)))
                for x in cands[:left]:
                    x[0] += need[g]
                    x[1][g] = x[1].get(g, 0) + 1
                    left -= 1
                for _ in range(left):
                    gpus.append([need[g], {g: 1}])
        peers = co_residence((1, x[1]) for x in gpus)
        out = Packing(len(gpus), {g: peers.get(g, {}) for g in OPERATOR_GROUPS})
        if len(self._pack_memo) > 20000:
            self._pack_memo.clear()
        self._pack_memo[key] = out
        return out

    # ------------------------------------------------------------------ one iteration
    def iteration(self, replicas: dict[str, int], batch: dict[str, int], n_dec: float, ctx_dec: float,
                  p_tok: float, ctx_pre: float, n_pre: float, tot_tokens: float, tot_seqs: float,
                  slow: dict[str, float]) -> tuple[float, dict[str, float]]:
        """Seconds of one iteration of a unit and each group's busy share of it.

        Args:
            n_dec, ctx_dec: decoding sequences of the unit and their mean KV length (tokens).
            p_tok, ctx_pre, n_pre: prompt tokens prefilled this iteration, the prompt length
                of the sequences being prefilled, their number.
            tot_tokens, tot_seqs: tokens and sequences of this iteration summed over the units
                whose micro-batches the stateless pools merge.
            slow: contention slowdown per group (1 = none).
        """
        lat, L = self.ctx.latency, self.layers
        tokens = n_dec + p_tok
        if tokens <= 0:
            return 0.0, {}
        tot_tokens, tot_seqs = max(tot_tokens, tokens), max(tot_seqs, n_dec + n_pre)
        fill = self.cfg.pool_dispatch == "fill"

        def layers(m: int) -> tuple[float, dict[str, float]]:
            """(seconds of all layers, busy seconds per group) cut into ``m`` micro-batches."""
            def pool_s(g: str) -> tuple[float, float]:
                """(seconds of the pool's stage, busy share of it per replica)."""
                r = max(replicas[g], 1)
                k = r
                if fill and tot_tokens <= tot_seqs and tot_seqs < r * batch[g]:  # the engine's pool_dispatch
                    k = min(r, max(1, math.ceil(tot_seqs / batch[g])))
                calls = max(1.0, tot_seqs / k / batch[g])
                per_call = tot_tokens / k / calls / m
                return lat.group_s(g, max(1, int(round(per_call))), 0, 1, self.tp[g], "decode") * calls, k / r

            attn = 0.0
            if n_dec > 0:
                b = max(1, int(round(n_dec / m)))
                attn += lat.group_s("attn", b, int(ctx_dec), b, self.tp["attn"], "decode")
            if p_tok > 0:
                attn += lat.group_s("attn", max(1, int(round(p_tok / m))), int(ctx_pre), max(1, int(round(n_pre / m))),
                                    self.tp["attn"], "prefill")
            (proj, proj_share), (mlp, mlp_share) = pool_s("proj"), pool_s("mlp")
            stages = [self.qkv_frac * proj / L * slow["proj"], attn / L * slow["attn"],
                      (1 - self.qkv_frac) * proj / L * slow["proj"], mlp / L * slow["mlp"]]
            hop = lat.send_s(max(1, int(round(tokens / m))))
            ring = stages + [hop] * HOPS_PER_LAYER
            busy = {"attn": stages[1] * m * L, "proj": (stages[0] + stages[2]) * m * L * proj_share,
                    "mlp": stages[3] * m * L * mlp_share}
            return L * max(m * max(ring), sum(ring)), busy

        timed = [layers(m) for m in self.m_choices]
        total, busy = min(timed, key=lambda r: r[0])
        if self.cfg.micro_batch_slack > 0:  # the engine's rule: fewest micro-batches within the slack
            total, busy = next(r for r in timed if r[0] <= total * (1.0 + self.cfg.micro_batch_slack))
        r_e, r_h = max(replicas["embed"], 1), max(replicas["head"], 1)
        emb = lat.group_s("embed", max(1, int(round(tot_tokens / r_e))), 0, 1, self.tp["embed"], "decode") * slow["embed"]
        head = lat.group_s("head", max(1, int(round(tot_seqs / r_h))), 0, 1, self.tp["head"], "decode") * slow["head"]
        total += emb + head + lat.send_s(max(1, int(round(tokens)))) + lat.send_s(max(1, int(round(n_dec + n_pre))))
        busy["embed"], busy["head"] = emb, head
        kernel = total
        tp = max(self.tp.values())
        if n_dec > 0:
            n = max(1, int(round(n_dec)))
            step = kernel + lat.iteration_overhead_s(n, n, tp, "decode", kernel)
            step += self._prefill_extra(kernel * p_tok / tokens, tp)
        else:
            step = kernel + lat.iteration_overhead_s(1, max(1, int(round(p_tok))), tp, "prefill", kernel)
        return step, {g: min(b / step, 1.0) for g, b in busy.items()}

    def _prefill_extra(self, prefill_kernel_s: float, tp: int) -> float:
        """What the prefill share of a mixed iteration adds beyond the decode overhead (s):
        the latency model's prefill overhead less its floor gap (max(floor - kernel, 0))."""
        if prefill_kernel_s <= 0:
            return 0.0
        lat = self.ctx.latency
        floor_gap0 = lat.iteration_overhead_s(1, 1, tp, "prefill", 0.0)  # floor + prefill base
        ov = lat.iteration_overhead_s(1, 1, tp, "prefill", prefill_kernel_s)
        return max(ov - max(floor_gap0 - prefill_kernel_s, 0.0), 0.0)

    def slowdown(self, packing: Packing, util: dict[str, float]) -> dict[str, float]:
        """Contention factor per group from the busy share of its co-residents."""
        c = self.cfg.contention
        return {g: 1.0 + c * sum(s * min(max(util.get(o, 0.0), 0.0), 1.0) for o, s in packing.peers[g].items())
                for g in OPERATOR_GROUPS}

    # ------------------------------------------------------------------ steady state of a plan
    def predict(self, replicas: dict[str, int], batch: dict[str, int], rate: float, prompt: float,
                output: float, tail_prompt: float | None = None) -> Prediction:
        """Steady state of a plan at ``rate`` req/s of mean ``prompt`` / ``output`` tokens.

        Per unit (``rate / units`` req/s): decoding sequences follow Little's law
        (``rate x output x mean iteration``), a share ``rate x chunks x iteration`` of the
        iterations carries a chunk, and the pools merge all units' micro-batches. Solved by
        fixed-point iteration (8 rounds, contention from the previous round's busy shares).
        """
        cfg = self.cfg
        a = max(replicas["attn"], 1)
        B = batch["attn"]
        P, O = max(float(prompt), 1.0), max(float(output), 1.0)
        tail = float(tail_prompt if tail_prompt is not None else P)
        C = self.chunk if self.chunk > 0 else int(P)
        k_mean = max(1, math.ceil(P / C))
        c_mean = P / k_mean
        ctx_dec = P + O / 2
        lam_u = rate / a
        packing = self.pack(replicas, batch, ctx_dec)
        util: dict[str, float] = {}
        slow = {g: 1.0 for g in OPERATOR_GROUPS}
        n_dec = f = 0.0
        t_d, _ = self.iteration(replicas, batch, 1.0, ctx_dec, 0, 0, 0, a, a, slow)
        t_m = t_bar = t_d
        for _ in range(ROUNDS):
            n_dec = min(float(B), lam_u * O * t_bar)
            f = min(1.0, lam_u * k_mean * t_m)
            conc = 1.0 + (a - 1) * f  # units carrying a chunk in the same iteration (mean)
            nd, ud = self.iteration(replicas, batch, max(n_dec, 1.0), ctx_dec, 0, 0, 0, a * max(n_dec, 1.0),
                                    a * max(n_dec, 1.0), slow)
            nm, um = self.iteration(replicas, batch, n_dec, ctx_dec, c_mean, P, 1, a * n_dec + conc * c_mean,
                                    a * n_dec + conc, slow)
            # damped: an overloaded plan oscillates between saturated and idle otherwise
            t_d, t_m = 0.5 * (t_d + nd), 0.5 * (t_m + nm)
            t_bar = (1 - f) * t_d + f * t_m
            util = {g: (1 - f) * ud.get(g, 0.0) + f * um.get(g, 0.0) for g in OPERATOR_GROUPS}
            slow = self.slowdown(packing, util)
        # tail: a full chunk while the p99 number of units prefill at once
        conc99 = min(float(a), 1.0 + (a - 1) * f + Z99 * math.sqrt(max((a - 1) * f * (1 - f), 0.0)))
        full = min(C, tail)
        t_tail, _ = self.iteration(replicas, batch, n_dec, ctx_dec, full, tail, 1, a * n_dec + conc99 * full,
                                   a * n_dec + conc99, slow)
        # pools as M/M/c queues (optional): customers = micro-batch calls of all units
        pool_wait = 0.0
        rho = max(lam_u * k_mean * t_m, lam_u * O * t_bar / B)
        stable = rho < 1.0
        if cfg.pool_wait == "erlang":
            for g in POOLS:
                u = util.get(g, 0.0)
                if u <= 0:
                    continue
                c = max(replicas[g], 1)
                offered = u * a  # Erlangs: each unit keeps the group busy for u of its time
                rho = max(rho, offered / c)
                if offered >= c:
                    stable = False
                    continue
                calls = (1.0 / max(t_bar, 1e-9)) * a * cfg.micro_batches * (self.layers if g in ("proj", "mlp") else 1)
                pool_wait += mmc_wait(calls, calls / offered, c) * (self.layers if g in ("proj", "mlp") else 1)
            t_d, t_m, t_tail, t_bar = t_d + pool_wait, t_m + pool_wait, t_tail + pool_wait, t_bar + pool_wait
        # attention pool: prompts are the customers of an M/M/c queue with c = units
        k_tail = max(1, math.ceil(tail / C))
        service = k_mean * t_m
        rho = max(rho, rate * service / a)
        if rate * service >= a:
            stable = False
            wait = math.inf
        elif rate <= 0:
            wait = 0.0
        elif cfg.wait_quantile is None:
            wait = mmc_wait(rate, 1.0 / service, a)
        else:
            wait = mmc_wait_quantile(rate, 1.0 / service, a, cfg.wait_quantile)
        # admission: a request holds a batch slot for its whole stay
        per_seq = self.ctx.kv_reserve_tokens if self.ctx.kv_reserve_tokens > 0 else P + O
        slots = a * B
        if self.ctx.kv_reserve_tokens <= 0:
            kv_free = self.cap_bytes * self.tp["attn"] - self.ctx.model.group_weight_bytes("attn")
            slots = a * min(B, int(kv_free / max(self.ctx.model.kv_bytes_per_token * per_seq, 1)))
        stay = service + O * t_bar
        if slots >= 1 and math.isfinite(stay):
            rho = max(rho, rate * stay / slots)
        admit = mmc_wait(rate, 1.0 / stay, slots) if rate > 0 and slots >= 1 and math.isfinite(stay) else 0.0
        if not math.isfinite(admit):
            stable = False
        ttft = wait + admit + k_tail * t_tail
        gap99 = t_tail if f > 0.01 else t_d
        mixed_share = min(1.0, f + Z99 * math.sqrt(max(f * (1 - f), 0.0) / max(O / 2, 1.0)))
        tpot = t_d + (t_tail - t_d) * mixed_share
        return Prediction(t_d, t_m, t_tail, n_dec, f, service, wait, admit, ttft, gap99, tpot, util,
                          packing.gpus, stable, rho)


class OperatorQueueingController(Controller):
    """Per-operator M/M/c planning on profiled latencies, greedy replicas and batch."""

    name = "operator-queueing"

    def __init__(self, ctx: ControllerContext, config: OperatorQueueingConfig | None = None) -> None:
        self.ctx = ctx
        self.config = config or OperatorQueueingConfig()
        self.levels = tuple(sorted(self.config.batch_levels or ctx.codec.batch_levels))
        self.model = PlanModel(ctx, self.config)
        self.estimator = LoadEstimator(ctx)
        self.last: QueueingPlan | None = None
        self._memo: dict[tuple, QueueingPlan] = {}
        self.reset()

    # ----------------------------------------------------------------- planning model
    def group_load(self, group: str, batch: int, rate: float, prompt: float, output: float) -> GroupLoad:
        """Service times and offered load (Erlangs) of ``group`` at ``batch`` for ``rate``
        req/s when its work runs unmerged: decode batches of ``batch`` sequences plus one
        prefill per request. Floors the replicas the greedy starts from."""
        ctx = self.ctx
        p = max(1, int(round(prompt)))
        context = int(p + output / 2)
        tp = ctx.tp_of(group)
        dec = ctx.latency.group_s(group, batch, context, batch, tp, "decode")
        pre = ctx.latency.group_s(group, p, p, 1, tp, "prefill")
        batches = rate * output / batch
        return GroupLoad(batch, dec, pre, batches + rate, batches * dec + rate * pre)

    def attn_batch_fits(self, batch: int, context: float) -> bool:
        """Whether one attention replica at ``batch`` fits GPU memory (weights + KV)."""
        return self.model.replica_bytes_per_gpu("attn", batch, context) <= self.model.cap_bytes

    def min_replicas_for(self, load: GroupLoad) -> int:
        """Fewest replicas that keep the unmerged utilisation within ``max_utilisation``."""
        return max(self.ctx.codec.min_replicas, math.ceil(load.offered / self.config.max_utilisation - 1e-9))

    def tail_prompt(self, prompt: float) -> float:
        """Prompt length the TTFT estimate plans for (tokens)."""
        t = self.config.tail_prompt_tokens
        if t is None:
            t = self.ctx.model.max_seq_len
        return float(max(t, prompt))

    def violation(self, pred: Prediction) -> float:
        """Sum of relative excess of the TTFT and TBT estimates over their targets."""
        cfg, slo = self.config, self.ctx.slo
        if not pred.stable or pred.rho > cfg.max_utilisation:
            return 100.0 * (1.0 + pred.rho)  # overloaded: any move that lowers the load helps
        tt = cfg.headroom * slo.ttft_s
        tb = (cfg.tbt_headroom or cfg.headroom) * slo.tbt_s
        return max(0.0, pred.ttft_s - tt) / tt + max(0.0, max(pred.tbt_s, pred.tpot_s) - tb) / tb

    def plan_for(self, rate: float, prompt: float, output: float, attn_batch: int | None = None) -> QueueingPlan:
        """Greedy (batch, replicas) per group for ``rate`` req/s of the given mean shape;
        ``attn_batch`` pins the attention batch limit (None: the greedy chooses it)."""
        key = (_q(rate), _q(prompt), _q(output), attn_batch)
        hit = self._memo.get(key)
        if hit is None and attn_batch is None:
            # batch choice: the greedy at every attention batch level that fits memory,
            # keeping the feasible plan on the fewest GPUs (ties: fewer GPU-fractions)
            context = prompt + output / 2
            levels = [b for b in self.levels if self.attn_batch_fits(b, context)] or list(self.levels[:1])
            plans = [self.plan_for(rate, prompt, output, b) for b in levels]
            hit = min(plans, key=lambda qp: (not qp.feasible, qp.gpus, self.violation(qp.prediction)
                                             if qp.prediction else 0.0))
        elif hit is None:
            hit = self._greedy(*key)
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def _greedy(self, rate: float, prompt: float, output: float, attn_batch: int | None = None) -> QueueingPlan:
        ctx, cfg, model = self.ctx, self.config, self.model
        cap = ctx.codec.max_replicas
        tail = self.tail_prompt(prompt)
        context = prompt + output / 2
        if attn_batch is not None:
            levels: tuple[int, ...] = (int(attn_batch),)
        else:
            levels = tuple(b for b in self.levels if self.attn_batch_fits(b, context)) or self.levels[:1]
        pool_batch = cfg.pool_batch
        batch = {g: pool_batch for g in POOLS}
        reps = {g: min(cap, self.min_replicas_for(self.group_load(g, pool_batch, rate, prompt, output)))
                for g in POOLS}

        def mem(g: str, b: int) -> float:
            return model.replica_bytes_per_gpu(g, b, context) * ctx.tp_of(g) / model.cap_bytes

        # attention: per batch level the fewest replicas whose slots hold the sequences in
        # flight (Little's law with an unloaded decode step) within max_utilisation; the
        # level needing the least memory (ties: the smaller batch, more prefill servers)
        step0 = model.iteration({g: 1 for g in OPERATOR_GROUPS}, {g: levels[0] if g == "attn" else pool_batch
                                                                  for g in OPERATOR_GROUPS},
                                1.0, context, 0, 0, 0, 1.0, 1.0, {g: 1.0 for g in OPERATOR_GROUPS})[0]
        in_flight = rate * output * step0 / cfg.max_utilisation
        best_attn = None
        for b in levels:
            n = max(ctx.codec.min_replicas, math.ceil(in_flight / b - 1e-9),
                    self.min_replicas_for(self.group_load("attn", b, rate, prompt, output)))
            if n <= cap and (best_attn is None or n * mem("attn", b) < best_attn[2] - 1e-9):
                best_attn = (b, n, n * mem("attn", b))
        b_attn, n_attn = (best_attn[0], best_attn[1]) if best_attn else (levels[-1], cap)
        batch["attn"], reps["attn"] = b_attn, n_attn

        def pred(rp: dict[str, int], bt: dict[str, int]) -> Prediction:
            return model.predict(rp, bt, rate, prompt, output, tail)

        def climb(reps: dict[str, int], batch: dict[str, int]) -> QueueingPlan:
            cur = pred(reps, batch)
            v = self.violation(cur)
            for _ in range(cfg.max_iterations):
                if v <= 0.0:
                    break
                best: tuple[float, dict[str, int], dict[str, int], float, Prediction] | None = None
                for g in OPERATOR_GROUPS:
                    moves = []
                    if reps[g] < cap:
                        moves.append((batch[g], reps[g] + 1))
                    if g == "attn":
                        moves += [(b, reps[g]) for b in levels if b != batch[g]]
                    for b, n in moves:
                        nb, nr = dict(batch), dict(reps)
                        nb[g], nr[g] = b, n
                        p = pred(nr, nb)
                        if cfg.max_gpus is not None and p.gpus > cfg.max_gpus:
                            continue
                        gain = v - self.violation(p)
                        if gain <= MIN_REL_GAIN * max(v, 1.0):
                            continue  # e.g. a replica of an idle pool: no real help
                        extra = n * mem(g, b) - reps[g] * mem(g, batch[g])
                        score = gain / max(extra, MIN_MOVE_GPUS)
                        if best is None or score > best[0]:
                            best = (score, nb, nr, v - gain, p)
                if best is None:
                    break
                _, batch, reps, v, cur = best
            return QueueingPlan(batch, reps, cur.tbt_s, cur.ttft_s, float(cur.gpus), v <= 0.0, cur)

        # Overloaded starts can trap the climb (with every slot full, one more unit adds
        # merged work before it relieves the others): restart with more attention units.
        out = climb(dict(reps), dict(batch))
        for k in (2, 3, 4):
            if out.feasible or n_attn >= cap:
                break
            n_attn = min(cap, n_attn * k)
            reps["attn"] = n_attn
            out = climb(dict(reps), dict(batch))
        return out

    # ----------------------------------------------------------------- control loop
    def reset(self, state: ClusterState | None = None) -> None:
        self.estimator.reset()
        self.margin = 1.0
        self._targets: list[tuple[float, dict[str, int]]] = []
        self._seen: list[tuple[float, float, float, float]] = []  # (time, rate, prompt, output)
        self.last = None

    def peak_load(self, now: float, interval_s: float) -> tuple[float, float, float]:
        """(rate, prompt, output) to plan for from the intervals seen in the last
        ``peak_window_s``: the highest rate averaged over ``peak_smooth_s``, and the mean
        request shape of the window weighted by arrivals (req/s, tokens)."""
        cfg = self.config
        win = [x for x in self._seen if now - x[0] < cfg.peak_window_s - 1e-9]
        k = max(1, int(round(cfg.peak_smooth_s / max(interval_s, 1e-9))))
        rates = [x[1] for x in win]
        peak = max(sum(rates[i:i + k]) / len(rates[i:i + k]) for i in range(max(len(rates) - k + 1, 1)))
        n = sum(rates)
        if n <= 0:
            return peak, self.estimator.prompt, self.estimator.output
        return (peak, sum(x[1] * x[2] for x in win) / n, sum(x[1] * x[3] for x in win) / n)

    def decide(self, state: ClusterState) -> Plan:
        ctx, cfg = self.ctx, self.config
        if ctx.slo != state.slo:
            ctx.slo = state.slo  # the targets in force
            self._memo.clear()
        slo = state.slo
        if len(state.request_rate_history) == 0:
            return state.plan  # nothing observed yet: keep the plan in force
        missed = (state.ttft_p99_s > slo.ttft_s or state.tbt_p99_s > slo.tbt_s
                  or state.slo_attainment < slo.attainment_target)
        self.margin = min(cfg.margin_max, self.margin * cfg.margin_up) if missed else max(1.0, self.margin * cfg.margin_down)
        load = self.estimator.update(state)
        rate, prompt, output = load.rate, load.prompt_tokens, load.output_tokens
        now = state.time_s
        if cfg.peak_window_s > 0:
            latest = float(state.request_rate_history[-1])
            self._seen.append((now, latest, state.prompt_tokens_mean or prompt, state.output_tokens_mean or output))
            self._seen = [x for x in self._seen if now - x[0] < cfg.peak_window_s - 1e-9]
            peak, p_w, o_w = self.peak_load(now, state.interval_s)
            if peak > rate:
                rate, prompt, output = peak, max(prompt, p_w), o_w
        rate = max(rate, cfg.min_rate_rps) * self.margin
        if cfg.queue_drain_s > 0:
            rate += state.queued_requests / cfg.queue_drain_s
        # A new attention batch limit replaces every attention replica (blue/green, KV
        # drained): once running operator-level, keep the batch limit in force.
        pinned = cfg.attn_batch
        if pinned is None and state.plan["attn"].placement == "pack" and state.plan["attn"].max_batch in self.levels:
            pinned = state.plan["attn"].max_batch
        if pinned is None:  # first operator-level plan: the greedy picks the level, kept from then on
            pinned = self.plan_for(rate, prompt, output).batch["attn"]
        qp = self.plan_for(rate, prompt, output, pinned)
        self.last = qp
        self._targets = [(t, r) for t, r in self._targets if now - t < cfg.downscale_delay_s - 1e-9]
        self._targets.append((now, qp.replicas))
        # Up at once; down only to the largest target of the last downscale_delay_s.
        out = {g: max(r[g] for _, r in self._targets) for g in OPERATOR_GROUPS}
        return Plan({g: OperatorPlan(max(ctx.codec.min_replicas, min(out[g], ctx.codec.max_replicas)), qp.batch[g],
                                     "pack", ctx.tp_of(g))
                     for g in OPERATOR_GROUPS})


def _q(x: float) -> float:
    """Round to 2 significant-ish digits on a 1/32-octave grid (memo key; <= 1.1 % change)."""
    if x <= 0:
        return 0.0
    return float(2.0 ** (round(math.log2(x) * 32) / 32))
