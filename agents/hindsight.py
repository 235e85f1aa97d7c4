"""Plans chosen with hindsight in the fast simulator, and a teacher built on them.

The fast simulator's run state copies in under a millisecond (:func:`clone`), so "which plan of
a menu would have held the SLO in this interval" can be answered by trying them. Two users:

* ``bench/hindsight_oracle.py`` chooses a whole schedule that way (it reads the trace ahead of
  time: a yardstick, not a controller);
* :class:`HindsightTeacher`, a teacher for behaviour cloning (``bc.teacher: hindsight`` in the
  PPO config). It follows a *reactive* rule on the same knowledge: after every interval it learns
  which plan that interval had needed (:func:`oracle_plan` from the state the interval started
  in), and provisions each operator for the worst of the last ``window`` intervals. It reads the
  simulator, so it only runs inside the training env; the student sees the observation. It is
  strictly causal only with ``lookahead`` 0: an interval's need with lookahead L includes the
  check that the L intervals after it stay recoverable, so it is known only L intervals later and
  the rule reads that far ahead (docs/RESULTS.md "Oracle over time": that is most of its saving).

Units: GPUs counted as the placer counts them; attainment as a share of requests.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

from runtime.control import ClusterState, Controller, OperatorPlan, Plan
from runtime.models import OPERATOR_GROUPS

#: simulator attributes that are read-only or deterministic memo tables: shared, not copied
_SHARED = ("sc", "trace", "pred", "slo", "cache", "placer", "index", "sub_index", "arrival", "output", "prompt",
           "_tok_sum", "_steps", "_sm_ids", "_shapes", "_it", "_kmemo", "_sub", "_int")
#: per-interval records of (count, p50, p99) float tuples
_RECORDS = ("ttft_rec", "tbt_rec")
#: the groups whose replica counts a hindsight menu varies
SIZED = ("attn", "proj", "mlp")


def clone(sim: Any) -> Any:
    """A copy of a fast simulator's run state; tables that never change (or only memoise) are shared."""
    memo = {id(getattr(sim, k)): getattr(sim, k) for k in _SHARED if hasattr(sim, k)}
    for name in _RECORDS:   # lists of float tuples, only appended to: a shallow copy is a full one
        rec = getattr(sim, name, None)
        if rec is not None:
            memo[id(rec)] = list(rec)
    return copy.deepcopy(sim, memo)


def pack_plan(scenario: Any, attn: int, attn_batch: int, proj: int, mlp: int, embed: int = 1, head: int = 1) -> Plan:
    """All groups ``pack`` at the scenario's tp; stateless pools batch 256 sequences."""
    reps = {"embed": embed, "attn": attn, "proj": proj, "mlp": mlp, "head": head}
    return Plan({g: OperatorPlan(reps[g], attn_batch if g == "attn" else 256, "pack", int(scenario.tp[g]))
                 for g in OPERATOR_GROUPS})


def pack_menu(scenario: Any, counts: Iterable[tuple[int, int, int]], attn_batch: int, embed: int, head: int,
              gpus_of: Callable[[Plan], int]) -> list[Plan]:
    """Pack plans for the (attention, projection, MLP) ``counts``, sorted by GPUs (ties: fewer
    attention, then MLP, then projection replicas)."""
    plans = [pack_plan(scenario, a, attn_batch, p, m, embed, head) for a, p, m in sorted(set(counts))]
    if not plans:
        raise ValueError("empty hindsight menu: no (attention, projection, MLP) replica counts given")
    gpus = {id(p): gpus_of(p) for p in plans}
    return sorted(plans, key=lambda p: (gpus[id(p)], p["attn"].replicas, p["mlp"].replicas, p["proj"].replicas))


def oracle_plan(sim: Any, menu: Sequence[Plan], tau: float, lookahead: int) -> Plan | None:
    """The first plan of ``menu`` (sorted by GPUs) with which, from ``sim``'s state, the next
    interval holds attainment >= ``tau`` and the ``lookahead`` intervals after it would too at
    the largest plan (so a backlog it leaves is one scaling up can clear); None if none does.
    ``sim`` itself is not advanced."""
    top = menu[-1]
    for plan in menu:
        c = clone(sim)
        ok = c.step(plan).slo_attainment >= tau
        for _ in range(lookahead):
            if not ok or c.done:
                break
            ok = c.step(top).slo_attainment >= tau
        if ok:
            return plan
    return None


