"""The compiled kernels' array hash tables (envs/kernelhash.py) must answer as the dicts they
replaced: the latency table as a dict (growing as it fills), the memo as a dict under
``envs.memo.put`` (the same keys, in the same order, after any run of inserts and evictions)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from envs.kernelhash import LatencyTable, MemoTable, memo_find  # noqa: E402
from envs.memo import put  # noqa: E402


def test_latency_table_answers_as_a_dict_while_it_grows():
    rng = np.random.default_rng(0)
    table = LatencyTable(capacity=8)
    ref: dict[int, float] = {}
    for _ in range(40):
        # packed-key-like values: clustered low bits, a few top bits, many repeats across batches
        keys = (rng.integers(0, 4, 50) << 56) | (rng.integers(0, 300, 50) << 20) | rng.integers(0, 64, 50)
        values = rng.random(50)
        overwrite = bool(rng.integers(0, 2))
        table.put(keys, values, overwrite=overwrite)
        for k, v in zip(keys.tolist(), values.tolist()):
            if overwrite or k not in ref:
                ref[k] = v
    assert len(table) == len(ref) and sorted(table.keys()) == sorted(ref)
    assert all(table[k] == v for k, v in ref.items())
    assert len(table.arrays[0]) >= 2 * len(ref)  # grown, never more than half full
    missing = [k + 1 for k in ref if k + 1 not in ref][:50]
    assert missing and not any(k in table for k in missing)
    with pytest.raises(KeyError):
        table[missing[0]]


def test_latency_table_grows_on_the_keys_that_are_new():
    """A prefetch asks for a grid of keys most of which are present: the table grows for the new
    ones only (session 33's table grew on all keys asked: 131,072 slots for 18,900 entries)."""
    table = LatencyTable(capacity=8)
    table.put(np.arange(2000), np.ones(2000))
    assert table.capacity == 8192  # (the power of two >= 3 x 2000)
    table.put(np.arange(1000, 4000), np.full(3000, 2.0), overwrite=False)  # 2,000 present, 1,000 new
    assert len(table) == 4000 and table.capacity == 8192  # 2 x 4000 <= 8192: no growth
    assert table[1500] == 1.0 and table[3999] == 2.0
    table.put(np.arange(4000, 4100), np.zeros(100))  # past half full: grows
    assert len(table) == 4100 and table.capacity == 16384 and table[0] == 1.0 and table[4050] == 0.0


def test_latency_table_refuses_a_negative_key():
    with pytest.raises(ValueError, match="latency table keys must be >= 0, got -3"):
        LatencyTable().put(np.asarray([5, -3]), np.asarray([1.0, 2.0]))


def test_memo_limit_must_be_positive():
    with pytest.raises(ValueError, match="memo limit must be >= 1, got 0"):
        MemoTable(0)


@settings(max_examples=60, deadline=None)
@given(limit=st.integers(1, 12), ops=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3)), max_size=120),
       width=st.integers(1, 5))
def test_memo_keeps_envs_memo_puts_entries_in_order(limit, ops, width):
    """Inserts of missing keys and lookups, as the kernel makes them: the same entries as a dict
    under ``envs.memo.put``, in the same order, with their rows."""
    memo = MemoTable(limit, width=2)
    ref: dict[tuple, list[float]] = {}
    for i, (a, b) in enumerate(ops):
        key = (a, b, 0, -1, 7, a * b, 0, 0, 1 << 40, i % 2)
        e = memo_find(memo.arrays, key)
        if key in ref:
            assert e >= 0 and memo.arrays[1][e, :width].tolist() == ref[key]
            continue
        assert e == -1
        row = [float(i), float(a), float(b), 0.5, -1.0][:width]
        memo.put(key, np.asarray(row))  # (widens the rows past 2 where width asks)
        put(ref, key, row, limit)
    assert memo.keys() == list(ref)
    assert [memo.get(k)[:width].tolist() for k in memo.keys()] == list(ref.values())
    assert len(memo) == len(ref) <= limit


def test_a_memo_row_wider_than_the_table_is_refused():
    from envs.kernelhash import memo_put

    memo = MemoTable(4, width=3)
    with pytest.raises(ValueError, match="memo row wider than the table's rows"):
        memo_put(memo.arrays, tuple(range(10)), np.zeros(4), 4)
    assert len(memo) == 0
