"""The placer's best-fit packing, compiled: the ``pack`` loop of ``Placer._layout`` in numba, bit
for bit.

Early in training every env step places two or three new plans (the target and the serving plans
while replicas load), about 130 us each in Python, most of it the best-fit loop that puts packed
replicas one by one on the least free GPUs and merges identical GPUs into classes
(docs/SIMULATOR.md "Speed"). Here the same loop runs on arrays: a GPU class is a row (count, who
opened it, bytes used on each GPU, shards of each process, and the order its processes arrived
in, which the co-residence table and the power model iterate in); candidates are sorted stably by
(free bytes, -shards of the group), as Python's ``list.sort`` does; merging keeps the first class
of each key (opener, bytes rounded to the byte, shards) with its exact bytes, as ``_merge`` does.
tests/test_packkernel.py compares the layouts with the Python loop's on random plans.

``co_residence`` (session 24) then computes the packed classes' co-residence table on the same
arrays (``runtime.colocation.co_residence``, bit for bit and in its dicts' order), which the
placer would otherwise compute from the Python classes it builds.
"""
from __future__ import annotations

import numpy as np

from envs import stepkernel

#: processes as the kernel numbers them: a whole-model instance, then the operator groups
#: (runtime.models.OPERATOR_GROUPS order); who opened a GPU (``GPUClass.kind``) by its index here
KINDS = ("model", "dedicated", "pack")
KIND_DEDICATED, KIND_PACK = KINDS.index("dedicated"), KINDS.index("pack")
#: most GPU classes a placement may hold at once (more: the Python loop places the plan)
MAX_CLASSES = 64
#: classes the loop lets accumulate before merging (= envs.world: ``len(classes) > 8``)
_MERGE_ABOVE = 8

