"""The compiled kernels' two hash tables as numpy arrays: the latency table (packed int64 key ->
milliseconds) and the iteration-time memo (ten int64 -> a row of floats, insertion-ordered).

Until session 33 both were numba typed dicts. A typed dict passed to a compiled function is typed
and unboxed in Python at every call (about 7.5 us a call in situ in an env step, against 0.1-0.5
us for an array; session 33), and its lookups and inserts run through numba's C helpers (5 % of
an env step of train.py's stream in session 32's perf profile). Here a table is a few arrays,
passed as one tuple, probed inline (open addressing, linear probing).

The memo keeps :func:`envs.memo.put`'s rule bit for bit: at ``limit`` entries an insert first
drops the oldest half (insertion order), so the simulator computes the same iterations in the
same order as with a dict (tests/test_kernelhash.py compares the two).

Units: whatever the values are (milliseconds in the latency table, seconds and busy shares in
the memo's rows); the tables only store them.
"""
from __future__ import annotations

import numpy as np

from envs.kernelcache import drop_stale_caches

drop_stale_caches()  # (before any kernel loads its cached code: see envs/kernelcache.py)

try:  # numba is a dependency; without it the kernels (and these tables) are not used
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    njit = None

#: an empty slot of a key or index array (latency keys are >= 0; entry indices are >= 0)
EMPTY = -1
#: key width of the memo (``stepkernel._memo_key``'s tuple)
MEMO_KEY = 10
_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 (2**64 / golden ratio) as an int64
_M1 = -4658895280553007687    # 0xBF58476D1CE4E5B9 as an int64
_M2 = -7723592293110705685    # 0x94D049BB133111EB as an int64
_SEED = 0x27D4EB2F165667C5


def _pow2_at_least(n: int) -> int:
    p = 8
    while p < n:
        p *= 2
    return p


