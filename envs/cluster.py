"""Plan changes over time: which replicas serve, which are loading, which are draining.

A new replica serves only after its weights are loaded (``Layout.load_s``: start-up time
plus weight bytes per GPU over the load bandwidth). A replica that is removed stops taking
new work at once; an attention unit (which holds sequences' KV) keeps its GPUs until its
running sequences finish (the simulator reports when it has drained). Changing a group's
placement or tensor parallelism is a blue/green switch: the old replicas serve until all
new ones are loaded, and both are paid for meanwhile. A loading replica that a later plan
no longer wants is cancelled at no cost.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from runtime.control import OperatorPlan, Plan
from runtime.models import OPERATOR_GROUPS

from envs.world import Layout, Placer


@dataclass
class GroupTimeline:
    """Replicas of one group over time.

    Attributes:
        op: the target operator plan.
        ready: ready time (seconds) of each target replica, ascending; <= now means serving
            (kept sorted, so that the replicas serving or loading at a time are one bisection).
        old: the operator plan that serves while a placement / tp switch loads.
        switch_at: when the switch completes (seconds); None when none is pending.
    """

    op: OperatorPlan
    ready: list[float]
    old: OperatorPlan | None = None
    switch_at: float | None = None


@dataclass
class ClusterTimeline:
    """Tracks target, serving and draining replicas of every group.

    Args:
        placer: places plans (memory, GPUs).
        plan: the initial plan, taken as already loaded at time 0.
    """

    placer: Placer
    plan: Plan
    groups: dict[str, GroupTimeline] = field(init=False)
    target: Layout = field(init=False)
    draining_units: int = 0
    repairs: list[str] = field(default_factory=list)
    _cache: list | None = field(default=None, repr=False)  # [(from, until, (plan, layout))], newest last
    _span: tuple | None = field(default=None, repr=False)  # the last _bounds (from, until)
    _paid: tuple | None = field(default=None, repr=False)  # the last gpus(): (from, until, target, draining, GPUs)

    def __post_init__(self) -> None:
        self.target = self.placer.place(self.plan)
        self.repairs = list(self.target.repairs)
        placed = self.target.plan
        self.groups = {g: GroupTimeline(placed[g], [0.0] * placed[g].replicas) for g in OPERATOR_GROUPS}

    @property
    def target_plan(self) -> Plan:
        """The plan (as placed and repaired) the cluster is moving to."""
        return self.target.plan

    def apply(self, plan: Plan, now: float) -> list[str]:
        """Move towards ``plan`` from time ``now``; returns the repair messages (may raise PlanError)."""
        layout = self.placer.place(plan)
        self._cache = self._span = self._paid = None
        placed = layout.plan
        for g in OPERATOR_GROUPS:
            tl = self.groups[g]
            new = placed.ops[g]
            load = layout.load_s[g]
            if new.placement != tl.op.placement or new.tp != tl.op.tp:
                if tl.switch_at is not None and tl.old is not None and \
                        (tl.old.placement, tl.old.tp) == (new.placement, new.tp):
                    # switching back to what still serves: cancel the switch; the old replicas
                    # keep serving, any extra ones load
                    old = tl.old
                    tl.op, tl.old, tl.switch_at = new, None, None
                    tl.ready = [0.0] * min(new.replicas, old.replicas)
                    tl.ready += [now + load] * (new.replicas - len(tl.ready))
                    self._cache = self._span = self._paid = None
                    continue
                serving = self.serving_op(g, now)
                tl.old = serving
                tl.switch_at = now + load
                tl.op = new
                tl.ready = [now + load] * new.replicas
                continue
            ready = tl.ready[:]  # (ascending: see GroupTimeline.ready)
            if new.replicas > len(ready):
                late = bool(ready) and ready[-1] > now + load  # (one still loading since a longer load)
                ready += [now + load] * (new.replicas - len(ready))
                if late:
                    ready.sort()
            elif new.replicas < len(ready):
                removed = ready[new.replicas:]
                ready = ready[:new.replicas]
                if g == "attn":  # serving attention units drain; loading ones are cancelled
                    self.draining_units += sum(1 for r in removed if r <= now)
            tl.ready = ready
            tl.op = new
        self.target = layout
        self.repairs = list(layout.repairs)
        return self.repairs

    def drained(self, units: int = 1) -> None:
        """``units`` draining attention units finished their sequences and gave back their GPUs."""
        self.draining_units = max(self.draining_units - units, 0)

    def advance(self, now: float) -> None:
        """Complete switches whose loads finished by ``now``."""
        for tl in self.groups.values():
            if tl.switch_at is not None and tl.switch_at <= now:
                tl.old, tl.switch_at = None, None
                self._cache = self._span = self._paid = None

    def serving_op(self, g: str, now: float) -> OperatorPlan:
        """The operator plan of ``g`` that serves at ``now`` (at least one replica)."""
        tl = self.groups[g]
        if tl.switch_at is not None and now < tl.switch_at and tl.old is not None:
            return tl.old
        return OperatorPlan(*self._serving_fields(now)[OPERATOR_GROUPS.index(g)])

    def _serving_fields(self, now: float) -> tuple[tuple[int, int, str, int], ...]:
        """Each group's (replicas, max_batch, placement, tp) of ``serving_op(g, now)``, in
        OPERATOR_GROUPS order, without building them (one call for all groups: a serving state
        is looked up at each replica becoming ready)."""
        fields = []
        for g in OPERATOR_GROUPS:
            tl = self.groups[g]
            if tl.switch_at is not None and now < tl.switch_at and tl.old is not None:
                op = tl.old
                fields.append((op.replicas, op.max_batch, op.placement, op.tp))
                continue
            op = tl.op
            n = bisect_right(tl.ready, now)  # (ascending: the replicas ready by now)
            fields.append((n if n > 1 else 1, op.max_batch, op.placement, op.tp))
        return tuple(fields)

    def serving_plan(self, now: float) -> Plan:
        """Per group the replicas serving at ``now`` (see :meth:`serving`)."""
        return self.serving(now)[0]

    def serving(self, now: float) -> tuple[Plan, Layout]:
        """(the serving plan at ``now``, its layout), cached for the span between the loads or
        switches completed before and after ``now``, within which it cannot change."""
        cache = self._cache
        if cache is not None:
            for lo, hi, pair in cache:
                if lo <= now < hi:
                    return pair
        else:
            cache = self._cache = []
        # the placer's shared Plan object for these fields (``Placer.serving``): the serving plans
        # of successive intervals repeat, and the identity caches downstream (step model) then hit
        pair = self.placer.serving(self._serving_fields(now))
        if len(cache) >= 4:
            del cache[0]
        cache.append((*self._bounds(now), pair))
        return pair

    def serving_fraction(self, g: str, t0: float, t1: float) -> float:
        """Mean serving replicas of ``g`` over [t0, t1) (fractional when a load finishes inside)."""
        tl = self.groups[g]
        span = max(t1 - t0, 1e-12)
        if tl.switch_at is not None and tl.old is not None and t0 < tl.switch_at:
            cut = min(tl.switch_at, t1)
            old_part = tl.old.replicas * (cut - t0)
            new_part = sum(max(t1 - max(r, cut), 0.0) for r in tl.ready)
            return (old_part + new_part) / span
        return sum(max(t1 - max(r, t0), 0.0) for r in tl.ready) / span

    def next_ready(self, now: float) -> float | None:
        """The next time a load or switch completes after ``now`` (None when nothing is loading)."""
        nxt = self._bounds(now)[1]
        return None if nxt == float("inf") else nxt

    def _bounds(self, now: float) -> tuple[float, float]:
        """(the last load or switch completed by ``now``, the next one after it), -inf / inf when
        there is none: the serving plan cannot change in between."""
        span = self._span  # (within it, _bounds is that span: no load or switch completes inside)
        if span is not None and span[0] <= now < span[1]:
            return span
        prv, nxt = float("-inf"), float("inf")
        for tl in self.groups.values():
            ready = tl.ready  # (ascending: the last one ready by now and the first one after)
            i = bisect_right(ready, now)
            if i and ready[i - 1] > prv:
                prv = ready[i - 1]
            if i < len(ready) and ready[i] < nxt:
                nxt = ready[i]
            if tl.switch_at is not None:
                if tl.switch_at <= now:
                    if tl.switch_at > prv:
                        prv = tl.switch_at
                elif tl.switch_at < nxt:
                    nxt = tl.switch_at
        self._span = (prv, nxt)
        return self._span

    def pending(self, g: str, now: float) -> int:
        """Replicas of ``g`` loading at ``now``."""
        return self.pending_all(now)[OPERATOR_GROUPS.index(g)]

    def pending_all(self, now: float) -> list[int]:
        """Replicas loading at ``now`` of every group, in OPERATOR_GROUPS order (one call: the
        simulator's state reads them all each step)."""
        groups = self.groups
        out = []
        for g in OPERATOR_GROUPS:
            ready = groups[g].ready  # (ascending)
            out.append(len(ready) - bisect_right(ready, now) if ready and ready[-1] > now else 0)
        return out

    def gpus(self, now: float) -> int:
        """GPUs paid for at ``now``.

        The target layout, plus, while a placement / tp switch loads, the GPUs the serving
        (old) layout holds beyond what the target needs per process (a group leaving an
        instance frees nothing; a whole instance replaced by pools is paid twice), plus the
        GPUs of draining attention units. Capped at the GPUs the cluster owns. Constant between
        two loads or switches completed (``_bounds``) for one target and count of draining units
        (cached: the energy accounting asks at each replica becoming ready).
        """
        c = self._paid
        if c is not None and c[0] <= now < c[1] and c[2] is self.target and c[3] == self.draining_units:
            return c[4]
        n = self.target.n_gpus
        switching = False
        for tl in self.groups.values():  # (a loop: any() over a generator cost more, called at each accounting)
            if tl.switch_at is not None and now < tl.switch_at:
                switching = True
                break
        if switching:
            serving = self.serving(now)[1]
            tgt = self.target.proc_gpus
            n += sum(max(cnt - tgt.get(proc, 0), 0) for proc, cnt in serving.proc_gpus.items())
        if self.draining_units:
            n += self.draining_units * max(self.target.unit_tp, 1)
        n = min(n, max(self.placer.sc.max_gpus, self.target.n_gpus))
        lo, hi = self._bounds(now)
        self._paid = (lo, hi, self.target, self.draining_units, n)
        return n
