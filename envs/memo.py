"""Bounded memo tables for the simulator's per-plan caches.

Tables evict their oldest half (insertion order) when full (:func:`put`). The ones keyed by a
plan's contents (placements, step models, shared plans) are :class:`RecurringTable` since session
30; the identity caches over them (keyed by ``id()``) stay plain and small (256 entries). The
streams training sends revisit a bounded set of plans: train.py's early, near-random stream
(replica deltas of three groups under the frozen layout) met 2,442 distinct serving and target
plans in 20,000 steps, 1,910 of them in the first 2,000 and 8-16 new per 2,000 steps after 8,000.
With 512 entries (before session 30) that stream placed 1.84 plans a step forever, evicting what
it would place again. But uniformly random actions meet a new plan almost every step, and holding
thousands of them (Layouts, StepModels and Plans are garbage-collector-tracked objects) made full
collections over them cost more than the misses saved (session 16 on a stream of that kind;
session 30: 757 against 299 us a step of collections on random actions with 8,192-entry dicts).
So a plan is held long only once it has come back.
"""
from __future__ import annotations

import gc
from itertools import islice

_FROZEN = False

#: entries a :class:`RecurringTable` holds of what recurs (and keys it remembers having seen)
PLAN_TABLE_LIMIT = 8192
#: entries it holds of what has not recurred yet (the placements' limit before session 30)
RECENT_LIMIT = 512


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
        _drop_oldest_half(table, limit)
    table[key] = value
    return value


def _drop_oldest_half(table: dict, limit: int) -> list:
    """Delete the oldest ``limit // 2`` entries (at least one) of ``table``; returns their keys."""
    gone = list(islice(table, max(limit // 2, 1)))
    for k in gone:
        del table[k]
    return gone


class RecurringTable:
    """A memo table that keeps what recurs: new entries in a small table of recent ones, entries
    that come back after they left it in a large one (the "2Q" rule of buffer caches).

    ``get(key)`` answers from either. ``put(key, value)`` stores a value computed on a miss: in the
    large table when the key was put before (so it left the recent entries and came back), else
    among the recent entries, remembering the key. Uses of a recent entry do not move it: a plan
    is looked up several times within a step or two (as target, serving plan, at each accounting),
    which says nothing about whether it comes back later. Each part evicts its oldest half when
    full, as :func:`put` does. A stream that keeps coming back to a bounded set of plans ends up
    holding all of them (up to ``limit``); one that meets new plans all the time holds about
    ``recent`` values, plus ``limit`` keys.

    Args:
        limit: entries of what recurs; also the keys remembered.
        recent: entries of what has not recurred yet.
    """

    __slots__ = ("main", "recent", "seen", "values", "limit", "recent_limit")

    def __init__(self, limit: int = PLAN_TABLE_LIMIT, recent: int = RECENT_LIMIT) -> None:
        self.main: dict = {}
        self.recent: dict = {}
        self.seen: dict = {}  # keys put before (values None): insertion-ordered, bounded
        #: every entry of ``main`` and ``recent`` (disjoint): ``get`` hashes a key once (a plan's
        #: key is a tuple of tuples, whose hash Python does not cache), not once per part
        self.values: dict = {}
        self.limit = int(limit)
        self.recent_limit = int(recent)

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, key) -> bool:  # noqa: ANN001 - any hashable
        return key in self.values

    def get(self, key, default=None):  # noqa: ANN001, ANN201 - any hashable / any value
        """The value stored for ``key``, or ``default``."""
        return self.values.get(key, default)

    def put(self, key, value):  # noqa: ANN001, ANN201 - any hashable / any value
        """Store ``value`` for ``key`` (see the class docstring); returns ``value``."""
        if key in self.main:
            self.main[key] = value
        elif key in self.recent:
            self.recent[key] = value
        elif key in self.seen:  # it left the recent entries and came back
            self._store(self.main, key, value, self.limit)
        else:
            self._store(self.recent, key, value, self.recent_limit)
            put(self.seen, key, None, self.limit)
        self.values[key] = value
        return value

    def _store(self, part: dict, key, value, limit: int) -> None:  # noqa: ANN001 - any hashable / any value
        """``put(part, key, value, limit)``, dropping what it evicts from ``values`` too."""
        if len(part) >= limit:
            values = self.values
            for k in _drop_oldest_half(part, limit):
                del values[k]
        part[key] = value
