"""The operator-split serving engine: pools of replicas driven by continuous batching.

One driver thread runs iterations. An iteration takes every running sequence (decode: its
last token; newly admitted or recovering sequences: their whole prefix, as prefill) and
moves the batch through the pools layer by layer::

    embed -> [attn(norm) -> proj(qkv) -> attn(rope + KV write + attention) -> proj(o)
              -> mlp(residual + norm + MLP + residual)] x n_layers -> head(norm, LM head, sample)

Sequences are grouped by the attention replica holding their KV cache and cut into lanes
of at most attn ``max_batch`` sequences. A lane whose attention replica shares its
placement slot with a ready replica of every other group runs the whole step as one
fused work item (:class:`Lane`, :func:`_run_lane`; each group still sees at most its own
``max_batch`` sequences per call). Other lanes go operator by operator: at every stage
the rows are cut into chunks of at most the group's ``max_batch`` sequences, and each
chunk goes to the least-loaded ready replica of the pool (attention chunks go to the
replica holding the sequences' KV cache). Replicas of a pool work on their chunks in
parallel; each is a worker thread with its own queue and device.

Admission control lives with the attention pool: an attention replica holds at most the
attn group's ``max_batch`` sequences (the simulator's batch slots of an attention unit), and
a request starts only where KV blocks are free for it. With ``kv_allocation: on_demand``
(the default, as vLLM and the simulators do) it takes blocks for the tokens it holds plus
room for one more, its table grows as it decodes, and when a replica runs out of blocks
before an iteration its newest sequences are preempted: their blocks are freed and they go
back to the head of the admission queue, keeping the tokens generated so far, which a
prefill over prompt + generated recomputes once they are re-admitted. With ``reserve`` a
request takes every block it can ever need (``prompt + max_tokens``) at admission, so
nothing is ever preempted but fewer requests run at once. Requests that cannot get blocks
wait (FIFO, at most ``max_waiting``); beyond that they are refused with :class:`Overloaded`;
a request larger than one replica's cache is refused with :class:`RequestRejected`.

Plan changes (:meth:`Engine.apply`) are carried out by the driver between iterations,
when no work is in flight: new replicas load weights on their own thread and join when
ready; replicas no longer wanted leave only after every wanted replica of their group is
ready (a placement move therefore copies weights to the new slot before the old replica
goes); a leaving attention replica hands its sequences' KV blocks to the remaining ones
(copying the cached K/V), and keeps serving any it cannot hand over until they finish.

Failures: when a replica dies mid-batch, the iteration is abandoned before any token is
committed, so every sequence in it re-runs the same step (tokens are never lost or
emitted twice). A dead attention replica loses its KV cache: its sequences go back to the
head of the admission queue and, once re-admitted, recompute their cache by a prefill
over prompt + tokens generated so far. The driver starts a replacement for any dead
replica (the plan still asks for it).
"""
from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from runtime.control import SLO, ClusterState, OperatorState, Plan, PlanError
from runtime.kvcache import KVLayout, PagedKVCache
from runtime.metrics import RuntimeMetrics, pct
from runtime.microbatch import MicroBatchChooser
from runtime.model import LlamaModel
from runtime.models import OPERATOR_GROUPS
from runtime.pools import (DRAINING, LOADING, READY, Replica, WorkerDied, WorkItem, assign_slots, clone_to,
                           pin_host, slot_devices)
from runtime.tensor_parallel import (TP_GROUPS, ShardedKVCache, ShardedStepAttention, kv_head_split, shard_group,
                                     tp_devices)

#: the most devices a replica's weights are split over
MAX_TP = 8

log = logging.getLogger("opscale.runtime")


class RequestRejected(ValueError):
    """A request the engine will never serve (too long for the model or for KV memory)."""

    def __init__(self, reason: str, code: str = "invalid_request") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Overloaded(RuntimeError):
    """The engine cannot take the request now; retry after ``retry_after_s`` seconds."""

    def __init__(self, reason: str, retry_after_s: float, code: str = "overloaded") -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.code = code


class _PoolUnavailable(RuntimeError):
    """No ready replica in a pool (all loading or dead); the iteration waits."""


@dataclass
class EngineConfig:
    """Engine settings.

    Attributes:
        device: ``cpu`` or ``cuda`` (replicas spread round-robin over visible GPUs).
        kv_bytes_per_replica: KV-cache memory of one attention replica (bytes).
        kv_block_tokens: tokens per KV block.
        max_waiting: requests that may wait for admission before new ones get 429.
        max_prefill_tokens: prompt tokens admitted into one iteration (at least one sequence).
        max_replicas: most replicas per group a plan may ask for (plans are clipped to it).
        slo: latency targets used for attainment in :meth:`Engine.observe`.
        history_len: intervals of request-rate history kept for observations.
        seed: seed of the sampling generators.
        idle_wait_s: how long the driver sleeps when there is nothing to do (seconds).
        log_iterations: keep :class:`IterationRecord` s in ``Engine.iteration_log`` (calibration).
        fuse_colocated: run the whole step of an attention replica's sequences as one work
            item when every other group has a ready replica in its placement slot (see
            :class:`Lane`); False sends every operator call through its own pool's queue.
        fused_timing_every: on CUDA, time the groups inside a fused item with CUDA events
            on every n-th item of a replica (see :class:`_GroupClock`).
        pin_weights: on CUDA, move the master weights into pinned host memory at start so
            a new replica copies them at DMA speed.
        respawn_backoff_s: after a replica of a group fails to load (out of device memory,
            say), the next one of that group is spawned this many seconds later, doubling
            with each further failure up to ``respawn_backoff_max_s``; a load that succeeds
            resets it. Replicas that die serving are replaced at once.
        respawn_backoff_max_s: the longest wait between load attempts (seconds).
        micro_batches: the most micro-batches an iteration through the pools (the per-group
            path, not fused lanes) is cut into; the parts (of about equal new tokens, a
            sequence never split) go through the layers at the same time, so one pool works on
            one while another works on the next (ping-pong). 1 = never cut.
        micro_batching: ``adaptive``: per iteration the count in 1..``micro_batches`` that has
            run iterations like it fastest, measured (:class:`runtime.microbatch.MicroBatchChooser`;
            the simulators' ``micro_batching: adaptive`` takes the fastest from the profiles);
            ``fixed``: always ``micro_batches`` (as many as there are sequences, at most).
        kv_allocation: ``on_demand``: a sequence holds KV blocks for the tokens it has and
            grows them as it decodes; the newest sequences of a replica short of blocks are
            preempted (recomputed later). ``reserve``: blocks for ``prompt + max_tokens`` at
            admission, never preempted.
        pool_dispatch: how a stage's rows are shared among the ready replicas of a stateless
            pool (embedding, projections, MLP) on the per-group path. ``fill``: rows of decode
            tokens only go out in chunks of ``max_batch`` sequences, to as few replicas as that
            takes (a memory-bound GEMM reads its weights once per call, and takes about as long
            for 30 tokens as for 200); rows carrying prompt tokens are cut into one part of about
            equal tokens per ready replica (a prompt's token rows may be split: these operators
            work token by token), each part again into calls of at most ``max_batch`` sequences.
            ``spread``: every stage is cut the second way. The simulators' ``pool_dispatch``
            follows the same rules (envs/world.py).
        pools: ``local``: every replica is a worker thread of this process. ``ray``: the
            stateless groups of ``ray`` (embedding, projections, MLP, LM head by default) run as
            Ray Serve deployments, on any node of the Ray cluster, scaled by the plan
            (runtime/rayserve.py); attention and its KV cache stay here.
        ray: settings of the Ray Serve pools (``pools: ray``); None = the defaults of
            :class:`runtime.rayserve.RayPoolsConfig` (a local Ray instance, CPU replicas).
    """

    device: str = "cpu"
    kv_bytes_per_replica: int = 64 * 2**20
    kv_block_tokens: int = 16
    max_waiting: int = 512
    max_prefill_tokens: int = 4096
    max_replicas: int = 8
    slo: SLO = field(default_factory=lambda: SLO(ttft_s=2.0, tbt_s=0.5))
    history_len: int = 8
    seed: int = 0
    idle_wait_s: float = 0.01
    log_iterations: bool = False
    fuse_colocated: bool = True
    fused_timing_every: int = 16
    pin_weights: bool = True
    respawn_backoff_s: float = 0.5
    respawn_backoff_max_s: float = 30.0
    micro_batches: int = 2
    micro_batching: str = "adaptive"
    kv_allocation: str = "on_demand"
    pool_dispatch: str = "fill"
    pools: str = "local"
    ray: Any = None

    def __post_init__(self) -> None:
        if int(self.micro_batches) != self.micro_batches or self.micro_batches < 1:
            raise ValueError(f"EngineConfig.micro_batches must be an integer >= 1, got {self.micro_batches!r}")
        if self.micro_batching not in ("adaptive", "fixed"):
            raise ValueError(f"EngineConfig.micro_batching must be 'adaptive' or 'fixed', got {self.micro_batching!r}")
        if self.kv_allocation not in ("on_demand", "reserve"):
            raise ValueError(f"EngineConfig.kv_allocation must be 'on_demand' or 'reserve', got {self.kv_allocation!r}")
        if self.pool_dispatch not in ("fill", "spread"):
            raise ValueError(f"EngineConfig.pool_dispatch must be 'fill' or 'spread', got {self.pool_dispatch!r}")
        if self.pools not in ("local", "ray"):
            raise ValueError(f"EngineConfig.pools must be 'local' or 'ray', got {self.pools!r}")