if stepkernel.njit is not None:
    njit = stepkernel.njit

    @njit(cache=True)
    def _copy_row(dst, src, cnt, kind, used, pc, order, npr):  # noqa: ANN001, ANN202
        """GPU class row ``src`` copied into row ``dst``."""
        cnt[dst] = cnt[src]
        kind[dst] = kind[src]
        used[dst] = used[src]
        pc[dst, :] = pc[src, :]
        order[dst, :] = order[src, :]
        npr[dst] = npr[src]

    @njit(cache=True)
    def _merge(n, cnt, kind, used, pc, order, npr):  # noqa: ANN001, ANN202
        """= envs.world._merge on the first ``n`` rows, in place; returns the rows left."""
        m = 0
        n_procs = pc.shape[1]
        for i in range(n):
            if cnt[i] <= 0:
                continue
            found = -1
            key_used = np.rint(used[i])
            for j in range(m):
                if kind[j] != kind[i] or np.rint(used[j]) != key_used:
                    continue
                same = True
                for p in range(n_procs):
                    if pc[j, p] != pc[i, p]:
                        same = False
                        break
                if same:
                    found = j
                    break
            if found >= 0:
                cnt[found] += cnt[i]
            else:
                if m != i:
                    _copy_row(m, i, cnt, kind, used, pc, order, npr)
                m += 1
        return m

    @njit(cache=True)
    def pack(n, cnt, kind, used, pc, order, npr, groups, replicas, tps, needs, cap):  # noqa: ANN001, ANN202, C901
        """Place ``replicas[i]`` replicas of tp ``tps[i]`` of process ``groups[i]``, each needing
        ``needs[i]`` bytes per GPU, in that order onto the ``n`` GPU-class rows (= the ``pack`` loop
        of ``Placer._layout``, merges included); returns the rows in use, or -1 when they would
        exceed the arrays (the caller then runs the Python loop)."""
        limit = cnt.shape[0]
        cand = np.empty(limit, dtype=np.int64)
        for gi in range(groups.shape[0]):
            g = groups[gi]
            need = needs[gi]
            for _ in range(replicas[gi]):
                left = tps[gi]
                # best fit: least free memory first; ties prefer GPUs already hosting this group
                nc = 0
                for i in range(n):
                    if kind[i] != KIND_DEDICATED and cap - used[i] >= need:
                        cand[nc] = i
                        nc += 1
                for a in range(1, nc):  # a stable insertion sort by (free bytes, -shards of g)
                    x = cand[a]
                    fx, sx = cap - used[x], -pc[x, g]
                    b = a - 1
                    while b >= 0:
                        y = cand[b]
                        fy, sy = cap - used[y], -pc[y, g]
                        if fy > fx or (fy == fx and sy > sx):
                            cand[b + 1] = y
                            b -= 1
                        else:
                            break
                    cand[b + 1] = x
                for ci in range(nc):
                    if left == 0:
                        break
                    i = cand[ci]
                    k = min(left, cnt[i])
                    if k < cnt[i]:
                        if n >= limit:
                            return -1
                        _copy_row(n, i, cnt, kind, used, pc, order, npr)
                        cnt[n] = cnt[i] - k
                        n += 1
                        cnt[i] = k
                    used[i] += need
                    if pc[i, g] == 0:
                        order[i, npr[i]] = g
                        npr[i] += 1
                    pc[i, g] += 1
                    left -= k
                if left:
                    if n >= limit:
                        return -1
                    cnt[n] = left
                    kind[n] = KIND_PACK
                    used[n] = need
                    pc[n, :] = 0
                    pc[n, g] = 1
                    order[n, :] = -1
                    order[n, 0] = g
                    npr[n] = 1
                    n += 1
                if n > _MERGE_ABOVE:
                    n = _merge(n, cnt, kind, used, pc, order, npr)
            n = _merge(n, cnt, kind, used, pc, order, npr)
        return n

    @njit(cache=True)
    def co_residence(n, cnt, pc, order, npr, share, porder, sorder, slen):  # noqa: ANN001, ANN202
        """= runtime.colocation.co_residence over the first ``n`` GPU-class rows, bit for bit: fills
        ``porder`` with the processes in the order the Python dict has them (first seen, rows in
        order, each row's processes in arrival order), row ``a`` of ``share`` with process
        ``porder[a]``'s co-resident shards per shard of each process, and ``sorder[a, :slen[a]]``
        with the processes that row's dict holds, in its order; returns how many processes."""
        n_procs = pc.shape[1]
        shards = np.zeros(n_procs)
        seen = np.zeros(n_procs, dtype=np.bool_)
        m = 0
        for i in range(n):
            for j in range(npr[i]):
                p = order[i, j]
                if not seen[p]:
                    seen[p] = True
                    porder[m] = p
                    m += 1
                shards[p] = shards[p] + cnt[i] * pc[i, p]
        present = np.zeros(n_procs, dtype=np.bool_)
        for a in range(m):
            p = porder[a]
            total = shards[p]
            slen[a] = 0
            present[:] = False
            share[a, :] = 0.0
            for i in range(n):
                k = pc[i, p]
                if k == 0:
                    continue
                for j in range(npr[i]):
                    o = order[i, j]
                    nn = pc[i, o] - 1 if o == p else pc[i, o]
                    if nn > 0:
                        if not present[o]:
                            present[o] = True
                            sorder[a, slen[a]] = o
                            slen[a] += 1
                        share[a, o] = share[a, o] + cnt[i] * k * nn / total
        return m

    def warm() -> None:
        """Compile (or load from numba's cache) once per process, outside any env step."""
        cnt = np.zeros(MAX_CLASSES, dtype=np.int64)
        kind = np.zeros(MAX_CLASSES, dtype=np.int64)
        used = np.zeros(MAX_CLASSES, dtype=np.float64)
        pc = np.zeros((MAX_CLASSES, 2), dtype=np.int64)
        order = np.full((MAX_CLASSES, 2), -1, dtype=np.int64)
        npr = np.zeros(MAX_CLASSES, dtype=np.int64)
        one = np.ones(1, dtype=np.int64)
        n = pack(0, cnt, kind, used, pc, order, npr, one, one, one, np.ones(1), 2.0)
        co_residence(n, cnt, pc, order, npr, np.zeros((2, 2)), np.zeros(2, dtype=np.int64),
                     np.zeros((2, 2), dtype=np.int64), np.zeros(2, dtype=np.int64))
