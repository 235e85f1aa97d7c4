"""Bounded memo tables for the simulator's per-plan caches.

The tables evict their oldest half (insertion order) when full. Uniformly random actions
meet a new plan almost every step, and there the tables only grow; but the streams training
sends revisit a bounded set: train.py's early, near-random stream (replica deltas of three
groups under the frozen layout) met 2,442 distinct serving and target plans in 20,000 steps,
1,910 of them in the first 2,000 and 8-16 new per 2,000 steps after 8,000 (session 30). The
plan-keyed tables hold :data:`PLAN_TABLE_LIMIT` entries, enough to keep all of them: with 512
(before session 30) that stream placed 1.84 plans a step forever, evicting what it would place
again, and the allocations drove the cyclic collector to about 150 us a step.
"""
from __future__ import annotations

import gc
from itertools import islice

_FROZEN = False

#: entries of each plan-keyed table (placements, step models, shared plans, decoded actions and
#: the identity caches over them). A table at the limit holds about 17 kB a plan (placement, step
#: model and its compiled structure together: 20,000 steps of random actions, 8,192 entries,
#: about 270 MB more resident memory than with 512; session 30), per env.
PLAN_TABLE_LIMIT = 8192


def freeze_gc_once() -> None:
    """Move every object alive now into the collector's permanent generation, once per process.

    Called when the first simulator resets (after torch, numpy, the profiles and the trace
    are loaded): full collections then skip those few hundred thousand long-lived objects
    and only scan what the simulator allocates since (bounded by the tables here). Objects
    frozen are still freed by reference counting; only cyclic garbage among them would stay.
    """
    global _FROZEN
    if not _FROZEN:
        _FROZEN = True
        gc.collect()
        gc.freeze()


def put(table: dict, key, value, limit: int):  # noqa: ANN001, ANN201 - any hashable / any value
    """``table[key] = value``; first drops the oldest half when ``table`` holds ``limit`` entries.

    Returns ``value``.
    """
    if len(table) >= limit:
        for k in list(islice(table, max(limit // 2, 1))):
            del table[k]
    table[key] = value
    return value
