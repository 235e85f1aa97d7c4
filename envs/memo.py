"""Bounded memo tables for the simulator's per-plan caches.

Random exploration produces a new plan almost every step, so plan-keyed caches mostly
miss and only grow; every cached Layout / StepModel / Plan is a garbage-collector-tracked
object, and full collections over a few hundred thousand of them cost about a quarter of
an env step. The tables are therefore small and evict their oldest half (insertion order)
when full, which keeps the entries a policy revisits (kept plans, recent plans).
"""
from __future__ import annotations

import gc
from itertools import islice

_FROZEN = False


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