#: Events a request's callback receives: ("token", token_id, index), ("done", reason, None),
#: ("error", message, None).
EventCallback = Callable[[str, Any, Any], None]


@dataclass(eq=False)
class Sequence:
    """One request inside the engine.

    Attributes:
        id: engine-unique id.
        prompt: prompt token ids.
        max_tokens: tokens to generate.
        temperature: 0 = greedy.
        generated: tokens emitted so far (committed).
        n_cached: tokens whose K/V are in the cache of ``attn``.
        attn: attention replica holding the cache (None while waiting).
        arrival_s, first_token_s, last_token_s: ``time.perf_counter()`` stamps (seconds).
        max_tbt_s: largest gap between two emitted tokens (seconds).
    """

    id: int
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    on_event: EventCallback | None = None
    generated: list[int] = field(default_factory=list)
    n_cached: int = 0
    attn: Replica | None = None
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    last_token_s: float | None = None
    max_tbt_s: float = 0.0
    finished: threading.Event = field(default_factory=threading.Event)
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def tokens(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt + self.generated

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV the sequence can ever need (the last generated token is never fed)."""
        return len(self.prompt) + self.max_tokens - 1

    @property
    def kv_now(self) -> int:
        """Tokens of KV the sequence's next iteration needs: every token fed so far."""
        return len(self.prompt) + len(self.generated)


@dataclass(frozen=True)
class IterationRecord:
    """One completed iteration (for fitting overhead models).

    Attributes:
        end_s: ``time.perf_counter()`` when it finished (seconds).
        duration_s: wall time of the iteration (seconds).
        decode_seqs: sequences decoding one token.
        decode_context: mean KV length of the decoding sequences (tokens).
        prefill_tokens: tokens prefilled (whole prompts, or prompt + generated on recovery).
        prefill_seqs: sequences prefilled.
    """

    end_s: float
    duration_s: float
    decode_seqs: int
    decode_context: float
    prefill_tokens: int
    prefill_seqs: int


# ---------------------------------------------------------------------------------------
# What each group's replica holds and computes.
# ---------------------------------------------------------------------------------------

def group_modules(model: LlamaModel, group: str) -> nn.Module:
    """The modules of ``group`` taken from ``model`` (shared, not copied)."""
    L = model.layers
    if group == "embed":
        return nn.ModuleDict({"embed": model.embed})
    if group == "attn":
        return nn.ModuleDict({"norm": nn.ModuleList(l.attn_norm for l in L),
                              "rope": nn.ModuleList(l.rope for l in L),
                              "attn": nn.ModuleList(l.attn for l in L)})
    if group == "proj":
        return nn.ModuleDict({"qkv": nn.ModuleList(l.qkv for l in L), "o": nn.ModuleList(l.o_proj for l in L)})
    if group == "mlp":
        return nn.ModuleDict({"norm": nn.ModuleList(l.mlp_norm for l in L), "mlp": nn.ModuleList(l.mlp for l in L)})
    if group == "head":
        return nn.ModuleDict({"norm": model.final_norm, "lm_head": model.lm_head, "sampler": model.sampler})
    raise KeyError(f"unknown operator group {group!r}; expected one of {OPERATOR_GROUPS}")


@torch.no_grad()
def _embed(rep: Replica, ids: torch.Tensor) -> torch.Tensor:
    return rep.modules["embed"](ids.to(rep.device))


@torch.no_grad()
def _attn_norm(rep: Replica, layer: int, x: torch.Tensor) -> torch.Tensor:
    return rep.modules["norm"][layer](x.to(rep.device))


@torch.no_grad()
def _qkv(rep: Replica, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rep.modules["qkv"][layer](x.to(rep.device))


@torch.no_grad()
def _o_proj(rep: Replica, layer: int, a: torch.Tensor) -> torch.Tensor:
    return rep.modules["o"][layer](a.to(rep.device))


@torch.no_grad()
def _mlp(rep: Replica, layer: int, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    dev = rep.device
    h = h.to(dev) + o.to(dev)
    return h + rep.modules["mlp"][layer](rep.modules["norm"][layer](h))


@torch.no_grad()
def _head(rep: Replica, x: torch.Tensor, temps: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    m = rep.modules
    logits = m["lm_head"](m["norm"](x.to(rep.device)))
    if bool((temps > 0).any()):
        return m["sampler"](logits, temps.to(rep.device), generator=gen).cpu()
    return m["sampler"](logits).cpu()


class StepAttention:
    """RoPE, KV write and attention of one attention replica's sequences for one iteration.

    Built once per iteration (:meth:`PagedKVCache.index_step`: positions, cache rows to
    write, decode lengths and the cache rows to gather, in one host-to-device copy) and
    called once per layer, so no layer does per-sequence Python work for decodes.

    Args:
        kv: the replica's cache (blocks of every sequence already reserved).
        seqs: ``(seq_id, n_new, start_pos)`` in row order. A sequence starting at position 0
            is a prefill (causal attention over its own rows); one with a cache is a
            decode step of one token, batched with the other decodes.
    """

    def __init__(self, kv: PagedKVCache, seqs: list[tuple[int, int, int]]) -> None:
        self.kv = kv
        self.key = tuple(seqs)
        self.ix = kv.index_step(seqs)
        self.all_decode = self.ix.n_dec == len(seqs)
        self.convert = kv.layout.dtype  # K/V of another dtype are cast before the write

    def __call__(self, layer: int, rope: nn.Module, attn: nn.Module, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """``q[rows,H,hd], k, v[rows,KV,hd]`` (not yet rotated) of ``layer`` -> attention output ``[rows, H*hd]``."""
        ix, kv = self.ix, self.kv
        q, k = rope(q, k, ix.positions)
        if k.dtype != self.convert:
            k, v = k.to(self.convert), v.to(self.convert)
        kv.write_slots(layer, ix.slot, k, v)
        if self.all_decode:
            kc, vc = kv.gather_tokens(layer, ix.gather, ix.n_dec)
            return attn.decode(q, kc, vc, ix.dec_lengths)
        out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        for r, n in ix.prefills:
            out[r:r + n] = attn.prefill(q[r:r + n], k[r:r + n], v[r:r + n])
        if ix.n_dec:
            kc, vc = kv.gather_tokens(layer, ix.gather, ix.n_dec)
            out[ix.dec_rows] = attn.decode(q[ix.dec_rows], kc, vc, ix.dec_lengths)
        return out


def step_attention(kv: Any, seqs: list[tuple[int, int, int]]) -> Any:
    """The per-iteration attention step of a replica's cache: :class:`StepAttention`, or one per
    shard for a cache split over devices (:class:`runtime.tensor_parallel.ShardedStepAttention`)."""
    if isinstance(kv, ShardedKVCache):
        return ShardedStepAttention(kv, seqs, StepAttention)
    return StepAttention(kv, seqs)


@torch.no_grad()
def _attend(rep: Replica, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            seqs: list[tuple[int, int, int]]) -> torch.Tensor:
    """RoPE, KV write and attention for sequences ``(seq_id, n_new, start_pos)`` laid out in order."""
    dev = rep.device
    step = getattr(rep, "_step_attn", None)
    if step is None or step.key != tuple(seqs):  # same rows for every layer of an iteration
        step = rep._step_attn = step_attention(rep.kv, seqs)
    m = rep.modules
    return step(layer, m["rope"][layer], m["attn"][layer], q.to(dev), k.to(dev), v.to(dev))


@dataclass
class Lane:
    """Sequences of one attention replica whose whole step runs in one fused work item.

    Every other group has a ready replica in the attention replica's placement slot (the
    same GPU), so the step needs no hand-off between workers: the attention replica's
    thread runs embed, every layer and the head with the co-located replicas' weights.
    Each group still sees at most its own ``max_batch`` sequences per call (``cuts``).

    Attributes:
        attn: the attention replica (runs the item, holds the KV cache).
        peers: the co-located replica of embed, proj, mlp and head whose weights are used.
        seqs: ``(seq_id, n_new, start_pos)`` in row order.
        ids: token ids of the rows ``[rows]`` (CPU).
        last: row of each sequence's last token (the head's input).
        cuts: per group, row ranges of consecutive sub-batches of at most ``max_batch`` sequences.
        head_cuts: sequence ranges of the head's sub-batches.
        temps: sampling temperature of each sequence ``[seqs]`` (CPU); ``sample`` when any > 0.
        generator: the head replica's sampling generator.
        events: time the groups with CUDA events on this call (see :class:`_GroupClock`).
    """

    attn: Replica
    peers: dict[str, Replica]
    seqs: list[tuple[int, int, int]]
    ids: torch.Tensor
    last: list[int]
    cuts: dict[str, list[tuple[int, int]]]
    head_cuts: list[tuple[int, int]]
    temps: torch.Tensor
    sample: bool
    generator: torch.Generator | None
    events: bool = False


class _GroupClock:
    """Splits a fused item's service time among operator groups (seconds).

    On CPU, wall time between group boundaries is exact. On CUDA, kernels run
    asynchronously, so the synchronised wall time of the whole item is split by the groups'
    shares of GPU time, measured with CUDA events on every ``EngineConfig.fused_timing_every``-th
    item of a replica (events at every boundary cost launches) and reused in between
    (before the first measurement, by the shares of host time).
    """

    def __init__(self, rep: Replica, events: bool) -> None:
        self.rep = rep
        self.cuda = rep.device.type == "cuda"
        self.events = events and self.cuda
        self.t = dict.fromkeys(OPERATOR_GROUPS, 0.0)
        self.start = time.perf_counter()
        self.marks: list[tuple[str, Any]] = []
        if self.events:
            self.stream = torch.cuda.current_stream(rep.device)  # where the replica's kernels go
            self.mark("")

    def mark(self, group: str) -> None:
        """(CUDA event timing) the work queued since the previous mark belonged to ``group``."""
        e = torch.cuda.Event(enable_timing=True)
        e.record(self.stream)
        self.marks.append((group, e))

    def split(self) -> dict[str, float]:
        """Seconds per group, after the item's results reached the host."""
        if not self.cuda:
            return self.t
        wall = time.perf_counter() - self.start
        if self.events:
            self.marks[-1][1].synchronize()
            gpu = dict.fromkeys(OPERATOR_GROUPS, 0.0)
            for (_, a), (g, b) in zip(self.marks, self.marks[1:]):
                gpu[g] += a.elapsed_time(b)
            self.rep._group_shares = gpu
        shares = getattr(self.rep, "_group_shares", None) or self.t
        total = sum(shares.values()) or 1.0
        return {g: wall * v / total for g, v in shares.items()}


def _residual_mlp(norm: nn.Module, ff: nn.Module, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``h + o`` (attention residual), then ``+ mlp(norm(.))`` (MLP residual)."""
    h = h + o
    return h + ff(norm(h))


def _chunked(fn: Callable[..., Any], cuts: list[tuple[int, int]], *xs: torch.Tensor) -> Any:
    """``fn`` over row ranges ``cuts`` of ``xs`` (one call when there is one range), results concatenated."""
    if len(cuts) == 1:
        return fn(*xs)
    return Engine._cat([fn(*(x[a:b] for x in xs)) for a, b in cuts])


def _layer_table(attn: Replica, proj: Replica, mlp: Replica) -> list[tuple[nn.Module, ...]]:
    """Per layer ``(attn_norm, rope, attention, qkv, o_proj, mlp_norm, mlp)`` of these replicas' modules.

    Cached on the attention replica per (proj, mlp) pair, so a step does no module lookups.
    """
    cache = attn.__dict__.setdefault("_layer_tables", {})
    key = (proj.id, mlp.id)
    if key not in cache:
        a, p, m = attn.modules, proj.modules, mlp.modules
        cache[key] = list(zip(a["norm"], a["rope"], a["attn"], p["qkv"], p["o"], m["norm"], m["mlp"]))
    return cache[key]


@torch.no_grad()
def _run_lane(rep: Replica, lane: Lane, item: WorkItem) -> torch.Tensor:
    """One whole step (embed, every layer, head) of ``lane`` on its attention replica.

    Returns the next token of each sequence (CPU). Fills ``item.parts`` with each group's
    service seconds. Raises :class:`PeerDied` if a co-located replica was killed meanwhile.
    """
    dev = rep.device
    clock = _GroupClock(rep, lane.events)
    ev = clock.mark if clock.events else None
    pc = time.perf_counter
    emb, head = lane.peers["embed"].modules, lane.peers["head"].modules
    cuts = lane.cuts
    x = _chunked(emb["embed"], cuts["embed"], lane.ids.to(dev, non_blocking=True))
    t = pc()
    clock.t["embed"] = t - clock.start
    if ev:
        ev("embed")
    step = step_attention(rep.kv, lane.seqs)
    one_proj, one_mlp = len(cuts["proj"]) == 1, len(cuts["mlp"]) == 1
    t_attn = t_proj = t_mlp = 0.0
    for i, (norm, rope, attn, qkv, o_proj, mlp_norm, mlp) in enumerate(
            _layer_table(rep, lane.peers["proj"], lane.peers["mlp"])):
        a = norm(x)
        t1 = pc()
        if ev:
            ev("attn")
        q, k, v = qkv(a) if one_proj else _chunked(qkv, cuts["proj"], a)
        t2 = pc()
        if ev:
            ev("proj")
        att = step(i, rope, attn, q, k, v)
        t3 = pc()
        if ev:
            ev("attn")
        o = o_proj(att) if one_proj else _chunked(o_proj, cuts["proj"], att)
        t4 = pc()
        if ev:
            ev("proj")
        if one_mlp:
            h = x + o
            x = h + mlp(mlp_norm(h))
        else:
            x = _chunked(partial(_residual_mlp, mlp_norm, mlp), cuts["mlp"], x, o)
        t5 = pc()
        if ev:
            ev("mlp")
        t_attn += (t1 - t) + (t3 - t2)
        t_proj += (t2 - t1) + (t4 - t3)
        t_mlp += t5 - t4
        t = t5
    clock.t["attn"], clock.t["proj"], clock.t["mlp"] = t_attn, t_proj, t_mlp
    if not step.all_decode:
        x = x[torch.tensor(lane.last, dtype=torch.long).to(dev, non_blocking=True)]
    outs = []
    for a, b in lane.head_cuts:
        logits = head["lm_head"](head["norm"](x[a:b]))
        if lane.sample:
            outs.append(head["sampler"](logits, lane.temps[a:b].to(dev), generator=lane.generator))
        else:
            outs.append(head["sampler"](logits))
    if ev:
        ev("head")
    tokens = (torch.cat(outs) if len(outs) > 1 else outs[0]).cpu()
    clock.t["head"] = pc() - t
    for g, sec in clock.split().items():
        item.parts[g][2] = sec  # type: ignore[index]
    for peer in lane.peers.values():
        peer.check_peer()
    return tokens


def pool_calls(rows: list[tuple[int, int]], max_batch: int, replicas: int, dispatch: str = "fill"
               ) -> list[tuple[int, int, int]]:
    """The calls a stage of a stateless pool is cut into: ``(first row, end row, sequences)``.

    ``rows`` holds each sequence's ``(first row, end row)`` of the stage's input, contiguous from
    row 0. With ``dispatch="fill"`` rows of decode tokens only (one row per sequence) go out in
    chunks of ``max_batch`` sequences. Otherwise (``spread``, or rows carrying prompt tokens) the
    rows are cut into ``replicas`` parts of about equal rows (tokens), a sequence's rows split
    where a cut falls, and a part overlapping more than ``max_batch`` sequences is cut again at
    the start of its ``max_batch + 1``-th. Every row is in exactly one call, in order.
    """
    n_seq = len(rows)
    if n_seq == 0:
        return []
    n_tok = rows[-1][1]
    if dispatch == "fill" and n_tok == n_seq:
        return [(rows[c][0], rows[min(c + max_batch, n_seq) - 1][1], min(max_batch, n_seq - c))
                for c in range(0, n_seq, max_batch)]
    starts = [r0 for r0, _ in rows]
    k = max(1, min(int(replicas), n_tok))
    calls = []
    for j in range(k):
        a, b = n_tok * j // k, n_tok * (j + 1) // k
        if b <= a:
            continue
        i0 = bisect.bisect_right(starts, a) - 1   # the sequence row a belongs to
        i1 = bisect.bisect_left(starts, b)        # sequences starting before b
        while i1 - i0 > max_batch:
            cut = starts[i0 + max_batch]
            calls.append((a, cut, max_batch))
            a, i0 = cut, i0 + max_batch
        calls.append((a, b, i1 - i0))
    return calls


# ---------------------------------------------------------------------------------------


class Engine:
    """Operator-split serving of one model with pools that a :class:`Plan` sizes.

    Args:
        model: the operator-split model (master copy; replicas copy their group's weights
            from it to their own device).
        plan: initial plan.
        config: engine settings.
    """

    def __init__(self, model: LlamaModel, plan: Plan, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.config = config or EngineConfig()
        self.metrics = RuntimeMetrics()
        self.dtype = model.embed.weight.dtype
        self.layout = KVLayout(self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim,
                               self.config.kv_block_tokens, self.dtype)
        self._masters = {g: group_modules(model, g) for g in OPERATOR_GROUPS}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._plan = self._repair(plan)
        self._plan_version = 0
        self._applied_version = -1
        self.replicas: dict[str, list[Replica]] = {g: [] for g in OPERATOR_GROUPS}
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._next_id = 0
        self._stop = threading.Event()
        self._driver: threading.Thread | None = None
        self._history: collections.deque[float] = collections.deque(maxlen=self.config.history_len)
        #: group -> (consecutive load failures, perf_counter time before which none is spawned,
        #: id of the last replica that failed)
        self._load_failures: dict[str, tuple[int, float, int]] = {}
        #: group -> the last load error (kept after a later load succeeds; wait_ready names
        #: only the groups still failing)
        self.last_load_error: dict[str, str] = {}
        self._energy_j = 0.0
        self._gens: dict[int, torch.Generator] = {}
        self.iterations = 0
        self.aborted_iterations = 0
        self.iteration_log: collections.deque[IterationRecord] = collections.deque(maxlen=1_000_000)
        self.start_s = time.perf_counter()
        self._nvml = _Nvml() if self.config.device == "cuda" else None
        #: runs the micro-batches after the first of a cut iteration (the driver runs the first);
        #: started with the driver
        self._micro_pool: ThreadPoolExecutor | None = None
        #: iterations of the per-group path cut into more than one micro-batch
        self.micro_batched_iterations = 0
        #: sequences preempted for KV memory (``kv_allocation: on_demand``), each time counted
        self.preemptions = 0
        #: picks each such iteration's micro-batch count from measured times (adaptive)
        self.micro = MicroBatchChooser(self.config.micro_batches)
        #: the Ray Serve pools (``pools: ray``), created by :meth:`start`
        self._remote: Any = None

    # ---- lifecycle --------------------------------------------------------------------
    def start(self, wait_ready: float | None = 60.0) -> "Engine":
        """Start the replicas of the initial plan and the driver; wait until all are ready.

        On CUDA (``pin_weights``) the master weights are first moved into pinned host
        memory, once (an engine started again on the same model finds them pinned).
        """
        if self.config.device == "cuda" and self.config.pin_weights:
            t0 = time.perf_counter()
            nbytes = pin_host(self.model)
            if nbytes:
                log.info("pinned %.2f GB of master weights in %.2f s", nbytes / 1e9, time.perf_counter() - t0)
        if self.config.pools == "ray" and self._remote is None:
            from runtime.rayserve import RayPools, RayPoolsConfig

            rcfg = self.config.ray or RayPoolsConfig(seed=self.config.seed)
            self._remote = RayPools({g: self._masters[g] for g in rcfg.groups}, rcfg)
        with self._lock:
            self._reconcile()
        if self.config.micro_batches > 1 and self._micro_pool is None:
            self._micro_pool = ThreadPoolExecutor(self.config.micro_batches - 1, thread_name_prefix="opscale-micro")
        self._driver = threading.Thread(target=self._drive, name="opscale-driver", daemon=True)
        self._driver.start()
        if wait_ready:
            self.wait_ready(wait_ready)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every replica the plan asks for is ready; TimeoutError otherwise."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            with self._lock:
                if self._applied_version == self._plan_version and self._settled():
                    return
            time.sleep(0.005)
        failed = "".join(f"; {g} failed to load: {self.last_load_error[g]}" for g in list(self._load_failures))
        raise TimeoutError(f"replicas not ready after {timeout} s: {self.describe()}{failed}")

    def _settled(self) -> bool:
        want = assign_slots(self._plan)
        for g in OPERATOR_GROUPS:
            live = [r for r in self.replicas[g] if r.state in (READY, LOADING)]
            if sorted(r.slot for r in live) != sorted(want[g]) or any(r.state != READY for r in live):
                return False
            if any(r.tp != self._plan[g].tp for r in live):
                return False
            if any(r.state == DRAINING for r in self.replicas[g]):
                return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: pending requests finish with reason ``shutdown``; workers exit."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._driver is not None:
            self._driver.join(timeout)
        with self._lock:
            for s in list(self._waiting) + list(self._running):
                self._finish(s, "shutdown")
            self._waiting.clear()
            self._running.clear()
            for reps in self.replicas.values():
                for r in reps:
                    r.stop()
            for reps in self.replicas.values():
                for r in reps:
                    r.join(timeout)
            # free device memory now (the engine and its replicas reference each other, so
            # without this it waits for the garbage collector: on a GPU, engines started one
            # after another then ran out of memory)
            if self._driver is None or not self._driver.is_alive():
                for reps in self.replicas.values():
                    for r in reps:
                        if r.exited:
                            r.release()
        if self._micro_pool is not None:
            self._micro_pool.shutdown(wait=True)
            self._micro_pool = None
        if self._remote is not None:
            self._remote.shutdown()
            self._remote = None

    @property
    def running(self) -> bool:
        """Whether the driver is serving."""
        return self._driver is not None and self._driver.is_alive() and not self._stop.is_set()

    # ---- requests ---------------------------------------------------------------------
    def submit(self, prompt: list[int], max_tokens: int, temperature: float = 0.0,
               on_event: EventCallback | None = None) -> Sequence:
        """Queue a request; raises RequestRejected (never servable) or Overloaded (try later)."""
        if not self.running:
            raise Overloaded("engine is not serving", retry_after_s=1.0, code="not_running")
        if not prompt:
            raise RequestRejected("prompt is empty; at least one token is needed")
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < self.cfg.vocab_size)]
        if bad:
            raise RequestRejected(f"prompt token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}")
        if max_tokens < 1:
            raise RequestRejected(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise RequestRejected(f"temperature must be >= 0, got {temperature}")
        total = len(prompt) + max_tokens
        if total > self.cfg.max_seq_len:
            raise RequestRejected(f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) = {total} tokens exceeds "
                                  f"the model's context of {self.cfg.max_seq_len}", code="context_length_exceeded")
        cap = self._kv_capacity_tokens()
        if total - 1 > cap:
            raise RequestRejected(f"request needs KV for {total - 1} tokens but one attention replica holds "
                                  f"{cap}", code="kv_capacity_exceeded")
        with self._wake:
            if len(self._waiting) >= self.config.max_waiting:
                self.metrics.rejected("queue_full")
                raise Overloaded(f"{len(self._waiting)} requests already wait for KV memory", self._retry_after())
            seq = Sequence(self._next_id, list(prompt), int(max_tokens), float(temperature), on_event)
            self._next_id += 1
            self._waiting.append(seq)
            self.metrics.arrival(len(prompt), max_tokens)
            self._wake.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request (client went away); its KV blocks are freed between iterations."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify_all()

    def generate(self, prompt: list[int], max_tokens: int, temperature: float = 0.0,
                 timeout: float = 60.0) -> list[int]:
        """Submit and wait; returns the generated tokens (TimeoutError if not done in time)."""
        seq = self.submit(prompt, max_tokens, temperature)
        if not seq.finished.wait(timeout):
            raise TimeoutError(f"request {seq.id} not finished after {timeout} s")
        if seq.finish_reason != "length":
            raise RuntimeError(f"request {seq.id} ended with {seq.finish_reason}")
        return list(seq.generated)

    def _kv_capacity_tokens(self) -> int:
        blocks = int(self.config.kv_bytes_per_replica // self.layout.bytes_per_block)
        return blocks * self.layout.block_tokens

    def _retry_after(self) -> float:
        """Seconds until a waiting slot is likely free: one typical request's remaining time."""
        with self._lock:
            left = [s.max_tokens - len(s.generated) for s in self._running] or [1]
        tbt = max(self._recent_tbt, 0.01)
        return float(min(max(np.median(left) * tbt, 1.0), 60.0))

    _recent_tbt = 0.05

    # ---- control ----------------------------------------------------------------------
    def _repair(self, plan: Plan) -> Plan:
        """Clip replicas to ``config.max_replicas`` and tensor parallelism to what a replica can do:
        up to ``MAX_TP`` devices (runtime/tensor_parallel.py), on CUDA at most the visible GPUs,
        for attention and the projections at most one key/value head per device; 1 for groups of
        whole-model instances; for groups on Ray Serve the deployment's (``RayPoolsConfig.tp``).
        (On CPU a split replica's shards all sit on the CPU: what the plan would spread over GPUs,
        for testing and GPU accounting.)"""
        if not isinstance(plan, Plan):
            raise PlanError(f"expected a Plan, got {type(plan).__name__}")
        p = plan
        remote = self._remote_tp()
        for g in OPERATOR_GROUPS:
            op = p[g]
            if op.replicas > self.config.max_replicas:
                p = p.with_op(g, replicas=self.config.max_replicas)
            splittable = g in TP_GROUPS and op.placement != "model"
            most = min(MAX_TP, self.cfg.n_kv_heads) if g in ("attn", "proj") else MAX_TP
            if self.config.device == "cuda":  # a replica spans at most the GPUs there are
                most = min(most, max(torch.cuda.device_count(), 1))
            tp = min(op.tp, most) if splittable else 1
            if g in remote:  # the Serve deployment's split, fixed while it runs
                tp = remote[g]
            if op.tp != tp:
                p = p.with_op(g, tp=tp)
        return p

    def _remote_tp(self) -> dict[str, int]:
        """The groups that run on Ray Serve (``pools: ray``), each with its deployment's tp."""
        if self.config.pools != "ray":
            return {}
        from runtime.rayserve import RayPoolsConfig

        rcfg = self.config.ray or RayPoolsConfig()
        return {g: int(rcfg.tp.get(g, 1)) for g in rcfg.groups}

    def apply(self, plan: Plan) -> Plan:
        """Adopt ``plan`` (replicas, max batch, placement) while serving; returns the plan in force.

        Replica changes happen between iterations (see the module docstring); max batch
        takes effect at the next stage that cuts a batch.
        """
        repaired = self._repair(plan)
        with self._wake:
            if repaired != self._plan:
                self._plan = repaired
                self._plan_version += 1
                self.metrics.plan_changes.inc()
            self._wake.notify_all()
        return repaired

    @property
    def plan(self) -> Plan:
        """The plan in force."""
        return self._plan

    def kill_replica(self, group: str, index: int = 0) -> Replica:
        """Fault injection: the ``index``-th ready replica of ``group`` dies at the end of its next batch."""
        with self._lock:
            ready = [r for r in self.replicas[group] if r.state == READY]
            if not ready:
                raise LookupError(f"no ready replica in group {group!r}")
            r = ready[index % len(ready)]
        r.kill()
        return r

    def describe(self) -> dict[str, list[str]]:
        """Replicas per group as ``'#id state slot device'`` strings (for logs and /v1/plan)."""
        with self._lock:
            return {g: [f"#{r.id} {r.state} {r.slot} {r.device}" for r in reps] for g, reps in self.replicas.items()}

    # ---- replica management (driver thread, or start() before the driver runs) --------
    def _loader(self, group: str) -> Callable[[torch.device], Any]:
        """Builds a new replica's weights of ``group`` on its device, split over the plan's tp devices."""
        master = self._masters[group]
        tp = self._plan[group].tp

        def load(device: torch.device) -> Any:
            if tp > 1:
                return shard_group(master, group, tp_devices(device, tp))
            return clone_to(master, device)
        return load

    def _spawn(self, group: str, slot: str, device: str) -> Replica:
        if self._remote is not None and group in self._remote.groups:
            from runtime.rayserve import RemoteReplica

            remote = RemoteReplica(group, slot, self._remote, on_done=self._item_done)
            self.replicas[group].append(remote)  # type: ignore[arg-type]
            log.info("spawned %r", remote)
            return remote  # type: ignore[return-value]
        tp = self._plan[group].tp
        rep = Replica(group, slot, device, self._loader(group), on_done=self._item_done, tp=tp)
        if group == "attn" and tp > 1:
            rep.kv = ShardedKVCache(self.layout, self.config.kv_bytes_per_replica, tp_devices(device, tp),
                                    kv_head_split(self.cfg.n_kv_heads, tp))
        elif group == "attn":
            rep.kv = PagedKVCache(self.layout, self.config.kv_bytes_per_replica, device)
        if group == "head":
            self._gens[rep.id] = torch.Generator(device=device).manual_seed(self.config.seed + rep.id)
        self.replicas[group].append(rep)
        log.info("spawned %r", rep)
        return rep

    def _item_done(self, rep: Replica, item: WorkItem, start: float, end: float) -> None:
        if item.parts is None:
            self.metrics.item_done(rep.group, item.tokens, item.seqs, start - item.enqueued_s, end - start)
            return
        for g, (tokens, seqs, busy) in item.parts.items():  # a fused item: each group its share
            self.metrics.item_done(g, int(tokens), int(seqs), start - item.enqueued_s, busy)

    def _reconcile(self) -> None:
        """Bring replicas in line with the plan; called with the lock held, nothing in flight."""
        plan = self._plan
        want = assign_slots(plan)
        devices = slot_devices(want, self.config.device)
        for g in OPERATOR_GROUPS:
            # forget the dead; their sequences recover
            for r in [r for r in self.replicas[g] if not r.alive]:
                self.replicas[g].remove(r)
                self.metrics.worker_deaths.labels(group=g).inc()
                if r.load_error is not None:
                    self._note_load_failure(g, r)
                log.warning("removed dead %r", r)
                if g == "attn":
                    self._recover_from(r)
                r.release()
            live = [r for r in self.replicas[g] if r.state in (LOADING, READY)]
            if g in self._load_failures and any(r.ready and r.id > self._load_failures[g][2] for r in live):
                del self._load_failures[g]  # a replica spawned after the last failure loaded
            todo = list(want[g])
            keep, extra = [], []
            for r in live:
                if r.slot in todo and r.tp == plan[g].tp:
                    todo.remove(r.slot)
                    keep.append(r)
                else:
                    extra.append(r)
            if todo and time.perf_counter() < self._load_failures.get(g, (0, 0.0, -1))[1]:
                todo = []  # backing off after failed loads; the slots are filled later
            for slot in todo:
                keep.append(self._spawn(g, slot, devices[slot]))
            if extra and all(r.ready for r in keep):
                for r in extra:
                    self._retire(r, keep)
            for r in [r for r in self.replicas[g] if r.state == DRAINING]:
                if g != "attn" or not any(s.attn is r for s in self._running):
                    r.stop()
                    self.replicas[g].remove(r)
                    log.info("retired %r", r)
        self._applied_version = self._plan_version

    def _note_load_failure(self, group: str, rep: Replica) -> None:
        """Count a failed load of ``group`` and set when the next attempt may start."""
        n = self._load_failures.get(group, (0, 0.0, -1))[0] + 1
        wait = min(self.config.respawn_backoff_s * 2 ** (n - 1), self.config.respawn_backoff_max_s)
        self._load_failures[group] = (n, time.perf_counter() + wait, rep.id)
        self.last_load_error[group] = f"{type(rep.load_error).__name__}: {rep.load_error}"
        log.warning("%s: %d failed load(s) in a row; next attempt in %.1f s", group, n, wait)

    def _retire(self, rep: Replica, keep: list[Replica]) -> None:
        """Stop routing to ``rep``; an attention replica first hands over its sequences' KV, each
        to the ready replica with the most free KV among those with room for it and a free batch
        slot (the plan's attention ``max_batch``, as admission counts them)."""
        rep.state = DRAINING
        if rep.group != "attn":
            return
        limit = self._plan["attn"].max_batch
        held: dict[int, int] = {}
        for s in self._running:
            if s.attn is not None:
                held[s.attn.id] = held.get(s.attn.id, 0) + 1
        for s in [s for s in self._running if s.attn is rep]:
            need = self._kv_admit_tokens(s)
            room = [r for r in keep if r.ready and held.get(r.id, 0) < limit and r.kv.can_reserve(need)]
            target = max(room, key=lambda r: r.kv.free_blocks, default=None)
            if target is None:
                continue  # keeps being served by the draining replica until it finishes
            held[target.id] = held.get(target.id, 0) + 1
            target.kv.reserve(s.id, self._kv_hold_tokens(s))
            if s.n_cached:
                ks, vs = rep.kv.export(s.id, s.n_cached)
                target.kv.import_(s.id, ks, vs)
            rep.kv.release(s.id)
            s.attn = target

    def _recover_from(self, dead: Replica) -> None:
        """Sequences whose KV died with ``dead`` go back to the front of the admission queue."""
        lost = [s for s in self._running if s.attn is dead]
        for s in reversed(lost):
            self._running.remove(s)
            s.attn = None
            s.n_cached = 0
            self._waiting.appendleft(s)
        if lost:
            log.warning("%d sequences lost their KV cache with %r; they will recompute it", len(lost), dead)

    # ---- driver -----------------------------------------------------------------------
    def _kv_hold_tokens(self, s: Sequence) -> int:
        """Tokens of KV a sequence reserves where it starts (admission or hand-over)."""
        return s.kv_tokens if self.config.kv_allocation == "reserve" else s.kv_now

    def _kv_admit_tokens(self, s: Sequence) -> int:
        """Free KV tokens a replica must have to take ``s``: its reservation, and with
        on-demand allocation room for one more token (as the simulators admit) unless it will
        never feed another (else a request that fits a replica exactly would never start)."""
        if self.config.kv_allocation == "reserve":
            return s.kv_tokens
        return min(s.kv_now + 1, s.kv_tokens)

    def _grow_kv(self) -> None:
        """On-demand allocation: before an iteration, extend every running sequence's blocks to
        what it feeds; on a replica short of blocks, preempt its newest sequences first (their
        blocks freed, back to the head of the admission queue with their generated tokens)."""
        if self.config.kv_allocation != "on_demand":
            return
        by_rep: dict[int, list[Sequence]] = {}
        for s in self._running:  # admission order
            if s.attn is not None and s.attn.kv is not None:
                by_rep.setdefault(s.attn.id, []).append(s)
        preempted: list[Sequence] = []
        for seqs in by_rep.values():
            kv = seqs[0].attn.kv  # type: ignore[union-attr]
            need = [kv.blocks_to_extend(s.id, s.kv_now) for s in seqs]
            while sum(need) > kv.free_blocks and len(seqs) > 1:
                s = seqs.pop()
                need.pop()
                kv.release(s.id)
                s.attn = None
                s.n_cached = 0
                preempted.append(s)
            for s in seqs:
                kv.extend(s.id, s.kv_now)
        if preempted:
            self.preemptions += len(preempted)
            self.metrics.preemptions.inc(len(preempted))
            for s in preempted:
                self._running.remove(s)
            for s in sorted(preempted, key=lambda s: s.id, reverse=True):
                self._waiting.appendleft(s)  # oldest first at the head
            log.info("preempted %d sequences for KV memory; they will recompute their cache", len(preempted))

    def _admit(self) -> None:
        budget = self.config.max_prefill_tokens
        admitted = 0
        limit = self._plan["attn"].max_batch  # sequences an attention replica holds at once
        per_replica: dict[int, int] = {}
        for s in self._running:
            if s.attn is not None:
                per_replica[s.attn.id] = per_replica.get(s.attn.id, 0) + 1
        while self._waiting:
            s = self._waiting[0]
            need = len(s.tokens)
            if admitted and need > budget:
                break
            kv_need = self._kv_admit_tokens(s)
            attn = [r for r in self.replicas["attn"] if r.state == READY and r.kv.can_reserve(kv_need)
                    and per_replica.get(r.id, 0) < limit]
            if not attn:
                break
            target = max(attn, key=lambda r: r.kv.free_blocks)
            target.kv.reserve(s.id, self._kv_hold_tokens(s))
            s.attn = target
            per_replica[target.id] = per_replica.get(target.id, 0) + 1
            self._waiting.popleft()
            self._running.append(s)
            budget -= need
            admitted += 1

    def _drive(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                for s in [s for s in list(self._waiting) + self._running if s.cancelled]:
                    if s in self._waiting:
                        self._waiting.remove(s)
                    self._finish(s, "cancelled")
                self._reconcile()
                self._admit()
                self._grow_kv()
                batch = [s for s in self._running if s.attn is not None]
                if not batch:
                    self._wake.wait(self.config.idle_wait_s)
                    continue
            t_iter = time.perf_counter()
            if self.config.log_iterations:
                dec = [s.n_cached for s in batch if s.n_cached > 0]
                pre = [len(s.tokens) for s in batch if s.n_cached == 0]
            try:
                tokens = self._iterate(batch)
            except (WorkerDied, _PoolUnavailable) as e:
                self.aborted_iterations += 1
                log.warning("iteration abandoned, will re-run: %s", e)
                time.sleep(0.001)
                continue
            except Exception as e:  # a bug or bad input: fail these requests, keep serving
                log.exception("iteration failed")
                with self._lock:
                    for s in batch:
                        self._finish(s, "error", message=f"{type(e).__name__}: {e}")
                continue
            if self.config.log_iterations:
                now = time.perf_counter()
                self.iteration_log.append(IterationRecord(now, now - t_iter, len(dec), float(np.mean(dec)) if dec else 0.0,
                                                          sum(pre), len(pre)))
            with self._lock:
                self._commit(batch, tokens)
            self.iterations += 1

    def _route(self, group: str) -> Replica:
        ready = [r for r in self.replicas[group] if r.state == READY]
        if not ready:
            raise _PoolUnavailable(f"no ready replica in pool {group!r}")
        return min(ready, key=lambda r: r.load)

    def _gather(self, futs: list[Future]) -> list[Any]:
        """Wait for every future (never leave work running), then raise the first failure."""
        wait(futs)
        errs = [f.exception() for f in futs if f.exception() is not None]
        if errs:
            raise errs[0]
        return [f.result() for f in futs]

    @staticmethod
    def _cat(parts: list[Any]) -> Any:
        if isinstance(parts[0], tuple):
            return tuple(Engine._cat([p[i] for p in parts]) for i in range(len(parts[0])))
        dev = parts[0].device
        return torch.cat([p.to(dev) for p in parts]) if len(parts) > 1 else parts[0]

    def _stage(self, group: str, fn: Callable[..., Any], rows: list[tuple[int, int]],
               tensors: tuple[torch.Tensor, ...], *lead: Any) -> Any:
        """Run ``fn(rep, *lead, *tensor_slices)`` over the calls :func:`pool_calls` cuts a stage
        of a pool into, each to the least-loaded ready replica."""
        mb = self._plan[group].max_batch
        n_ready = sum(r.state == READY for r in self.replicas[group])
        futs = []
        for r0, r1, seqs in pool_calls(rows, mb, n_ready, self.config.pool_dispatch):
            rep = self._route(group)
            futs.append(rep.submit(WorkItem(fn, (*lead, *(t[r0:r1] for t in tensors)), tokens=r1 - r0, seqs=seqs)))
        return self._cat(self._gather(futs))

    def _attn_stage(self, fn: Callable[..., Any], spans: list[tuple[Replica, int, int]], rows: list[tuple[int, int]],
                    tensors: tuple[torch.Tensor, ...], lead: tuple, per_seq: list[Any] | None = None) -> Any:
        """Like :meth:`_stage` but each chunk goes to the attention replica holding its sequences."""
        mb = self._plan["attn"].max_batch
        futs = []
        for rep, i0, i1 in spans:
            for c in range(i0, i1, mb):
                c1 = min(c + mb, i1)
                r0, r1 = rows[c][0], rows[c1 - 1][1]
                args = (*lead, *(t[r0:r1] for t in tensors))
                if per_seq is not None:
                    args = (*args, per_seq[c:c1])
                futs.append(rep.submit(WorkItem(fn, args, tokens=r1 - r0, seqs=c1 - c)))
        return self._cat(self._gather(futs))

    def _colocated(self, attn: Replica, lane_no: int, n_seqs: int) -> dict[str, Replica] | None:
        """Replicas of embed, proj, mlp and head to fuse with ``attn`` for a lane of ``n_seqs`` sequences.

        Each must be ready and sit in ``attn``'s placement slot on its device. A group whose
        ``max_batch`` is below ``n_seqs`` and that has ready replicas elsewhere is not
        fused: its per-group path spreads the lane's sub-batches over those replicas in
        parallel, which is what scaling such a group up is for. None when a group cannot be
        fused. Where a slot holds several replicas of a group, lanes take them in turn.
        """
        if not self.config.fuse_colocated or attn.kv is None:
            return None
        plan = self._plan
        peers = {}
        for g in ("embed", "proj", "mlp", "head"):
            ready = [r for r in self.replicas[g] if r.state == READY]
            here = [r for r in ready if not r.remote and r.slot == attn.slot and r.device == attn.device]
            if not here or (n_seqs > plan[g].max_batch and len(ready) > len(here)):
                return None
            peers[g] = here[lane_no % len(here)]
        return peers

    def _lane(self, attn: Replica, peers: dict[str, Replica], seqs: list[Sequence]) -> WorkItem:
        """The fused work item running ``seqs`` (all on ``attn``) through the whole model."""
        plan = self._plan
        meta, ids, bounds, last = [], [], [0], []
        for s in seqs:
            new = s.tokens[s.n_cached:]
            meta.append((s.id, len(new), s.n_cached))
            ids.extend(new)
            bounds.append(bounds[-1] + len(new))
            last.append(bounds[-1] - 1)
        n = len(seqs)

        def cuts(mb: int) -> list[tuple[int, int]]:
            return [(bounds[c], bounds[min(c + mb, n)]) for c in range(0, n, mb)]

        temps = torch.tensor([s.temperature for s in seqs], dtype=torch.float32)
        mb_head = plan["head"].max_batch
        lane = Lane(attn, peers, meta, torch.tensor(ids, dtype=torch.long), last,
                    {g: cuts(plan[g].max_batch) for g in ("embed", "proj", "mlp")},
                    [(c, min(c + mb_head, n)) for c in range(0, n, mb_head)], temps, bool((temps > 0).any()),
                    self._gens.get(peers["head"].id),
                    events=attn.items_done % max(self.config.fused_timing_every, 1) == 0)
        rows, L = bounds[-1], self.cfg.n_layers
        # token-steps per group, counted as the per-group path counts them (attn, proj: two calls per layer)
        parts = {"embed": [rows, n, 0.0], "attn": [2 * L * rows, n, 0.0], "proj": [2 * L * rows, n, 0.0],
                 "mlp": [L * rows, n, 0.0], "head": [n, n, 0.0]}
        item = WorkItem(_run_lane, (), tokens=rows, seqs=n, parts=parts)
        item.args = (lane, item)
        return item

    def _iterate(self, batch: list[Sequence]) -> list[int]:
        """One step for every sequence in ``batch``; returns the next token of each (not committed).

        Sequences of an attention replica whose slot holds a ready replica of every other
        group run as fused lanes (one work item each, at most attn ``max_batch`` sequences);
        the others go operator by operator through the pools' queues. Both kinds run at
        the same time.
        """
        batch.sort(key=lambda s: s.attn.id)  # type: ignore[union-attr]
        spans: list[list[Any]] = []
        for i, s in enumerate(batch):
            if not spans or spans[-1][0] is not s.attn:
                spans.append([s.attn, i, i + 1])
            else:
                spans[-1][2] = i + 1
        mb = self._plan["attn"].max_batch
        fused: list[tuple[Any, ...]] = []
        hop: list[Sequence] = []
        lane_no = 0
        for rep, i0, i1 in spans:
            for c in range(i0, i1, mb):
                c1 = min(c + mb, i1)
                peers = self._colocated(rep, lane_no, c1 - c)
                if peers is None:
                    hop.extend(batch[c:c1])
                    continue
                fused.append((c, c1, rep, self._lane(rep, peers, batch[c:c1])))
                lane_no += 1
        if len(fused) == 1 and not hop:  # one lane: run it here, no hand-off to a worker thread
            c, c1, rep, item = fused[0]
            fused = [(c, c1, rep.run_inline(item))]
        else:
            fused = [(c, c1, rep.submit(item)) for c, c1, rep, item in fused]
        try:
            hop_tokens = self._iterate_hops(hop) if hop else []
        finally:
            self._gather([f for _, _, f in fused])  # never leave work running
        out = [0] * len(batch)
        for c, c1, f in fused:
            out[c:c1] = f.result().tolist()
        pos = {id(s): i for i, s in enumerate(batch)}
        for s, t in zip(hop, hop_tokens):
            out[pos[id(s)]] = t
        return out

    @staticmethod
    def _micro_batches(batch: list[Sequence], m: int) -> list[list[Sequence]]:
        """Cut ``batch`` into at most ``m`` parts of about equal new tokens (a sequence is never
        split; the longest are placed first, each into the part with the fewest tokens, ties to
        the first). Each part keeps ``batch``'s order (sorted by attention replica)."""
        m = min(m, len(batch))
        if m <= 1:
            return [batch]
        new = [len(s.tokens) - s.n_cached for s in batch]
        load = [0] * m
        part = [0] * len(batch)
        for i in sorted(range(len(batch)), key=lambda i: -new[i]):
            k = load.index(min(load))
            part[i] = k
            load[k] += new[i]
        return [p for p in ([s for s, k in zip(batch, part) if k == j] for j in range(m)) if p]

    def _iterate_hops(self, batch: list[Sequence]) -> list[int]:
        """One step of ``batch`` (sorted by attention replica), every operator call a hop to its pool.

        The layers run per micro-batch (``EngineConfig.micro_batches`` / ``micro_batching``),
        the micro-batches at the same time; the LM head then samples for the whole batch in
        its order, so the sampling generators are drawn from as in an uncut iteration.
        """
        new_tokens = sum(len(s.tokens) - s.n_cached for s in batch)
        prefill = new_tokens > len(batch)
        if self.config.micro_batching == "fixed":
            m = self.config.micro_batches  # as many parts as there are sequences, at most
        else:
            m = self.micro.choose(prefill, new_tokens, len(batch))
        parts = self._micro_batches(batch, m)
        t0 = time.perf_counter()
        if len(parts) == 1:
            xl = self._layers_hops(batch)
        else:
            self.micro_batched_iterations += 1
            futs = [self._micro_pool.submit(self._layers_hops, p) for p in parts[1:]]  # type: ignore[union-attr]
            try:
                first = self._layers_hops(parts[0])
            finally:
                rest = self._gather(futs)  # never leave work running; raises the first failure
            at = {id(s): i for i, s in enumerate(batch)}
            order = [at[id(s)] for p in parts for s in p]
            cat = self._cat([first, *rest])
            xl = torch.empty_like(cat)
            xl[torch.tensor(order, device=cat.device)] = cat
        self.micro.record(prefill, new_tokens, len(parts), time.perf_counter() - t0)
        temps = torch.tensor([s.temperature for s in batch], dtype=torch.float32)
        mb = self._plan["head"].max_batch
        futs = []
        for c in range(0, len(batch), mb):
            c1 = min(c + mb, len(batch))
            rep = self._route("head")
            futs.append(rep.submit(WorkItem(_head, (xl[c:c1], temps[c:c1], self._gens.get(rep.id)),
                                            tokens=c1 - c, seqs=c1 - c)))
        out = self._cat(self._gather(futs))
        return [int(t) for t in out.tolist()]

    def _layers_hops(self, batch: list[Sequence]) -> torch.Tensor:
        """Embedding and every layer of ``batch`` (sorted by attention replica) through the
        pools; the hidden state of each sequence's last token, one row per sequence."""
        rows, ids, meta, spans = [], [], [], []
        row = 0
        for i, s in enumerate(batch):
            new = s.tokens[s.n_cached:]
            rows.append((row, row + len(new)))
            ids.extend(new)
            meta.append((s.id, len(new), s.n_cached))
            row += len(new)
            if not spans or spans[-1][0] is not s.attn:
                spans.append([s.attn, i, i + 1])
            else:
                spans[-1][2] = i + 1
        spans_t = [tuple(x) for x in spans]
        id_t = torch.tensor(ids, dtype=torch.long)
        x = self._stage("embed", _embed, rows, (id_t,))
        for layer in range(self.cfg.n_layers):
            a = self._attn_stage(_attn_norm, spans_t, rows, (x,), (layer,))
            q, k, v = self._stage("proj", _qkv, rows, (a,), layer)
            att = self._attn_stage(_attend, spans_t, rows, (q, k, v), (layer,), per_seq=meta)
            o = self._stage("proj", _o_proj, rows, (att,), layer)
            x = self._stage("mlp", _mlp, rows, (x, o), layer)
        last = torch.tensor([r1 - 1 for _, r1 in rows], device=x.device)
        return x[last]

    def _commit(self, batch: list[Sequence], tokens: list[int]) -> None:
        now = time.perf_counter()
        for s, t in zip(batch, tokens):
            if s.finished.is_set() or s not in self._running:
                continue
            s.n_cached = len(s.tokens)
            s.generated.append(t)
            idx = len(s.generated) - 1
            if s.first_token_s is None:
                s.first_token_s = now
                self.metrics.first_token(now - s.arrival_s)
            else:
                gap = now - (s.last_token_s or now)
                s.max_tbt_s = max(s.max_tbt_s, gap)
                self.metrics.next_token(gap)
                self._recent_tbt = 0.9 * self._recent_tbt + 0.1 * gap
            s.last_token_s = now
            if s.on_event is not None:
                s.on_event("token", t, idx)
            if len(s.generated) >= s.max_tokens:
                self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str, message: str | None = None) -> None:
        if s.finished.is_set():
            return
        if s.attn is not None and s.attn.kv is not None:
            s.attn.kv.release(s.id)
        if s in self._running:
            self._running.remove(s)
        s.finish_reason = reason
        if reason == "length":
            slo = self.config.slo
            ok = (s.first_token_s is not None and s.first_token_s - s.arrival_s <= slo.ttft_s
                  and s.max_tbt_s <= slo.tbt_s)
            self.metrics.finished(ok)
        else:
            self.metrics.finished(False, outcome=reason)
        s.finished.set()
        if s.on_event is not None:
            if reason in ("length",):
                s.on_event("done", reason, None)
            else:
                s.on_event("error", message or reason, None)

    # ---- observation ------------------------------------------------------------------
    def _gpus(self) -> tuple[int, list[torch.device]]:
        with self._lock:
            reps = [r for rs in self.replicas.values() for r in rs if r.alive]
        if self.config.device == "cuda":
            devs = sorted({d for r in reps for d in r.devices}, key=str)
            remote = math.ceil(self._remote.gpus() - 1e-9) if self._remote is not None else 0
            return len(devs) + remote, devs
        width: dict[str, int] = {}  # a slot is one GPU's worth; a replica at tp spans tp of them
        for r in reps:
            width[r.slot] = max(width.get(r.slot, 1), r.tp)
        return sum(width.values()), []

    def observe(self) -> ClusterState:
        """What a controller sees of the interval since the previous call.

        Per group: arrival rate = token-steps the group processed per second (a token-step
        is one token through one layer's operator, so attn/proj/mlp count ``n_layers`` per
        token and attn/proj twice per layer, as they are visited twice); queue = token-steps
        waiting in the group's replica queues now plus prompt tokens waiting for admission;
        utilisation = busy time / (interval x serving replicas); latency = queue wait +
        service of its batches. GPUs in use: distinct CUDA devices holding replicas or shards of
        them, plus the GPUs Ray reserves for Serve pools; on CPU the placement slots (see
        :func:`runtime.pools.assign_slots`), each as wide as its widest replica's tp. Power:
        NVML board power of the engine's CUDA devices, 0 W on CPU.
        """
        iv = self.metrics.take_interval()
        dt = max(iv.end_s - iv.start_s, 1e-9)
        with self._lock:
            waiting_tokens = sum(len(s.tokens) for s in self._waiting)
            plan = self._plan
            ops: dict[str, OperatorState] = {}
            for g in OPERATOR_GROUPS:
                reps = [r for r in self.replicas[g] if r.alive]
                serving = [r for r in reps if r.state in (READY, DRAINING)]
                gi = iv.groups[g]
                mem = sum(r.weight_bytes() + (r.kv.memory_bytes if r.kv is not None else 0)
                          for r in serving)
                ops[g] = OperatorState(
                    replicas=sum(r.state == READY for r in reps), max_batch=plan[g].max_batch,
                    placement=plan[g].placement, tp=plan[g].tp,
                    pending_replicas=sum(r.state == LOADING for r in reps),
                    arrival_rate=gi.tokens / dt,
                    queue_len=float(sum(r.queued_tokens() for r in reps) + waiting_tokens),
                    utilisation=min(gi.busy_s / (dt * max(len(serving), 1)), 1.0),
                    latency_p50_s=pct(gi.latencies_s, 50), latency_p99_s=pct(gi.latencies_s, 99),
                    memory_bytes=float(mem))
            kvs = [r.kv for r in self.replicas["attn"] if r.alive and r.kv is not None]
            kv_used = (sum(k.n_blocks - k.free_blocks for k in kvs) / max(sum(k.n_blocks for k in kvs), 1))
            queued, running = len(self._waiting), len(self._running)
        gpus, devs = self._gpus()
        power = self._nvml.power_w(devs) if self._nvml is not None else 0.0
        self._energy_j += power * dt
        self._history.append(iv.arrivals / dt)
        slo = self.config.slo
        for g in OPERATOR_GROUPS:
            o = ops[g]
            self.metrics.op_queue.labels(group=g).set(o.queue_len)
            self.metrics.op_max_batch.labels(group=g).set(o.max_batch)
        return ClusterState(
            time_s=iv.end_s - self.start_s, interval_s=dt, operators=ops, slo=slo, plan=plan,
            ttft_p50_s=pct(iv.ttft_s, 50), ttft_p99_s=pct(iv.ttft_s, 99),
            tbt_p50_s=pct(iv.tbt_s, 50), tbt_p99_s=pct(iv.tbt_s, 99),
            slo_attainment=iv.finished_ok / iv.finished if iv.finished else 1.0,
            gpus_in_use=float(gpus), power_w=power, energy_j=power * dt,
            request_rate_history=np.asarray(self._history, dtype=np.float64),
            prompt_tokens_mean=float(np.mean(iv.prompt_tokens)) if iv.prompt_tokens else 0.0,
            output_tokens_mean=float(np.mean(iv.output_tokens)) if iv.output_tokens else 0.0,
            queued_requests=queued, running_requests=running, rejected_requests=iv.rejected,
            kv_used_frac=float(kv_used))

    def refresh_gauges(self) -> None:
        """Update the Prometheus gauges that are read, not fed (replicas, queues, KV, GPUs)."""
        with self._lock:
            waiting_tokens = sum(len(s.tokens) for s in self._waiting)
            for g in OPERATOR_GROUPS:
                reps = self.replicas[g]
                for st in (LOADING, READY, DRAINING):
                    self.metrics.op_replicas.labels(group=g, state=st).set(sum(r.state == st for r in reps))
                self.metrics.op_queue.labels(group=g).set(sum(r.queued_tokens() for r in reps) + waiting_tokens)
                self.metrics.op_max_batch.labels(group=g).set(self._plan[g].max_batch)
            kvs = [r.kv for r in self.replicas["attn"] if r.alive and r.kv is not None]
            self.metrics.kv_used.set(sum(k.n_blocks - k.free_blocks for k in kvs) / max(sum(k.n_blocks for k in kvs), 1))
            self.metrics.running.set(len(self._running))
            self.metrics.waiting.set(len(self._waiting))
        self.metrics.gpus.set(self._gpus()[0])


class _Nvml:
    """Board power of CUDA devices via NVML (0 W when NVML is unavailable)."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
        except Exception:  # no driver / no library: report 0 W
            self._nv = None

    def power_w(self, devices: list[torch.device]) -> float:
        if self._nv is None:
            return 0.0
        total = 0.0
        for d in devices:
            try:
                h = self._nv.nvmlDeviceGetHandleByIndex(d.index or 0)
                total += self._nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            except Exception:
                continue
        return total
