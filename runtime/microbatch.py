"""How many micro-batches the engine cuts an iteration through the pools into, from measurement.

The simulators time an iteration between disaggregated pools at every micro-batch count in
1..``micro_batches`` from the profiles and run the fastest (``micro_batching: adaptive``,
docs/SIMULATOR.md "Step model"): cutting lets one pool work on a micro-batch while another
works on the next, but a memory-bound GEMM reads its weights once per micro-batch. The live
engine has no profile of its own hardware at hand, so it makes the same choice from what it
measures: :class:`MicroBatchChooser` keeps, per kind of iteration and per count, the
recent seconds per new token and picks the lowest, re-measuring the others now and then.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Stats:
    """Exponential average of seconds per new token of one (kind, size, count)."""

    mean: float = 0.0
    n: int = 0


class MicroBatchChooser:
    """Per iteration, the micro-batch count that has run iterations like it fastest.

    Iterations are grouped by kind (carrying prompt tokens, or decode-only) and size (new
    tokens, by powers of two: 1, 2-3, 4-7, ...). Per group and count it keeps an exponential
    average (weight ``ema`` on the newest) of measured seconds per new token.

    Choice for a group: a count measured fewer than ``probe`` times is tried first (fewest
    first); then the count with the lowest average, ties to fewer; every ``explore_every``-th
    iteration of a group instead re-measures the count other than the best that was measured
    least often, so a choice made under different load is revisited.

    Args:
        max_count: the most micro-batches (``EngineConfig.micro_batches``), >= 1.
        probe: measurements of each count before averages decide.
        explore_every: one iteration in this many (per group) re-measures another count.
        ema: weight of the newest measurement in the average (0, 1].
    """

    def __init__(self, max_count: int, probe: int = 2, explore_every: int = 32, ema: float = 0.25) -> None:
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if probe < 1 or explore_every < 2 or not 0.0 < ema <= 1.0:
            raise ValueError(f"need probe >= 1, explore_every >= 2, 0 < ema <= 1; got {probe}, {explore_every}, {ema}")
        self.max_count = max_count
        self.probe = probe
        self.explore_every = explore_every
        self.ema = ema
        self._stats: dict[tuple[bool, int, int], _Stats] = {}
        self._seen: dict[tuple[bool, int], int] = {}

    @staticmethod
    def size_class(new_tokens: int) -> int:
        """Powers-of-two bucket of an iteration's new tokens: 1 -> 0, 2-3 -> 1, 4-7 -> 2, ..."""
        return max(int(new_tokens), 1).bit_length() - 1

    def choose(self, prefill: bool, new_tokens: int, max_parts: int) -> int:
        """The count for an iteration of ``new_tokens`` new tokens (``prefill``: it carries prompt
        tokens) that can be cut into at most ``max_parts`` parts (its sequences)."""
        top = min(self.max_count, max_parts)
        if top <= 1:
            return 1
        group = (prefill, self.size_class(new_tokens))
        seen = self._seen.get(group, 0)
        self._seen[group] = seen + 1
        stats = [self._stats.get((*group, m), _Stats()) for m in range(1, top + 1)]
        for m, st in enumerate(stats, start=1):
            if st.n < self.probe:
                return m
        best = 1 + min(range(top), key=lambda i: (stats[i].mean, i))
        if seen % self.explore_every == self.explore_every - 1:
            others = [m for m in range(1, top + 1) if m != best]
            return min(others, key=lambda m: (stats[m - 1].n, m))
        return best

    def record(self, prefill: bool, new_tokens: int, count: int, seconds: float) -> None:
        """A finished iteration: ``seconds`` of wall time for ``new_tokens`` new tokens in ``count`` parts."""
        key = (prefill, self.size_class(new_tokens), count)
        st = self._stats.setdefault(key, _Stats())
        per_token = seconds / max(new_tokens, 1)
        st.mean = per_token if st.n == 0 else (1.0 - self.ema) * st.mean + self.ema * per_token
        st.n += 1

    def mean(self, prefill: bool, new_tokens: int, count: int) -> float | None:
        """The average seconds per new token of a (kind, size, count), None if never measured."""
        st = self._stats.get((prefill, self.size_class(new_tokens), count))
        return st.mean if st is not None and st.n else None
