"""Fixed-budget mode for any controller: top its plans up to the GPUs already paid for.

An autoscaler that saves GPUs (every controller here) leaves some idle when the cluster is a
fixed budget: there the GPUs are sunk cost and a replica that is not running is capacity
thrown away. :class:`BudgetFill` wraps a controller for that deployment, with one of two rules
(``utilisation`` by default: it sustained the higher rate on the val split, docs/RESULTS.md):

* ``proportional`` (:func:`fill_plan`): each plan the inner controller returns is scaled up,
  keeping its proportions: every group's replica count becomes ``max(r, round(r x f))`` with
  the largest factor ``f`` (found by bisection) whose plan still fits ``budget_gpus``; then
  single replicas are added while they fit, each to the group scaled least so far and none
  beyond the largest factor a group already reached.
* ``utilisation`` (:func:`fill_by_utilisation`): spare GPUs go one replica at a time to the
  group whose replicas would be busiest, from the busy shares measured last interval
  (water-filling).

Under both, whole-model plans become ``budget // tp`` instances.

The GPU count of a plan comes from the controller side's own placement model
(:meth:`agents.operator_queueing.PlanModel.pack`, the best fit the simulator and the runtime
use for ``pack`` placement), so the wrapper runs unchanged in the simulator and the live
runtime (which counts its own placement slots instead, runtime/controllers.py
``with_budget``). Plans it cannot count (``dedicated`` pools, mixed placements, a
tensor-parallel degree other than the deployment's) pass through unchanged. Plans that ask for
more than the budget are left to the caller's repair (the simulator's), or shrunk by
:func:`cap_plan` with ``cap=True`` (the live runtime, which has no budget of its own).

Units: GPUs (whole devices), replicas.
"""
from __future__ import annotations

from typing import Callable, Mapping

from agents.context import ControllerContext
from runtime.control import ClusterState, Controller, OperatorPlan, Plan
from runtime.models import OPERATOR_GROUPS

#: how spare GPUs are spent (see :class:`BudgetFill`)
FILL_RULES = ("proportional", "utilisation")
#: bisection steps on the scale factor (the factor is known to within max_factor / 2**steps)
_STEPS = 24


def pack_gpu_counter(ctx: ControllerContext) -> Callable[[Plan], int | None]:
    """``count(plan)``: GPUs the plan needs, or None for plans this model does not cover.

    Whole-model plans (every group ``model``): instances x tp. All-``pack`` plans at the
    deployment's per-group tp: the best-fit packing of operator-queueing's planning model.
    """
    from agents.operator_queueing import OperatorQueueingConfig, PlanModel

    model = PlanModel(ctx, OperatorQueueingConfig())

    def count(plan: Plan) -> int | None:
        ops = plan.ops
        if all(o.placement == "model" for o in ops.values()):
            return int(ops["attn"].replicas) * int(ops["attn"].tp)
        if all(o.placement == "pack" and o.tp == ctx.tp_of(g) for g, o in ops.items()):
            return model.pack({g: ops[g].replicas for g in OPERATOR_GROUPS},
                              {g: ops[g].max_batch for g in OPERATOR_GROUPS}).gpus
        return None

    return count


def scale_plan(plan: Plan, factor: float) -> Plan:
    """Every group's replicas times ``factor`` (rounded half up, never below the plan's own)."""
    return Plan({g: OperatorPlan(max(o.replicas, int(o.replicas * factor + 0.5)), o.max_batch, o.placement, o.tp)
                 for g, o in plan.ops.items()})