if njit is not None:
    @njit(cache=True)
    def _mix(z):  # noqa: ANN001, ANN202
        """splitmix64's finaliser (int64 products wrap in compiled code): every bit of ``z``
        reaches the low bits the slot is taken from (the packed keys differ in their top bits)."""
        z = (z ^ (z >> 30)) * _M1
        z = (z ^ (z >> 27)) * _M2
        return z ^ (z >> 31)

    @njit(cache=True)
    def _slot(key, mask):  # noqa: ANN001, ANN202
        return _mix(key) & mask

    @njit(cache=True)
    def _probe(ks, key):  # noqa: ANN001, ANN202
        """The slot of a latency table's keys ``ks`` holding ``key``, or the empty one where it
        would go (linear probing from its hashed slot)."""
        mask = ks.shape[0] - 1
        i = _slot(key, mask)
        while ks[i, 0] != key and ks[i, 0] != EMPTY:
            i = (i + 1) & mask
        return i

    @njit(cache=True)
    def table_get(table, key):  # noqa: ANN001, ANN202
        """The value of ``key`` in a latency table (its ``arrays``), NaN when it is missing."""
        ks, fs = table
        i = _probe(ks, key)
        return fs[i, 1] if ks[i, 0] == key else np.nan

    @njit(cache=True)
    def table_put(table, keys, values, overwrite):  # noqa: ANN001, ANN202
        """Store ``values`` under ``keys`` (a key present keeps its value unless ``overwrite``);
        returns how many keys were new. The caller leaves room (:meth:`LatencyTable.put`)."""
        ks, fs = table
        new = 0
        for j in range(keys.shape[0]):
            i = _probe(ks, keys[j])
            if ks[i, 0] == EMPTY:
                ks[i, 0] = keys[j]
                new += 1
            elif not overwrite:
                continue
            fs[i, 1] = values[j]
        return new

    @njit(cache=True)
    def table_missing(table, keys):  # noqa: ANN001, ANN202
        """How many of ``keys`` are not in the table (a key repeated in ``keys`` counts each time)."""
        ks = table[0]
        n = 0
        for j in range(keys.shape[0]):
            if ks[_probe(ks, keys[j]), 0] == EMPTY:
                n += 1
        return n

    @njit(cache=True)
    def _memo_hash(key):  # noqa: ANN001, ANN202
        h = _SEED
        for j in range(MEMO_KEY):
            h = (h ^ key[j]) * _MIX
        return _mix(h)

    @njit(cache=True)
    def _memo_index(mh, ix, e):  # noqa: ANN001, ANN202
        """Enter entry ``e`` (its key's hash in ``mh[e]``) into the index ``ix``."""
        mask = ix.shape[0] - 1
        i = mh[e] & mask
        while ix[i] != EMPTY:
            i = (i + 1) & mask
        ix[i] = e

    @njit(cache=True)
    def memo_find(memo, key):  # noqa: ANN001, ANN202
        """The entry index of ``key`` (a tuple of MEMO_KEY int64) in ``memo``, -1 when missing;
        its row is ``memo[1][index]``."""
        mk, _, ix, _, _ = memo
        mask = ix.shape[0] - 1
        i = _memo_hash(key) & mask
        while True:
            e = ix[i]
            if e == EMPTY:
                return -1
            same = True
            for j in range(MEMO_KEY):
                if mk[e, j] != key[j]:
                    same = False
                    break
            if same:
                return e
            i = (i + 1) & mask

    @njit(cache=True)
    def memo_put(memo, key, row, limit):  # noqa: ANN001, ANN202
        """Insert a new ``key`` with ``row`` (its first ``len(row)`` values; the row width is
        the caller's) = ``envs.memo.put``: at ``limit`` entries, first drop the oldest half."""
        mk, mv, ix, count, mh = memo
        if row.shape[0] > mv.shape[1]:  # (numba does not check bounds: refuse rather than write past)
            raise ValueError("memo row wider than the table's rows: MemoTable.ensure_width first")
        n = count[0]
        if n >= limit or n >= mk.shape[0]:  # (the rows are ``limit`` long; the second is a guard)
            drop = max(limit // 2, 1)
            n -= drop
            for e in range(n):  # (forward, element by element: the ranges overlap)
                for j in range(MEMO_KEY):
                    mk[e, j] = mk[e + drop, j]
                for j in range(mv.shape[1]):
                    mv[e, j] = mv[e + drop, j]
                mh[e] = mh[e + drop]
            ix[:] = EMPTY
            for e in range(n):
                _memo_index(mh, ix, e)
        for j in range(MEMO_KEY):
            mk[n, j] = key[j]
        for j in range(row.shape[0]):
            mv[n, j] = row[j]
        mh[n] = _memo_hash(key)
        _memo_index(mh, ix, n)
        count[0] = n + 1


class LatencyTable:
    """Packed int64 key (>= 0) -> float64, grown by doubling before it is half full.

    ``arrays`` is what the compiled code takes: the slots as int64 ``[capacity, 2]`` (key, then
    the value's bits) and the same memory as float64 (the value at ``[i, 1]``), so that a probe
    reads one cache line (re-read ``arrays`` after a :meth:`put`: growing replaces it).
    """

    def __init__(self, capacity: int = 1 << 12) -> None:
        self.arrays = self._empty(_pow2_at_least(capacity))
        self.n = 0

    @staticmethod
    def _empty(cap: int) -> tuple[np.ndarray, np.ndarray]:
        ks = np.full((cap, 2), EMPTY, dtype=np.int64)
        return ks, ks.view(np.float64)

    @property
    def capacity(self) -> int:
        """Slots (a power of two, at least twice the entries)."""
        return self.arrays[0].shape[0]

    def __len__(self) -> int:
        return self.n

    def put(self, keys: np.ndarray, values: np.ndarray, overwrite: bool = True) -> None:
        """Store ``values`` (float64) under ``keys`` (int64 >= 0); with ``overwrite`` False a key
        already present keeps its value."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if keys.size and int(keys.min()) < 0:
            raise ValueError(f"latency table keys must be >= 0, got {int(keys.min())}")
        if 2 * (self.n + len(keys)) > self.capacity:  # (room is sized on the keys new: a
            need = self.n + table_missing(self.arrays, keys)  # prefetch repeats many present)
            if 2 * need > self.capacity:
                self._grow(_pow2_at_least(3 * need))
        self.n += table_put(self.arrays, keys, np.ascontiguousarray(values, dtype=np.float64), overwrite)

    def _grow(self, cap: int) -> None:
        ks, fs = self.arrays
        live = ks[:, 0] != EMPTY
        self.arrays = self._empty(cap)
        table_put(self.arrays, ks[live, 0], fs[live, 1], True)

    def keys(self) -> list[int]:
        """The keys (in slot order)."""
        k = self.arrays[0][:, 0]
        return k[k != EMPTY].tolist()

    def __contains__(self, key: int) -> bool:
        v = table_get(self.arrays, int(key))
        return v == v  # (NaN: missing)

    def __getitem__(self, key: int) -> float:
        v = table_get(self.arrays, int(key))
        if v != v:
            raise KeyError(key)
        return float(v)


class MemoTable:
    """Key of :data:`MEMO_KEY` int64 -> a row of float64, in insertion order, at most ``limit``
    entries (the oldest half dropped when full, as :func:`envs.memo.put`).

    ``arrays`` = (keys [limit, MEMO_KEY], rows [limit, width], index, count [1], each key's hash
    [limit]) is what the compiled code takes; rows are ``width`` wide (:meth:`ensure_width` widens them, replacing
    ``arrays``), and an entry uses as many as its writer gave.
    """

    def __init__(self, limit: int, width: int = 8) -> None:
        if limit < 1:
            raise ValueError(f"memo limit must be >= 1, got {limit}")
        self.limit = int(limit)
        self.arrays = (np.zeros((self.limit, MEMO_KEY), dtype=np.int64), np.zeros((self.limit, width)),
                       np.full(_pow2_at_least(2 * self.limit), EMPTY, dtype=np.int64),
                       np.zeros(1, dtype=np.int64), np.zeros(self.limit, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.arrays[3][0])

    @property
    def width(self) -> int:
        return self.arrays[1].shape[1]

    def ensure_width(self, width: int) -> None:
        """Rows at least ``width`` wide (the entries kept)."""
        mk, mv, ix, count, mh = self.arrays
        if mv.shape[1] < width:
            wide = np.zeros((self.limit, width))
            wide[:, :mv.shape[1]] = mv
            self.arrays = (mk, wide, ix, count, mh)

    def put(self, key: tuple, row: np.ndarray) -> None:
        """Insert a new ``key`` (see :func:`memo_put`)."""
        self.ensure_width(len(row))
        memo_put(self.arrays, tuple(int(v) for v in key), np.ascontiguousarray(row, dtype=np.float64), self.limit)

    def get(self, key: tuple) -> np.ndarray | None:
        """A copy of ``key``'s row (all :attr:`width` values), None when missing."""
        e = memo_find(self.arrays, tuple(int(v) for v in key))
        return None if e < 0 else self.arrays[1][e].copy()

    def keys(self) -> list[tuple]:
        """The keys in insertion order."""
        return [tuple(r) for r in self.arrays[0][:len(self)].tolist()]