def greedy_schedule(sim: Any, menu: Sequence[Plan], tau: float, lookahead: int) -> tuple[list[Plan], int]:
    """Run ``sim`` to the end taking :func:`oracle_plan` every interval (the largest plan when
    none holds); returns the plans and how many intervals fell back to the largest plan."""
    plans: list[Plan] = []
    fallbacks = 0
    while not sim.done:
        chosen = oracle_plan(sim, menu, tau, lookahead)
        if chosen is None:
            chosen, fallbacks = menu[-1], fallbacks + 1
        plans.append(chosen)
        sim.step(chosen)
    return plans, fallbacks


def worst_of(plans: Sequence[Plan]) -> Plan:
    """Per sized group the most replicas any of ``plans`` has; the other fields from the last."""
    out = plans[-1]
    for g in SIZED:
        r = max(p[g].replicas for p in plans)
        if r != out[g].replicas:
            out = out.with_op(g, replicas=r)
    return out


def reactive_schedule(schedule: Sequence[Plan], window: int) -> list[Plan]:
    """Per interval, :func:`worst_of` the oracle's plans for the ``window`` intervals before it
    (the first interval: the oracle's first plan): what a controller that learned each
    interval's need only after it had passed would run."""
    if window < 1:
        raise ValueError(f"window {window}: at least one interval")
    return [worst_of(schedule[max(k - window, 0):k] or schedule[:1]) for k in range(len(schedule))]


class ScheduleController(Controller):
    """Replays a list of plans, one per interval (the last one after the list ends)."""

    name = "schedule"

    def __init__(self, plans: list[Plan]) -> None:
        if not plans:
            raise ValueError("a schedule needs at least one plan")
        self.plans = list(plans)
        self.k = 0

    def reset(self, state: ClusterState | None = None) -> None:
        self.k = 0

    def decide(self, state: ClusterState) -> Plan:
        plan = self.plans[min(self.k, len(self.plans) - 1)]
        self.k += 1
        return plan


class HindsightTeacher(Controller):
    """Reactive hindsight rule (module docstring) over a fast simulator it can read.

    Args:
        sim_of: returns the simulator the decisions drive (e.g. ``lambda: env.unwrapped.sim``),
            in the state at the start of the interval being decided.
        menu: plans sorted by GPUs (:func:`pack_menu`).
        tau: attainment each interval's hindsight plan must hold.
        lookahead: intervals at the largest plan that must hold ``tau`` after it.
        window: intervals whose hindsight plans the next plan covers.
    """

    name = "hindsight"

    def __init__(self, sim_of: Callable[[], Any], menu: Sequence[Plan], tau: float = 0.999, lookahead: int = 2,
                 window: int = 2) -> None:
        if not menu:
            raise ValueError("HindsightTeacher needs a non-empty menu")
        if window < 1:
            raise ValueError(f"HindsightTeacher window {window}: at least one interval")
        self.sim_of = sim_of
        self.menu = list(menu)
        self.tau, self.lookahead, self.window = float(tau), int(lookahead), int(window)
        self.reset()

    def reset(self, state: ClusterState | None = None) -> None:
        self._snap: Any = None
        self.past: list[Plan] = []

    def _needed(self, sim: Any) -> Plan:
        return oracle_plan(sim, self.menu, self.tau, self.lookahead) or self.menu[-1]

    def decide(self, state: ClusterState) -> Plan:
        sim = self.sim_of()
        if self._snap is not None:
            self.past.append(self._needed(self._snap))   # what the interval just served needed
            del self.past[:-self.window]
        self._snap = clone(sim)
        if not self.past:
            return self._needed(self._snap)   # first interval: nothing seen yet, so read it
        return worst_of(self.past)