def fill_plan(plan: Plan, budget_gpus: int, count: Callable[[Plan], int | None], max_replicas: int) -> Plan:
    """``plan`` scaled up to the largest factor that still fits ``budget_gpus`` (see module doc).

    Args:
        plan: the plan to top up.
        budget_gpus: GPUs available (>= 1).
        count: GPUs a plan needs, None when unknown (see :func:`pack_gpu_counter`).
        max_replicas: the most replicas any group may have (the codec's limit).

    Returns:
        The filled plan; ``plan`` itself when it is uncountable or already at or over budget.
    """
    used = count(plan)
    if used is None or used >= budget_gpus:
        return plan
    ops = plan.ops
    if all(o.placement == "model" for o in ops.values()):
        n = min(max(budget_gpus // max(ops["attn"].tp, 1), ops["attn"].replicas), max_replicas)
        return Plan({g: OperatorPlan(n, o.max_batch, o.placement, o.tp) for g, o in ops.items()})
    def fits(p: Plan) -> bool:
        n = count(p) if max(o.replicas for o in p.ops.values()) <= max_replicas else None
        return n is not None and n <= budget_gpus

    hi = max(max_replicas / max(min(o.replicas for o in ops.values()), 1), 1.0)
    best = _largest_fitting(lambda f: scale_plan(plan, f), 1.0, hi, fits, plan)
    # rounding leaves room: add single replicas while they fit, the group scaled least so far
    # first, none beyond the largest scale a group already has (proportions stay)
    while True:
        top = max(best[g].replicas / ops[g].replicas for g in OPERATOR_GROUPS)
        order = sorted(OPERATOR_GROUPS, key=lambda g: (best[g].replicas / ops[g].replicas, -ops[g].replicas))
        for g in order:
            if best[g].replicas >= max_replicas or (best[g].replicas + 1) / ops[g].replicas > top + 1e-9:
                continue
            cand = best.with_op(g, replicas=best[g].replicas + 1)
            n = count(cand)
            if n is not None and n <= budget_gpus:
                best = cand
                break
        else:
            return best


def cap_plan(plan: Plan, budget_gpus: int, count: Callable[[Plan], int | None]) -> Plan:
    """``plan`` shrunk to fit ``budget_gpus`` when it needs more: every group's replicas become
    ``max(1, floor(r x f))`` with the largest factor ``f <= 1`` (bisection) whose plan fits;
    ``plan`` itself when it fits or cannot be counted, one replica per group when nothing fits."""
    used = count(plan)
    if used is None or used <= budget_gpus:
        return plan

    def shrink(f: float) -> Plan:
        return Plan({g: OperatorPlan(max(1, int(o.replicas * f)), o.max_batch, o.placement, o.tp)
                     for g, o in plan.ops.items()})

    def fits(p: Plan) -> bool:
        n = count(p)
        return n is not None and n <= budget_gpus

    return _largest_fitting(shrink, 0.0, 1.0, fits, shrink(0.0))


def _largest_fitting(make: Callable[[float], Plan], lo: float, hi: float, fits: Callable[[Plan], bool],
                     fallback: Plan) -> Plan:
    """``make(f)`` at the largest factor in (lo, hi) that ``fits`` finds by bisection
    (``_STEPS`` halvings; fits is taken to be monotone in f); ``fallback`` when none does."""
    best = fallback
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        cand = make(mid)
        if fits(cand):
            lo, best = mid, cand
        else:
            hi = mid
    return best


def fill_by_utilisation(plan: Plan, budget_gpus: int, count: Callable[[Plan], int | None], max_replicas: int,
                        busy_replicas: Mapping[str, float]) -> Plan:
    """``plan`` topped up one replica at a time, each to the group whose busy share per replica
    would be highest, while the replica fits ``budget_gpus`` (water-filling: a group whose
    replicas were busy for ``w`` replicas' worth of time, e.g. 4 replicas busy 0.5 = 2.0, is
    projected to be busy ``w / r`` at ``r`` replicas).

    Args:
        busy_replicas: per group, measured busy share x serving replicas (replicas' worth of
            busy time, >= 0) over the last interval.

    Falls back to :func:`fill_plan` when no group was busy (no measurement yet) and returns
    whole-model or uncountable plans as :func:`fill_plan` does.
    """
    used = count(plan)
    ops = plan.ops
    if used is None or used >= budget_gpus or all(o.placement == "model" for o in ops.values()) \
            or not any(busy_replicas.get(g, 0.0) > 0.0 for g in OPERATOR_GROUPS):
        return fill_plan(plan, budget_gpus, count, max_replicas)
    work = {g: max(float(busy_replicas.get(g, 0.0)), 0.0) for g in OPERATOR_GROUPS}
    best = plan
    full: set[str] = set()
    while True:
        open_ = [g for g in OPERATOR_GROUPS if g not in full and work[g] > 0.0 and best[g].replicas < max_replicas]
        if not open_:
            return best
        g = max(open_, key=lambda h: work[h] / best[h].replicas)
        cand = best.with_op(g, replicas=best[g].replicas + 1)
        n = count(cand)
        if n is not None and n <= budget_gpus:
            best = cand
        else:
            full.add(g)  # its next replica does not fit; a smaller group's may


class BudgetFill(Controller):
    """Wraps ``inner`` for a fixed budget: every plan it decides is topped up to
    ``budget_gpus`` by ``rule`` (and, with ``cap``, first shrunk to it when it asks for more).

    Args:
        inner: the controller whose plans are filled.
        budget_gpus: GPUs of the fixed budget (>= 1).
        count: GPUs a plan needs (None when unknown); e.g. :func:`pack_gpu_counter`.
        max_replicas: the most replicas any group may have.
        rule: ``utilisation`` (:func:`fill_by_utilisation` with the state's per-group busy
            shares; the default, chosen on the val split, docs/RESULTS.md) or ``proportional``
            (:func:`fill_plan`).
        cap: also shrink plans that need more than the budget (:func:`cap_plan`). Off for
            the simulator, which repairs such plans itself (its rule: replicas off the process
            on the most GPUs); on for the live runtime, which has no budget of its own.
    """

    def __init__(self, inner: Controller, budget_gpus: int, count: Callable[[Plan], int | None],
                 max_replicas: int, rule: str = "utilisation", cap: bool = False) -> None:
        if int(budget_gpus) < 1:
            raise ValueError(f"budget_gpus must be >= 1, got {budget_gpus!r}")
        if int(max_replicas) < 1:
            raise ValueError(f"max_replicas must be >= 1, got {max_replicas!r}")
        if rule not in FILL_RULES:
            raise ValueError(f"fill rule must be one of {FILL_RULES}, got {rule!r}")
        self.rule = rule
        self.cap = bool(cap)
        self.inner = inner
        self.name = inner.name
        self.budget_gpus = int(budget_gpus)
        self.count = count
        self.max_replicas = int(max_replicas)

    def reset(self, state: ClusterState | None = None) -> None:
        self.inner.reset(state)

    def decide(self, state: ClusterState) -> Plan:
        plan = self.inner.decide(state)
        if self.cap:
            plan = cap_plan(plan, self.budget_gpus, self.count)
        if self.rule == "utilisation":
            busy = {g: op.utilisation * op.replicas for g, op in state.operators.items()}
            return fill_by_utilisation(plan, self.budget_gpus, self.count, self.max_replicas, busy)
        return fill_plan(plan, self.budget_gpus, self.count, self.max_replicas)
