"""The world model: where replicas sit, what memory they hold, and how long an iteration takes.

Entities (Vidur-style): a :class:`GPU` holds replicas of one or more operator groups; a
:class:`Layout` is a plan placed onto GPUs (memory checked, repaired or refused); a
:class:`StepModel` turns the load of one attention unit (the replica that holds a set of
sequences' KV cache) plus the load of the shared stateless pools into an iteration time.
Both fidelities (reference.py, fast.py) use these, so they can only disagree about
queueing, never about the physics.

Units: bytes, tokens, milliseconds inside the step model, seconds elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Mapping

import numpy as np

from runtime.colocation import co_residence
from runtime.control import OperatorPlan, Plan, PlanError
from runtime.models import OPERATOR_GROUPS

from envs import packkernel, stepkernel
from envs.memo import RecurringTable, put
from envs.predictor import ExecutionPredictor, quantise
from envs.scenario import Scenario

TP_LEVELS = (1, 2, 4, 8)
#: Pseudo-group of a whole-model instance (all groups placed ``model``).
MODEL = "model"
#: processes and GPU openers as envs/packkernel.py numbers them
_PROCS = (MODEL,) + tuple(OPERATOR_GROUPS)
_PROC_INDEX = {p: i for i, p in enumerate(_PROCS)}
_KINDS = {k: i for i, k in enumerate(packkernel.KINDS)}
_KIND_NAMES = packkernel.KINDS


@dataclass(slots=True)
class GPUClass:
    """``count`` identical GPUs: memory used on each (bytes) and the processes on each.

    A process is ``model`` (a whole-model instance) or a group name; ``procs`` maps it to the
    replica shards it has on each GPU of the class. ``kind`` says who opened the GPUs
    (``model``, ``dedicated`` or ``pack``).
    """

    count: int
    kind: str
    used_bytes: float
    procs: dict[str, int] = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.kind, round(self.used_bytes), tuple(sorted(self.procs.items())))


@dataclass
class Layout:
    """A plan placed on GPUs.

    Attributes:
        plan: the plan as placed (after repairs).
        repairs: what was changed to make it fit, one message per change.
        gpus: the GPUs in use, as classes of identical GPUs.
        mono: groups that are part of whole-model instances.
        instances: whole-model instances (0 when ``mono`` is empty).
        units: attention units (replicas holding KV; instances when attn is ``model``).
        unit_tp: tensor parallelism of an attention unit.
        unit_kv_tokens: KV-cache capacity of one attention unit (tokens).
        proc_gpus: GPUs each process (group or ``model``) occupies.
        peers: for each process, {process: co-resident shards per shard of it} (its own entry
            counts its other replicas on the same GPU; runtime/colocation.py).
        load_s: seconds a new replica of each group needs before it serves.
        memory_bytes: bytes each group's replicas hold in all.
        n_gpus: GPUs holding any replica (derived from ``gpus``).
        shared: whether any process shares GPUs with another shard (derived from ``peers``).
        ops_key: (group, replicas, max_batch, placement, tp) of each group in the plan's order (a
            hashable form of the plan's content: the simulators' key of its step model).
        power_terms: (count, ((process, shards), ...)) of each GPU class, in ``gpus`` order (what
            the energy accounting reads at each change of the serving layout).
    """

    plan: Plan
    repairs: list[str]
    gpus: list[GPUClass]
    mono: frozenset[str]
    instances: int
    units: int
    unit_tp: int
    unit_kv_tokens: float
    proc_gpus: dict[str, int]
    peers: dict[str, dict[str, float]]
    load_s: dict[str, float]
    memory_bytes: dict[str, float]
    n_gpus: int = field(init=False, repr=False)  # summed once: a layout never changes after placement
    shared: bool = field(init=False, repr=False)
    ops_key: tuple = field(init=False, repr=False)
    power_terms: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.n_gpus = sum(c.count for c in self.gpus)
        self.shared = any(self.peers.values())
        self.ops_key = tuple([(g, o.replicas, o.max_batch, o.placement, o.tp) for g, o in self.plan.ops.items()])
        self.power_terms = tuple([(c.count, tuple(c.procs.items())) for c in self.gpus])

    def __deepcopy__(self, memo: dict) -> "Layout":
        # the placer memoises layouts and hands the same object to every caller, so a layout is
        # never changed after placement: copies of a simulator share it (and keep the identity
        # checks of its caches meaningful)
        return self

    def proc_of(self, group: str) -> str:
        """The process a group runs in: ``model`` or the group itself."""
        return MODEL if group in self.mono else group


def shared_plan(table: RecurringTable, fields: tuple[tuple[int, int, str, int], ...]) -> Plan:
    """``table``'s Plan for ``fields`` ((replicas, max_batch, placement, tp) of each group in
    OPERATOR_GROUPS order), made and stored on a miss (kept while it recurs: ``RecurringTable``): one
    object per content, so the identity caches of its users hit when an equal plan comes back."""
    hit = table.get(fields)
    if hit is None:
        hit = table.put(fields, Plan({g: OperatorPlan(*f) for g, f in zip(OPERATOR_GROUPS, fields)}))
    return hit


_SORTED_GROUPS = tuple(sorted(OPERATOR_GROUPS))


def _plan_key(plan: Plan) -> tuple:
    """(group, replicas, max_batch, placement, tp) per group in name order: the placements' key.
    (A Plan has every group and no other, so no sorting of its items is needed.)"""
    ops = plan.ops
    key = []
    for g in _SORTED_GROUPS:
        o = ops[g]
        key.append((g, o.replicas, o.max_batch, o.placement, o.tp))
    return tuple(key)


class Placer:
    """Places plans onto GPUs for one scenario, checking memory; results are memoised."""

    def __init__(self, scenario: Scenario, pred: ExecutionPredictor) -> None:
        self.sc = scenario
        self.pred = pred
        self.cap = pred.gpu.memory_bytes * scenario.gpu_mem_util
        self._cache = RecurringTable()  # Layouts by plan content
        self._last: dict[int, tuple] = {}  # identity cache: plan objects repeat (target, serving)
        self._need: dict[tuple, float] = {}
        self._inst: dict[tuple, float] = {}
        self._per_rep: dict[tuple, tuple[float, float]] = {}
        self._plans = RecurringTable()  # plan_for's table
        self._served = RecurringTable()  # serving()'s table: (plan_for's plan, its layout) by fields
        #: whether packing runs compiled (envs/packkernel.py; OPSCALE_KERNEL=0 or no numba: Python)
        self._compiled = stepkernel.ENABLED
        if self._compiled:
            packkernel.warm()
            L = packkernel.MAX_CLASSES
            self._arrays = (np.zeros(L, dtype=np.int64), np.zeros(L, dtype=np.int64), np.zeros(L, dtype=np.float64),
                            np.zeros((L, len(_PROCS)), dtype=np.int64), np.full((L, len(_PROCS)), -1, dtype=np.int64),
                            np.zeros(L, dtype=np.int64),
                            # the co-residence table's: shares, process order, each row's order and length
                            np.zeros((len(_PROCS), len(_PROCS))), np.zeros(len(_PROCS), dtype=np.int64),
                            np.zeros((len(_PROCS), len(_PROCS)), dtype=np.int64), np.zeros(len(_PROCS), dtype=np.int64))

    # -------------------------------------------------------------- memory per GPU of one replica
    def _tokens(self, max_batch: int) -> int:
        return max_batch + self.sc.prefill_chunk_tokens

    def replica_need(self, group: str, op: OperatorPlan) -> float:
        """Bytes per GPU of one ``group`` replica at ``op.tp`` (weights, activations, KV reserve)."""
        key = (group, op.max_batch, op.tp)
        hit = self._need.get(key)
        if hit is None:
            hit = self._need[key] = self._replica_need(group, op)
        return hit

    def _need_at(self, group: str, max_batch: int, tp: int, placement: str) -> float:
        """``replica_need`` without building an OperatorPlan on a cache hit."""
        hit = self._need.get((group, max_batch, tp))
        if hit is None:
            hit = self.replica_need(group, OperatorPlan(1, max_batch, placement, tp))
        return hit

    def _replica_need(self, group: str, op: OperatorPlan) -> float:
        p = self.pred
        need = p.weight_bytes_per_gpu(group, op.tp) + p.activation_bytes_per_gpu(group, self._tokens(op.max_batch),
                                                                                  op.tp)
        if group == "attn":
            need += op.max_batch * self.sc.kv_reserve_tokens * p.kv_bytes_per_token / op.tp
        return need

    def instance_need(self, groups: frozenset[str], tp: int, max_batch: int) -> float:
        """Bytes per GPU of a whole-model instance without its KV (plus one full sequence of KV)."""
        key = (groups, tp, max_batch)
        hit = self._inst.get(key)
        if hit is None:
            hit = self._inst[key] = self._instance_need(groups, tp, max_batch)
        return hit

    def _instance_need(self, groups: frozenset[str], tp: int, max_batch: int) -> float:
        p = self.pred
        need = sum(p.weight_bytes_per_gpu(g, tp) + p.activation_bytes_per_gpu(g, self._tokens(max_batch), tp)
                   for g in OPERATOR_GROUPS if g in groups)  # (a fixed order: a set's depends on the hash seed)
        if "attn" in groups:
            need += p.cfg.max_seq_len * p.kv_bytes_per_token / tp
        return need

    # -------------------------------------------------------------- public
    def plan_for(self, fields: tuple[tuple[int, int, str, int], ...]) -> Plan:
        """One shared Plan per content: ``fields`` holds (replicas, max_batch, placement, tp) of
        each group in OPERATOR_GROUPS order. Plans are immutable, so callers that rebuild equal
        plans (the timeline's serving plans) get the same object back and the identity caches
        here and in the simulators hit (kept while they recur: ``envs.memo.RecurringTable``)."""
        return shared_plan(self._plans, fields)

    def serving(self, fields: tuple[tuple[int, int, str, int], ...]) -> tuple[Plan, Layout]:
        """(``plan_for(fields)``, ``place`` of it), from one lookup by ``fields`` once seen (the
        timeline's serving plans: a new one at each load completed, recurring on the streams
        training sends, where the identity cache of :meth:`place` had forgotten them)."""
        hit = self._served.get(fields)
        if hit is None:
            plan = self.plan_for(fields)
            hit = self._served.put(fields, (plan, self.place(plan)))
        return hit

    def place(self, plan: Plan) -> Layout:
        """Place ``plan``; repairs it to fit memory and ``max_gpus`` or raises PlanError."""
        last = self._last.get(id(plan))
        if last is not None and last[0] is plan:
            return last[1]
        key = _plan_key(plan)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache.put(key, self._place(plan))
        put(self._last, id(plan), (plan, hit), 256)  # holds the plan, so its id stays unique
        return hit

    def check(self, plan: Plan) -> list[str]:
        """Problems of ``plan`` as placed, empty when it fits unchanged (PlanError text if refused)."""
        try:
            return list(self.place(plan).repairs)
        except PlanError as e:
            return [str(e)]

    def _place(self, plan: Plan) -> Layout:
        repairs: list[str] = []
        plan = self._fit_tp(plan, repairs)
        while True:
            layout = self._layout(plan, repairs)
            if layout.n_gpus <= self.sc.max_gpus:
                return layout
            # Too many GPUs: take replicas from the process using the most GPUs, as many as
            # the excess needs (at least one), keeping one replica per group.
            excess = layout.n_gpus - self.sc.max_gpus
            per = {g: layout.proc_gpus.get(layout.proc_of(g), 0) for g in OPERATOR_GROUPS}
            for g in sorted(per, key=lambda k: -per[k]):
                if plan[g].replicas > 1:
                    groups = [h for h in OPERATOR_GROUPS if layout.proc_of(h) == layout.proc_of(g)]
                    per_rep = max(per[g] // max(plan[g].replicas, 1), 1)
                    drop = min(max(-(-excess // per_rep), 1), plan[g].replicas - 1)
                    ops = dict(plan.ops)
                    for h in groups:
                        ops[h] = OperatorPlan(plan[h].replicas - drop, plan[h].max_batch, plan[h].placement,
                                              plan[h].tp)
                    repairs.append(f"plan needs {layout.n_gpus} GPUs, more than max_gpus={self.sc.max_gpus}: "
                                   f"{'+'.join(groups)} replicas {plan[g].replicas} -> {plan[g].replicas - drop}")
                    plan = Plan(ops)
                    break
            else:
                raise PlanError(f"plan needs {layout.n_gpus} GPUs with one replica per group, more than "
                                f"max_gpus={self.sc.max_gpus}")

    def _fit_tp(self, plan: Plan, repairs: list[str]) -> Plan:
        ops = dict(plan.ops)
        mono = frozenset(g for g in OPERATOR_GROUPS if ops[g].placement == "model")
        gb = 1e9
        if mono:
            tp = ops["attn"].tp if "attn" in mono else max(ops[g].tp for g in mono)
            # an instance is where attention (the KV) lives: its count follows attention
            n = ops["attn"].replicas if "attn" in mono else max(ops[g].replicas for g in mono)
            mb = ops["attn"].max_batch if "attn" in mono else max(ops[g].max_batch for g in mono)
            if any(ops[g].tp != tp or ops[g].replicas != n for g in mono):
                repairs.append(f"groups placed 'model' form one instance: set {sorted(mono)} to "
                               f"{n} replicas at tp={tp}")
            new_tp = tp
            while self.instance_need(mono, new_tp, mb) > self.cap:
                bigger = [t for t in TP_LEVELS if t > new_tp]
                if not bigger:
                    raise PlanError(f"a whole-model instance of {self.pred.model_name} needs "
                                    f"{self.instance_need(mono, new_tp, mb) / gb:.1f} GB per GPU even at tp={new_tp}, "
                                    f"more than the {self.cap / gb:.1f} GB usable on {self.pred.gpu_name}")
                new_tp = bigger[0]
            if new_tp != tp:
                repairs.append(f"whole-model instance needs {self.instance_need(mono, tp, mb) / gb:.1f} GB per GPU "
                               f"at tp={tp}, more than {self.cap / gb:.1f} GB usable: tp -> {new_tp}")
            for g in mono:
                o = ops[g]
                if o.replicas != n or o.tp != new_tp:
                    ops[g] = OperatorPlan(n, o.max_batch, "model", new_tp)
        for g in OPERATOR_GROUPS:
            op = ops[g]
            if g in mono:
                continue
            tp = op.tp
            mb = op.max_batch
            while self._need_at(g, mb, tp, op.placement) > self.cap:
                bigger = [t for t in TP_LEVELS if t > tp]
                if bigger:
                    tp = bigger[0]
                elif mb > 1:
                    mb = max(mb // 2, 1)
                else:
                    raise PlanError(f"one {g} replica needs {self.replica_need(g, op) / gb:.1f} GB per GPU at "
                                    f"tp=8, more than {self.cap / gb:.1f} GB usable on {self.pred.gpu_name}")
            if tp != op.tp or mb != op.max_batch:
                repairs.append(f"{g} replica needs {self.replica_need(g, op) / gb:.1f} GB per GPU at tp={op.tp}, "
                               f"max_batch={op.max_batch}, more than {self.cap / gb:.1f} GB usable: "
                               f"tp -> {tp}, max_batch -> {mb}")
                ops[g] = OperatorPlan(op.replicas, mb, op.placement, tp)
        if all(ops[g] is plan.ops[g] for g in OPERATOR_GROUPS):
            return plan  # fits as given (the Plan is immutable)
        return Plan(ops)

    def _layout(self, plan: Plan, repairs: list[str]) -> Layout:
        sc, p, cap = self.sc, self.pred, self.cap
        mono = frozenset(g for g in OPERATOR_GROUPS if plan[g].placement == "model")
        classes: list[GPUClass] = []
        instances = 0
        inst_tp = 1
        if mono:
            ref = plan["attn"] if "attn" in mono else plan[sorted(mono)[0]]
            instances, inst_tp = ref.replicas, ref.tp
            need = self.instance_need(mono, inst_tp, ref.max_batch)
            if "attn" in mono:
                need -= p.cfg.max_seq_len * p.kv_bytes_per_token / inst_tp  # KV takes what is left later
            classes.append(GPUClass(instances * inst_tp, "model", need, {MODEL: 1}))
        for g in OPERATOR_GROUPS:
            op = plan[g]
            if g in mono or op.placement != "dedicated":
                continue
            classes.append(GPUClass(op.replicas * op.tp, "dedicated", self.replica_need(g, op), {g: 1}))
        packed = [g for g in OPERATOR_GROUPS if g not in mono and plan[g].placement == "pack"]
        packed.sort(key=lambda g: -self.replica_need(g, plan[g]))
        peers = None  # the co-residence table, when the compiled packing made it with the classes
        if packed:
            got = self._pack_compiled(classes, packed, plan) if self._compiled else None
            if got is not None:
                classes, peers = got
            else:
                classes = self._pack(classes, packed, plan)
        # KV capacity of an attention unit: what its GPUs have left
        kvb = p.kv_bytes_per_token
        if "attn" in mono:
            units, unit_tp = instances, inst_tp
            free = min((cap - c.used_bytes for c in classes if MODEL in c.procs), default=0.0)
            unit_kv = max(free, 0.0) * inst_tp / kvb
        else:
            a = plan["attn"]
            units, unit_tp = a.replicas, a.tp
            reserve = a.max_batch * sc.kv_reserve_tokens
            if a.placement == "dedicated":
                free = min((cap - c.used_bytes for c in classes if "attn" in c.procs), default=0.0)
                unit_kv = reserve + max(free, 0.0) * a.tp / kvb
            else:
                unit_kv = float(reserve)
        for c in classes:
            if c.used_bytes > cap * (1 + 1e-9):  # cannot happen: placement checks the fit
                raise PlanError(f"{c.count} GPUs would hold {c.used_bytes / 1e9:.1f} GB each, more than "
                                f"{cap / 1e9:.1f} GB usable")
        proc_gpus: dict[str, int] = {}
        for c in classes:
            for proc in c.procs:
                proc_gpus[proc] = proc_gpus.get(proc, 0) + c.count
        if peers is None:
            peers = co_residence((c.count, c.procs) for c in classes)
        load_s = {}
        memory = {}
        mono_w = sum(p.weight_bytes_per_gpu(h, inst_tp) for h in OPERATOR_GROUPS if h in mono) if mono else 0
        per_rep = self._per_rep
        for g in OPERATOR_GROUPS:
            op = plan[g]
            tp = inst_tp if g in mono else op.tp
            key = (g, tp, op.max_batch)
            hit = per_rep.get(key)
            if hit is None:
                # (load seconds of a dedicated replica, bytes of one replica over its tp GPUs)
                hit = per_rep[key] = (
                    sc.replica_start_s + p.weight_bytes_per_gpu(g, tp) / sc.load_bw_bytes_per_s,
                    (p.weight_bytes_per_gpu(g, tp) + p.activation_bytes_per_gpu(g, self._tokens(op.max_batch), tp))
                    * tp)
            load_s[g] = sc.replica_start_s + mono_w / sc.load_bw_bytes_per_s if g in mono else hit[0]
            memory[g] = hit[1] * op.replicas
        memory["attn"] += units * unit_kv * kvb
        return Layout(plan=plan, repairs=list(repairs), gpus=classes, mono=mono, instances=instances, units=units,
                      unit_tp=unit_tp, unit_kv_tokens=unit_kv, proc_gpus=proc_gpus, peers=peers, load_s=load_s,
                      memory_bytes=memory)


    def _pack(self, classes: list[GPUClass], packed: list[str], plan: Plan) -> list[GPUClass]:
        """Add the replicas of the ``packed`` groups (in that order) to the GPU ``classes``: each
        replica's tp shards go to the GPUs with the least free memory that fit it (ties: GPUs that
        already host the group), identical GPUs merged into classes. The reference for
        :meth:`_pack_compiled`."""
        cap = self.cap
        for g in packed:
            op = plan[g]
            need = self.replica_need(g, op)
            for _ in range(op.replicas):
                left = op.tp
                # best fit: least free memory first; ties prefer GPUs already hosting this group
                cands = [c for c in classes if c.kind != "dedicated" and cap - c.used_bytes >= need]
                if len(cands) > 1:
                    cands.sort(key=lambda c: (cap - c.used_bytes, -c.procs.get(g, 0)))
                for c in cands:
                    if left == 0:
                        break
                    k = min(left, c.count)
                    if k < c.count:
                        classes.append(GPUClass(c.count - k, c.kind, c.used_bytes, dict(c.procs)))
                        c.count = k
                    c.used_bytes += need
                    c.procs[g] = c.procs.get(g, 0) + 1
                    left -= k
                if left:
                    classes.append(GPUClass(left, "pack", need, {g: 1}))
                if len(classes) > 8:
                    classes = _merge(classes)
            classes = _merge(classes)
        return classes

    def _pack_compiled(self, classes: list[GPUClass], packed: list[str],
                       plan: Plan) -> tuple[list[GPUClass], dict[str, dict[str, float]]] | None:
        """:meth:`_pack` in compiled code (envs/packkernel.py), the same classes in the same order,
        and their co-residence table (``runtime.colocation.co_residence`` of them, computed on the
        kernel's arrays); None when the placement would outgrow the kernel's arrays."""
        n0 = len(classes)
        cnt, kind, used, pc, order, npr = self._arrays[:6]
        if n0 > cnt.shape[0]:
            return None
        pc[:n0] = 0
        order[:n0] = -1
        for i, c in enumerate(classes):
            cnt[i], kind[i], used[i], npr[i] = c.count, _KINDS[c.kind], c.used_bytes, len(c.procs)
            for j, (proc, k) in enumerate(c.procs.items()):
                p = _PROC_INDEX[proc]
                pc[i, p] = k
                order[i, j] = p
        ops = plan.ops
        ints = np.asarray([[_PROC_INDEX[g] for g in packed], [ops[g].replicas for g in packed],
                           [ops[g].tp for g in packed]], dtype=np.int64)
        n = packkernel.pack(n0, cnt, kind, used, pc, order, npr, ints[0], ints[1], ints[2],
                            np.asarray([self.replica_need(g, ops[g]) for g in packed], dtype=np.float64), self.cap)
        if n < 0:
            return None
        share, porder, sorder, slen = self._arrays[6:]
        m = packkernel.co_residence(n, cnt, pc, order, npr, share, porder, sorder, slen)
        kinds, pcs, orders, nprs = kind[:n].tolist(), pc[:n].tolist(), order[:n].tolist(), npr[:n].tolist()
        out = [GPUClass(c, _KIND_NAMES[kinds[i]], u, {_PROCS[p]: pcs[i][p] for p in orders[i][:nprs[i]]})
               for i, (c, u) in enumerate(zip(cnt[:n].tolist(), used[:n].tolist()))]
        shares, sorders, slens = share[:m].tolist(), sorder[:m].tolist(), slen[:m].tolist()
        peers = {_PROCS[p]: {_PROCS[o]: shares[a][o] for o in sorders[a][:slens[a]]}
                 for a, p in enumerate(porder[:m].tolist())}
        return out, peers


def _merge(classes: list[GPUClass]) -> list[GPUClass]:
    """Merge classes of identical GPUs (same opener, memory and processes)."""
    out: dict[tuple, GPUClass] = {}
    for c in classes:
        if c.count <= 0:
            continue
        k = c.key()
        if k in out:
            out[k].count += c.count
        else:
            out[k] = c
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# Iteration time
# ---------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    """One iteration of an attention unit.

    Attributes:
        ms: iteration time (ms).
        busy: per process, busy share of the iteration (0..1) on each of its replicas.
    """

    ms: float
    busy: dict[str, float]


class StepShape:
    """The part of a :class:`StepModel` fixed by which groups form whole-model instances
    (``mono``) and each group's tp: where each group runs, the ring of stages a layer passes,
    the processes, the micro-batch choices. Plans that differ only in replica counts, batch
    limits and co-residence share one (read-only; :class:`StepModel` copies the attributes it
    shares, and fills its per-plan tables from ``groups``, ``stage_tab`` and ``ends``)."""

    __slots__ = ("layers", "qkv_frac", "local", "local_proc", "tp", "site", "sites", "stages", "hops", "remote",
                 "m", "m_choices", "slack", "fill", "remote_index", "groups", "stage_tab", "ends", "procs",
                 "bytes_per_token", "kernel")

    def __init__(self, mono: frozenset[str], tps: tuple[int, ...], pred: ExecutionPredictor,
                 scenario: Scenario) -> None:
        cfg = pred.cfg
        self.layers = cfg.n_layers
        q = cfg.qkv_out * cfg.d_model
        o = cfg.n_heads * cfg.head_dim * cfg.d_model
        self.qkv_frac = q / (q + o)
        attn_local = "attn" in mono
        #: groups on the unit's own GPUs
        self.local = set(mono) if attn_local else {"attn"}
        #: the process of the unit itself: a whole-model instance or an attention replica
        self.local_proc = MODEL if attn_local else "attn"
        self.tp = dict(zip(OPERATOR_GROUPS, tps))
        self.site = {}
        for g in OPERATOR_GROUPS:
            if g in self.local:
                self.site[g] = "local"
            elif g in mono:
                self.site[g] = MODEL
            else:
                self.site[g] = g
        self.sites = tuple(self.site[g] for g in OPERATOR_GROUPS)
        ring = [("proj", self.qkv_frac), ("attn", 1.0), ("proj", 1.0 - self.qkv_frac), ("mlp", 1.0)]
        stages: list[tuple[str, list[tuple[str, float]]]] = []
        for g, frac in ring:
            s = self.site[g]
            if stages and stages[-1][0] == s:
                stages[-1][1].append((g, frac))
            else:
                stages.append((s, [(g, frac)]))
        if len(stages) > 1 and stages[0][0] == stages[-1][0]:
            first = stages.pop(0)
            stages[-1][1].extend(first[1])
        self.stages = stages
        self.hops = len(stages) if len(stages) > 1 else 0
        #: whether any group runs outside the unit (then the load of other units matters)
        self.remote = any(site != "local" for site in self.site.values())
        #: the most micro-batches an iteration is cut into, and the counts it may choose from
        self.m = scenario.micro_batches if self.hops else 1
        self.m_choices = tuple(range(1, self.m + 1)) if scenario.micro_batching == "adaptive" else (self.m,)
        #: accepted slowdown for fewer micro-batches (adaptive only; 0 = the fastest count)
        self.slack = float(scenario.micro_batch_slack) if len(self.m_choices) > 1 else 0.0
        #: decode-only calls to remote pools go to the fewest replicas (pool_dispatch: fill)
        self.fill = scenario.pool_dispatch == "fill"
        #: indices (in OPERATOR_GROUPS) of the groups outside the unit (the signature's pools)
        self.remote_index = tuple(i for i, g in enumerate(OPERATOR_GROUPS) if self.site[g] != "local")
        # the ring's distinct groups in first-use order as (kind, group, tp, index in
        # OPERATOR_GROUPS) with kind 0 = attention, 1 = on the unit's GPUs, 2 = a shared remote
        # pool; the stages as (process, ((index of the group, fraction of its time), ...)); embed
        # and head as (group, local, process, tp, index in OPERATOR_GROUPS)
        gi = {g: i for i, g in enumerate(OPERATOR_GROUPS)}
        order: dict[str, int] = {}
        groups = []
        stage_tab = []
        procs: dict[str, None] = {}
        for site, ops in stages:
            local = site == "local"
            proc = self.local_proc if local else site
            procs[proc] = None
            row = []
            for g, frac in ops:
                i = order.get(g)
                if i is None:
                    i = order[g] = len(groups)
                    groups.append((0 if g == "attn" else (1 if local else 2), g, self.tp[g], gi[g]))
                row.append((i, frac))
            stage_tab.append((proc, tuple(row)))
        self.groups = tuple(groups)
        self.stage_tab = tuple(stage_tab)
        ends = []
        for g in ("embed", "head"):
            local = self.site[g] == "local"
            proc = self.local_proc if local else (MODEL if g in mono else g)
            procs[proc] = None
            ends.append((g, local, proc, self.tp[g], gi[g]))
        self.ends = tuple(ends)
        self.procs = tuple(procs)
        self.bytes_per_token = cfg.d_model * cfg.dtype_bytes
        #: envs/stepkernel.py's template of this shape's kernel arrays (made on first use)
        self.kernel = None

    def __deepcopy__(self, memo: dict) -> "StepShape":
        # read-only once made (the kernel template is filled once, deterministically): copies of
        # a simulator share it, as they share the step models built on it
        return self


class StepModel:
    """Iteration time of an attention unit under a layout (see docs/SIMULATOR.md, "Step").

    Per layer a token passes QKV projection -> attention -> O projection -> MLP. Operators
    on the unit's own GPUs ("local") run back to back; operators on other pools are
    "sites" reached by a send/recv hop each way. With m micro-batches the batch is cut
    into m micro-batches that ping-pong around the ring of stages (compute stages and
    hops), so one layer takes max(m * slowest stage, sum of stages) with stage times at
    the micro-batch size: balanced pools hide transfers and idle time, unbalanced ones
    expose them. m is the scenario's ``micro_batches``, or with ``micro_batching:
    adaptive`` the count in 1..micro_batches with the shortest iteration (ties to fewer):
    a memory-bound GEMM takes about as long for half the tokens, so splitting a decode-only
    batch gains no overlap and reads the weights m times, while a prefill chunk's
    compute-bound stages overlap. Stateless remote pools merge the concurrent micro-batches of all units
    (per replica: total tokens / replicas, split into calls of at most max_batch
    sequences). Co-located processes slow each other by ``1 + contention * peer busy``.
    """

    def __deepcopy__(self, memo: dict) -> "StepModel":
        # memoised per layout by the simulators and never changed but for deterministic memo
        # tables: copies of a simulator share it, as they share the layout
        return self

    def __init__(self, layout: Layout, pred: ExecutionPredictor, scenario: Scenario,
                 shapes: dict | None = None) -> None:
        """``shapes``: a table of :class:`StepShape` to share (one per predictor and scenario, e.g.
        the simulator's cache), so plans that differ only in replica counts, batch limits and
        co-residence build the ring once; None builds it here."""
        self.L = layout
        self.p = pred
        self.sc = scenario
        plan = layout.plan
        tps = tuple(plan[g].tp for g in OPERATOR_GROUPS)
        if shapes is None:
            sh = StepShape(layout.mono, tps, pred, scenario)
        else:
            key = (layout.mono, tps)
            sh = shapes.get(key)
            if sh is None:
                sh = put(shapes, key, StepShape(layout.mono, tps, pred, scenario), 64)
        #: the structure this model shares with every plan of the same instances and tp
        self.shape = sh
        self.layers = sh.layers
        self.qkv_frac = sh.qkv_frac
        self.local = sh.local
        self.local_proc = sh.local_proc
        self.tp = sh.tp
        self.site = sh.site
        self.stages = sh.stages
        self.hops = sh.hops
        self.remote = sh.remote
        self.m = sh.m
        self.m_choices = sh.m_choices
        self.slack = sh.slack
        self.fill = sh.fill
        ops = plan.ops
        reps = [max(ops[g].replicas, 1) for g in OPERATOR_GROUPS]
        mbs = [ops[g].max_batch for g in OPERATOR_GROUPS]
        self.replicas = dict(zip(OPERATOR_GROUPS, reps))
        self.max_batch = dict(zip(OPERATOR_GROUPS, mbs))
        #: everything the iteration time depends on besides the load (for memo keys shared
        #: across plans): sites, tp, remote pools' replicas and batch limits, peers
        self.signature = (
            sh.sites, tps, tuple((reps[i], mbs[i]) for i in sh.remote_index), self.m_choices, self.slack,
            self.fill, self.local_proc,
            tuple(sorted((k, tuple(sorted(v.items()))) for k, v in layout.peers.items() if v)))
        # tables for iteration() (see StepShape): the ring's groups with this plan's replicas and
        # batch limits, the stages, embed and head with their replicas
        self._peers = {proc: tuple(v.items()) for proc, v in layout.peers.items() if v}
        self._groups = tuple((kind, g, tp, reps[i], mbs[i]) for kind, g, tp, i in sh.groups)
        self._stages = sh.stage_tab
        self._ends = tuple((g, local, proc, tp, reps[i]) for g, local, proc, tp, i in sh.ends)
        #: whether any process shares GPUs with another (else every slowdown is exactly 1)
        self._has_peers = bool(self._peers)
        self._slow_cache: tuple = (None, {})  # (util items, {process: slowdown}) of the last call
        #: every process a stage or an end runs in (the slowdown table's keys)
        self._procs = sh.procs
        #: bytes of one token's hidden state (send_ms's transfer size per token)
        self._bytes_per_token = sh.bytes_per_token
        #: this step model as envs/stepkernel.py's compiled code reads it (made on first use)
        self._kernel = None

    def contention(self, proc: str, util: Mapping[str, float]) -> float:
        """Slowdown factor of ``proc`` given the busy share of the processes it shares GPUs with."""
        peers = self.L.peers.get(proc)
        if not peers:
            return 1.0
        return 1.0 + self.sc.contention * sum(share * min(max(util.get(o, 0.0), 0.0), 1.0)
                                               for o, share in peers.items())

    def iteration(self, n_dec: float, ctx_dec: float, p_tok: float, ctx_pre: float, n_pre: float,
                  tot_tokens: float, tot_seqs: float, util: Mapping[str, float] | None = None) -> StepResult:
        """Time one iteration of a unit.

        Args:
            n_dec: decoding sequences in the unit's batch.
            ctx_dec: their mean KV length (tokens).
            p_tok: prompt tokens prefilled this iteration (chunk).
            ctx_pre: mean prompt length of the sequences being prefilled (tokens).
            n_pre: sequences being prefilled.
            tot_tokens: tokens per iteration summed over all units (for merged remote pools).
            tot_seqs: sequences summed over all units.
            util: busy share of each process last interval (contention); None = no contention.
        """
        util = util or {}
        tokens = n_dec + p_tok
        if tokens <= 0:
            return StepResult(0.0, {})
        p = self.p
        if tot_tokens < tokens:
            tot_tokens = tokens
        if tot_seqs < n_dec + n_pre:
            tot_seqs = n_dec + n_pre
        slow = self.slowdowns(util)
        # the layers at each allowed micro-batch count; the fastest wins (ties: fewer), or with
        # micro_batch_slack the fewest within (1 + slack) of the fastest
        timed = [self._layers(m, n_dec, ctx_dec, p_tok, ctx_pre, n_pre, tokens, tot_tokens, tot_seqs, slow)
                 for m in self.m_choices]
        best_ms, busy_ms = self.pick(timed)
        total = best_ms
        send = p._send  # bytes -> ms
        bpt = self._bytes_per_token
        group = p._group
        # embed and head, once per step: local or one hop away
        for g, local, proc, tp, r in self._ends:
            tok = tokens if g == "embed" else n_dec + n_pre
            if local:
                t = group(g, quantise(tok), 0, 1, tp, "decode") if tok > 0 else 0.0  # = p.group_ms(g, tok, tp=tp)
            else:
                x = tot_tokens / r if g == "embed" else tot_seqs / r
                t = group(g, quantise(x), 0, 1, tp, "decode") if x > 0 else 0.0
            if slow is not None:
                t *= slow[proc]
            if not local:
                t += send(quantise(tok) * bpt) if tok > 0 else 0.0  # = p.send_ms(tok)
            total += t
            busy_ms[proc] = busy_ms.get(proc, 0.0) + t
        kernel = total
        total = p.step_ms(kernel, n_dec, kernel * p_tok / tokens)
        busy = {k: min(v / total, 1.0) for k, v in busy_ms.items()}
        return StepResult(total, busy)

    def slowdowns(self, util: Mapping[str, float]) -> dict[str, float] | None:
        """Slowdown of each process (:meth:`contention` of every process a stage or an end runs
        in) at the busy shares ``util``; None when no process shares GPUs (every slowdown 1).
        Computed once per util snapshot (the last one is kept)."""
        if not self._has_peers:
            return None
        items = tuple(util.items())
        cached = self._slow_cache
        if cached[0] == items:
            return cached[1]
        slow = {proc: self.slowdown(proc, util) for proc in self._procs}
        self._slow_cache = (items, slow)
        return slow

    def slowdown(self, proc: str, util: Mapping[str, float]) -> float:
        """Slowdown of process ``proc`` at the busy shares ``util``: 1 + contention x the busy
        shares of its co-resident shards (runtime/colocation.py), uncached."""
        peers = self._peers.get(proc)
        return 1.0 + self.sc.contention * sum(share * min(max(util.get(o, 0.0), 0.0), 1.0)
                                              for o, share in peers) if peers else 1.0

    def pick(self, timed: list[tuple[float, dict[str, float]]]) -> tuple[float, dict[str, float]]:
        """The micro-batch count's result an iteration runs, from ``timed`` (one ``_layers`` result
        per count of ``m_choices``, in order): the fastest, ties to fewer micro-batches; with
        ``micro_batch_slack`` the fewest within ``1 + slack`` of the fastest."""
        best = min(timed, key=itemgetter(0))  # the first of equals: fewer micro-batches
        if self.slack:
            bound = best[0] * (1.0 + self.slack)
            best = next(r for r in timed if r[0] <= bound)  # fewest micro-batches first
        return best

    def _layers(self, m: int, n_dec: float, ctx_dec: float, p_tok: float, ctx_pre: float, n_pre: float,
                tokens: float, tot_tokens: float, tot_seqs: float,
                slow: dict[str, float] | None) -> tuple[float, dict[str, float]]:
        """(ms of all layers, busy ms per process) of one iteration cut into ``m`` micro-batches."""
        p = self.p
        L = self.layers
        # the predictor's memo tables, called as group_ms / send_ms call them (tokens > 0 there)
        group = p._group  # (group, quantised tokens, context, batch, tp, phase) -> ms
        tok_m = tokens / m
        # ms of each group (all layers) for one micro-batch as this unit sees it
        gts = []
        q_tok_m = -1
        fill = self.fill
        share = [1.0] * len(self._groups)  # busy share of a call's time per replica of each group
        for i, (kind, g, tp, r, mb) in enumerate(self._groups):
            if kind == 0:  # attention: decode kernel over the decodes, prefill kernel over the chunk
                gt = 0.0
                if n_dec > 0:
                    q = quantise(n_dec / m)  # = p.group_ms("attn", n_dec / m, ctx_dec, n_dec / m, tp, "decode")
                    gt += group("attn", q, quantise(ctx_dec), q, tp, "decode")
                if p_tok > 0:
                    gt += group("attn", quantise(p_tok / m), quantise(ctx_pre), quantise(max(n_pre / m, 1)), tp,
                                "prefill")  # = p.group_ms("attn", p_tok / m, ctx_pre, max(n_pre / m, 1), tp, "prefill")
            elif kind == 1:  # on the unit's own GPUs, at the unit's micro-batch
                if q_tok_m < 0:
                    q_tok_m = quantise(tok_m)
                gt = group(g, q_tok_m, 0, 1, tp, "decode")
            else:  # a shared remote pool: every unit's tokens, in calls of at most max_batch sequences
                k = r  # replicas taking part (pool_dispatch)
                if fill and tot_tokens <= tot_seqs and tot_seqs < r * mb:
                    k = min(r, max(1, math.ceil(tot_seqs / mb)))  # decodes only: the fewest replicas
                    share[i] = k / r
                seqs = tot_seqs / k
                calls = max(1.0, seqs / mb)
                per_call = tot_tokens / k / calls / m
                gt = (group(g, quantise(per_call), 0, 1, tp, "decode") if per_call > 0 else 0.0) * calls
            gts.append(gt)
        busy_ms: dict[str, float] = {}
        stage_ms = []
        for proc, ops in self._stages:
            t = 0
            b = 0  # busy ms of one replica of the process: t, less the replicas a filled call leaves idle
            for i, frac in ops:
                x = frac * gts[i] / L
                t += x
                b += x * share[i]
            if slow is not None:
                t *= slow[proc]
                b *= slow[proc]
            stage_ms.append(t)
            busy_ms[proc] = busy_ms.get(proc, 0.0) + b * m * L
        if self.hops:
            hop_ms = p._send(quantise(tok_m) * self._bytes_per_token)  # = p.send_ms(tok_m)
            ring = stage_ms + [hop_ms] * self.hops
            layer_ms = max(m * max(ring), sum(ring))
        else:
            layer_ms = sum(stage_ms)
        return L * layer_ms, busy_ms
