"""The engine's measured micro-batch choice (runtime/microbatch.py)."""
from __future__ import annotations

import pytest

from runtime.microbatch import MicroBatchChooser


def test_size_classes_are_powers_of_two():
    assert [MicroBatchChooser.size_class(n) for n in (0, 1, 2, 3, 4, 7, 8, 1023, 1024)] == [0, 0, 1, 1, 2, 2, 3, 9, 10]


def test_probes_each_count_then_takes_the_fastest_and_ties_go_to_fewer():
    c = MicroBatchChooser(2, probe=2, explore_every=1000, ema=0.5)
    picks = []
    for _ in range(4):  # probe: count 1 twice, then count 2 twice
        m = c.choose(True, 1000, 8)
        picks.append(m)
        c.record(True, 1000, m, 1.0 if m == 1 else 0.6)  # cut: 0.6 s for 1000 tokens
    assert picks == [1, 1, 2, 2]
    assert c.mean(True, 1000, 1) == pytest.approx(1e-3) and c.mean(True, 1000, 2) == pytest.approx(6e-4)
    assert c.choose(True, 1000, 8) == 2
    # equal averages: fewer micro-batches
    c.record(True, 1000, 2, 1.4)  # 0.5 x 0.6e-3 + 0.5 x 1.4e-3 = 1.0e-3
    assert c.mean(True, 1000, 2) == pytest.approx(1e-3)
    assert c.choose(True, 1000, 8) == 1


def test_kinds_and_sizes_are_measured_apart_and_parts_cap_the_count():
    c = MicroBatchChooser(2, probe=1, explore_every=1000)
    c.record(True, 512, 1, 1.0)
    c.record(True, 512, 2, 0.5)
    assert c.choose(True, 600, 8) == 2  # same class (512-1023)
    assert c.choose(True, 1024, 8) == 1  # another class: probing again, count 1 first
    assert c.choose(False, 600, 8) == 1  # decode-only: its own averages
    assert c.choose(True, 600, 1) == 1  # one sequence cannot be cut
    assert MicroBatchChooser(1).choose(True, 600, 8) == 1


def test_explores_the_other_count_every_nth_iteration():
    c = MicroBatchChooser(3, probe=1, explore_every=4, ema=1.0)
    for m, sec in ((1, 3.0), (2, 1.0), (3, 2.0)):
        c.record(False, 16, m, sec)
    c.record(False, 16, 3, 2.0)  # count 3 measured twice, count 1 once
    picks = [c.choose(False, 16, 16) for _ in range(8)]
    # the 4th and 8th calls re-measure the non-best count measured least often (1, then 1 again)
    assert picks == [2, 2, 2, 1, 2, 2, 2, 1]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_count must be >= 1, got 0"):
        MicroBatchChooser(0)
    with pytest.raises(ValueError, match="explore_every >= 2"):
        MicroBatchChooser(2, explore_every=1)
