"""The fast simulator's iteration times, compiled: ``FastSimulator._iter`` (memo key, memo and
:meth:`envs.world.StepModel.iteration` on a miss) in numba, bit for bit.

The fast simulator asks for 10-15 iteration times per env step when plans change; in Python the
memo key, the memo and the step model's arithmetic cost about 36 us each, half of an env step of
the shipped policy (docs/SIMULATOR.md "Speed"). This module does the same in compiled code: every
arithmetic operation is the IEEE double operation Python makes, in the same order; ``quantise``
is reimplemented with Python's rounding (half to even); the per-group latencies are the
predictor's own memoised values, copied into a table the compiled code reads (a key it lacks is
reported, filled from ``ExecutionPredictor._group`` / ``_send`` and the call repeated); the memo
keeps Python's eviction rule (the oldest half when full, insertion order). So the simulator gives
the same numbers either way: tests/test_stepkernel.py compares the two on random plans, loads and
busy shares, and bench/env_equivalence.py compares whole trajectories.

The Python code stays the reference: it runs where numba is missing or with ``OPSCALE_KERNEL=0``,
and for the rare call whose values fall outside the kernel's tables. Units: milliseconds inside
the step model, seconds in the memo's values (as ``_iter`` returns them).
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
from typing import Any

import numpy as np

from envs.kernelhash import LatencyTable, MemoTable, memo_find, memo_put, table_get

try:  # numba is a dependency; without it (or with OPSCALE_KERNEL=0) the Python path runs
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    njit = None

#: whether iteration times are computed by the compiled kernel
ENABLED = njit is not None and os.environ.get("OPSCALE_KERNEL", "1") != "0"

# table keys: table id << 56 | batch << 40 | context << 20 | tokens (all quantised)
_TOK_LIMIT = 1 << 20
_CTX_LIMIT = 1 << 20
_BATCH_LIMIT = 1 << 16
#: most missing keys one call reports (the rest are found by the next call)
_MISS_MAX = 64

# header of the structure array (see StepKernel)
_H_GROUPS, _H_STAGES, _H_OPS, _H_HOPS, _H_SEND, _H_M, _H_FILL, _H_L, _H_PROCS = range(9)
_HEADER = 9


class KernelTables:
    """The predictor's latencies as the compiled code reads them (one per ExecutionPredictor).

    ``table`` maps a packed key to ms (an :class:`envs.kernelhash.LatencyTable`); ``tids``
    numbers the (group, tp, phase) curves and the send/recv curve (``"send"``).

    Filling is the cold cost of the compiled path: each missing key costs a call back into Python
    and a restart of the compiled sub-steps, and one profile query (some 200 us) per key. So a
    fill also *prefetches*: the first miss of a one-dimensional curve (every group but attention,
    and send/recv: the key varies in tokens only) fills the curve's whole token grid (every
    quantised count up to ``_PREFETCH_TOKENS``), the first miss of attention's decode curve its
    (batch, context) grid (every quantised batch up to ``_PREFETCH_BATCH`` by every quantised
    context up to ``_PREFETCH_CONTEXT``: 16,896 keys, about a millisecond), and a miss of
    attention's prefill curve its row over contexts at the key's tokens and batch (the running
    sequences' mean prompt moves every sub-step, the chunk and batch much less), each in one
    vectorised profile query. The values are the profile's at those keys, so what the simulator
    computes does not change (the grid is only answered earlier); the vectorised query is checked
    against the scalar one at the keys that were missing, and on any difference in any bit prefetching stops
    for good (``prefetch``), leaving the per-key path. The profile database counts prefetched
    answers in its flags like any other it gives (derived or beyond its grid), with its warnings
    silenced as the predictor silences them.
    """

    def __init__(self, pred: Any) -> None:
        self.pred = pred
        self.table = LatencyTable()
        self.tids: dict[Any, int] = {}
        self.curves: list[Any] = []
        #: whether fills prefetch (see the class docstring); off for good after a mismatch or
        #: with a profile database that cannot answer vectorised queries
        self.prefetch = all(hasattr(pred.db, a) for a in ("group_latency_vec", "send_recv_vec"))
        #: rows prefetched so far: (tid, tokens, context, batch), -1 where the row runs over it
        self._fetched: set[tuple] = set()

    def tid(self, curve: Any) -> int:
        """Id of a curve: ``(group, tp, phase)`` or ``"send"``."""
        t = self.tids.get(curve)
        if t is None:
            if len(self.curves) >= 127:  # the id takes the key's top 7 bits (see _get)
                raise ValueError(f"more than 127 latency curves in one predictor's kernel table: {curve!r}")
            t = self.tids[curve] = len(self.curves)
            self.curves.append(curve)
        return t

    def fill(self, keys: np.ndarray) -> None:
        """Add the values of ``keys`` from the predictor's memoised calls (the Python path's), and
        prefetch the rows they lie in (see the class docstring)."""
        p = self.pred
        bpt = p.cfg.d_model * p.cfg.dtype_bytes
        values = []
        for key in keys.tolist():
            tid, batch = key >> 56, (key >> 40) & 0xFFFF
            ctx, tok = (key >> 20) & 0xFFFFF, key & 0xFFFFF
            curve = self.curves[tid]
            if curve == "send":
                values.append(p._send(tok * bpt))
            else:
                g, tp, phase = curve
                values.append(p._group(g, tok, ctx, batch, tp, phase))
        self.table.put(keys, np.asarray(values, dtype=np.float64))
        if self.prefetch:
            self._prefetch(keys.tolist(), values)

    def _prefetch(self, keys: list[int], values: list[float]) -> None:
        """Fill the rows of the missing ``keys`` (whose scalar ``values`` were just computed) in
        one vectorised query each; stop prefetching for good if a vectorised value differs from
        the scalar one at one of ``keys``. A row of a 1-D curve runs over token counts at the key's
        (context, batch); attention's decode row is its whole (batch = tokens, context) grid; a
        prefill row runs over contexts at the key's (tokens, batch)."""
        rows: dict[tuple, list[tuple[tuple[int, int], float]]] = {}
        for key, value in zip(keys, values):
            tid, batch, ctx, tok = key >> 56, (key >> 40) & 0xFFFF, (key >> 20) & 0xFFFFF, key & 0xFFFFF
            curve = self.curves[tid]
            if curve == "send" or curve[0] != "attn":
                row = (tid, -1, ctx, batch)
            elif curve[2] == "decode":
                if tok != batch:  # (the kernel asks decode with tokens = batch: one token a sequence)
                    continue
                row = (tid, -1, -1, -1)
            else:
                row = (tid, tok, -1, batch)
            if row not in self._fetched:
                rows.setdefault(row, []).append(((tok, ctx), value))
        for row, asked in rows.items():
            self._fetched.add(row)
            tid, tok, ctx, batch = row
            if ctx >= 0:  # over token counts
                toks = _grid(_PREFETCH_TOKENS)
                ctxs, batches = np.full(toks.shape, ctx), np.full(toks.shape, batch)
            elif tok >= 0:  # over contexts
                ctxs = _grid(_PREFETCH_CONTEXT)
                toks, batches = np.full(ctxs.shape, tok), np.full(ctxs.shape, batch)
            else:  # decode: batches x contexts
                toks, ctxs = (m.ravel() for m in np.meshgrid(_grid(_PREFETCH_BATCH), _grid(_PREFETCH_CONTEXT),
                                                             indexing="ij"))
                batches = toks
            got = self._vector(self.curves[tid], toks, ctxs, batches)
            at = dict(zip(zip(toks.tolist(), ctxs.tolist()), got.tolist()))
            if any(x in at and at[x] != v for x, v in asked):  # (compared bit for bit; never NaN)
                self.prefetch = False
                return
            self.table.put((tid << 56) | (batches << 40) | (ctxs << 20) | toks, got, overwrite=False)

    def _vector(self, curve: Any, toks: np.ndarray, ctxs: np.ndarray, batches: np.ndarray) -> np.ndarray:
        """ms of ``curve`` at each (token count, context, batch) of ``toks`` / ``ctxs`` / ``batches``
        (int64 arrays), as the predictor's scalar calls compute them, in one profile query."""
        p = self.pred
        db = p.db
        with warnings.catch_warnings():  # (as ExecutionPredictor's queries: the flags keep the count)
            warnings.simplefilter("ignore")
            if curve == "send":
                bpt = p.cfg.d_model * p.cfg.dtype_bytes
                return np.asarray(db.send_recv_vec(p.gpu_name, (toks * bpt).astype(np.float64)), dtype=np.float64)
            g, tp, phase = curve
            return np.asarray(db.group_latency_vec(g, p.gpu_name, p.model_name, toks.astype(np.float64),
                                                  ctxs.astype(np.float64),
                                                  np.maximum(batches, 1).astype(np.float64), tp, phase),
                              dtype=np.float64)


#: prefetched grids (see KernelTables): every quantised token count / context / decode batch up to these
_PREFETCH_TOKENS = 1 << 16
_PREFETCH_CONTEXT = 1 << 13
_PREFETCH_BATCH = 256


def _grid(limit: int) -> np.ndarray:
    """Every value ``envs.predictor.quantise`` returns in 1 .. ``limit`` (ascending, int64)."""
    out = list(range(1, min(limit, 64) + 1))
    e = 2
    while (32 << e) <= limit:  # above 64: 16 steps per power of two, 64 + 4 .. 128, 128 + 8 .. 256, ...
        out += [j << e for j in range(17, 33) if (j << e) <= limit]
        e += 1
    return np.asarray(out, dtype=np.int64)


def tables_for(pred: Any) -> KernelTables:
    """The predictor's KernelTables (made on first use)."""
    kt = getattr(pred, "_kernel_tables", None)
    if kt is None:
        kt = pred._kernel_tables = KernelTables(pred)
    return kt


if njit is not None:
    @njit(cache=True)
    def _quantise(x: float) -> int:  # = envs.predictor.quantise
        if x <= 64:
            return int(x + 0.5) if x > 0 else 0
        n = int(x + 0.5)
        if n <= 64:
            return n
        e = int(math.floor(math.log2(n))) - 4
        step = 1 << e
        return int(round(n / step)) * step

    @njit(cache=True)
    def _get(table, miss, state, tid, tok, ctx, batch):  # noqa: ANN001, ANN202
        """Latency of a table key (``table``: a LatencyTable's arrays); a missing key is recorded
        in ``miss`` (``state[0]`` counts them, a float) and an out-of-range one sets ``state[1]``;
        both return 0.0 (the call is then redone)."""
        if tok >= _TOK_LIMIT or ctx >= _CTX_LIMIT or batch >= _BATCH_LIMIT:
            state[1] = 1.0
            return 0.0
        key = (tid << 56) | (batch << 40) | (ctx << 20) | tok
        v = table_get(table, key)
        if v != v:
            c = int(state[0])
            if c < miss.shape[0]:
                miss[c] = key
            state[0] = c + 1.0
            return 0.0
        return v

    @njit(cache=True)
    def _iteration(table, miss, state, S, F, slow, n_dec, ctx_dec, p_tok, ctx_pre, n_pre, tot_tokens,
                   tot_seqs, work):  # noqa: ANN001, ANN202, C901
        """= StepModel.iteration for ``n_dec + p_tok > 0``: (iteration ms, busy ms per process in
        StepKernel.procs order, a view into ``work``). A missing table key is recorded in ``miss`` /
        ``state[0]``, one beyond the table in ``state[1]``; the result is then meaningless (the
        caller redoes it). ``work``: scratch of at least :func:`_work_size` floats (its arrays are
        carved from it: the compiled code allocates nothing per iteration timed)."""
        tokens = n_dec + p_tok
        if tot_tokens < tokens:
            tot_tokens = tokens
        if tot_seqs < n_dec + n_pre:
            tot_seqs = n_dec + n_pre
        n_g, n_st, n_ops = S[_H_GROUPS], S[_H_STAGES], S[_H_OPS]
        hops, send_tid, n_m, fill, L, n_procs = S[_H_HOPS], S[_H_SEND], S[_H_M], S[_H_FILL], S[_H_L], S[_H_PROCS]
        o_groups = _HEADER
        o_stages = o_groups + 5 * n_g
        o_ops = o_stages + 3 * n_st
        o_ends = o_ops + n_ops
        o_m = o_ends + 8
        slack = F[n_ops]
        ms_m = work[:n_m]
        busy_m = work[n_m:n_m + n_m * n_procs].reshape((n_m, n_procs))
        busy_m[:] = 0.0
        w = n_m + n_m * n_procs
        gts = work[w:w + n_g]
        share = work[w + n_g:w + 2 * n_g]
        stage_ms = work[w + 2 * n_g:w + 2 * n_g + n_st]
        for mi in range(n_m):
            m = S[o_m + mi]
            tok_m = tokens / m
            q_tok_m = -1
            for i in range(n_g):
                kind, tid, tid_pre = S[o_groups + 5 * i], S[o_groups + 5 * i + 1], S[o_groups + 5 * i + 2]
                r, mb = S[o_groups + 5 * i + 3], S[o_groups + 5 * i + 4]
                share[i] = 1.0
                if kind == 0:  # attention: decode kernel over the decodes, prefill kernel over the chunk
                    gt = 0.0
                    if n_dec > 0:
                        q = _quantise(n_dec / m)
                        gt += _get(table, miss, state, tid, q, _quantise(ctx_dec), q)
                    if p_tok > 0:
                        gt += _get(table, miss, state, tid_pre, _quantise(p_tok / m), _quantise(ctx_pre),
                                   _quantise(max(n_pre / m, 1.0)))
                elif kind == 1:  # on the unit's own GPUs
                    if q_tok_m < 0:
                        q_tok_m = _quantise(tok_m)
                    gt = _get(table, miss, state, tid, q_tok_m, 0, 1)
                else:  # a shared remote pool
                    k = r
                    if fill != 0 and tot_tokens <= tot_seqs and tot_seqs < r * mb:
                        k = min(r, max(1, int(math.ceil(tot_seqs / mb))))
                        share[i] = k / r
                    seqs = tot_seqs / k
                    calls = max(1.0, seqs / mb)
                    per_call = tot_tokens / k / calls / m
                    gt = (_get(table, miss, state, tid, _quantise(per_call), 0, 1) if per_call > 0 else 0.0) * calls
                gts[i] = gt
            for j in range(n_st):
                proc, a, b_end = S[o_stages + 3 * j], S[o_stages + 3 * j + 1], S[o_stages + 3 * j + 2]
                t = 0.0
                b = 0.0
                for o in range(a, b_end):
                    i = S[o_ops + o]
                    xx = F[o] * gts[i] / L
                    t += xx
                    b += xx * share[i]
                t *= slow[proc]
                b *= slow[proc]
                stage_ms[j] = t
                busy_m[mi, proc] += b * m * L
            if hops > 0:
                hop_ms = _get(table, miss, state, send_tid, _quantise(tok_m), 0, 0)
                top = stage_ms[0]
                for j in range(1, n_st):
                    if stage_ms[j] > top:
                        top = stage_ms[j]
                if hop_ms > top:
                    top = hop_ms
                s = 0.0
                for j in range(n_st):
                    s += stage_ms[j]
                for _ in range(hops):
                    s += hop_ms
                layer_ms = max(m * top, s)
            else:
                layer_ms = 0.0
                for j in range(n_st):
                    layer_ms += stage_ms[j]
            ms_m[mi] = L * layer_ms
        best = 0
        for mi in range(1, n_m):
            if ms_m[mi] < ms_m[best]:
                best = mi
        if slack != 0.0:
            bound = ms_m[best] * (1.0 + slack)
            for mi in range(n_m):
                if ms_m[mi] <= bound:
                    best = mi
                    break
        total = ms_m[best]
        busy = busy_m[best]  # (a view: only this row is read from here on)
        for e in range(2):  # embed, then head: once per step, local or one hop away
            tid, local, proc, r = S[o_ends + 4 * e], S[o_ends + 4 * e + 1], S[o_ends + 4 * e + 2], S[o_ends + 4 * e + 3]
            tok = tokens if e == 0 else n_dec + n_pre
            if local != 0:
                t = _get(table, miss, state, tid, _quantise(tok), 0, 1) if tok > 0 else 0.0
            else:
                xe = tot_tokens / r if e == 0 else tot_seqs / r
                t = _get(table, miss, state, tid, _quantise(xe), 0, 1) if xe > 0 else 0.0
            t *= slow[proc]
            if local == 0:
                t += _get(table, miss, state, send_tid, _quantise(tok), 0, 0) if tok > 0 else 0.0
            total += t
            busy[proc] += t
        kernel = total
        # = ExecutionPredictor.step_ms(kernel, n_dec, kernel * p_tok / tokens)
        pre = kernel * p_tok / tokens
        if kernel <= 0:
            return 0.0, busy
        floor, base, per_seq, pbase, pscale = F[n_ops + 1], F[n_ops + 2], F[n_ops + 3], F[n_ops + 4], F[n_ops + 5]
        ms = max(kernel, floor)
        if n_dec > 0:
            ms += base + per_seq * n_dec
        if pre > 0:
            ms += pbase + pscale * pre
        return ms, busy

    @njit(cache=True)
    def _memo_key(sig_id, ukey_id, units, remote, n_dec, ctx, chunk, n_pre, bg_chunk, prompt, extra):  # noqa: ANN001, ANN202
        """= FastSimulator._iter's memo key, with ids for the signature and the rounded busy shares."""
        return (sig_id, int(round(n_dec)), _quantise(ctx), _quantise(chunk), int(math.ceil(n_pre)), _quantise(prompt),
                _quantise(bg_chunk) if remote else 0, ukey_id, units if remote else 0,
                _quantise(extra) if remote else 0)

    @njit(cache=True)
    def _work_size(S):  # noqa: ANN001, ANN202
        """Floats of scratch :func:`_memo_iter` needs for a step kernel's ``S`` (state, the memo
        value, then :func:`_iteration`'s arrays)."""
        n_g, n_st, n_m, n_procs = S[_H_GROUPS], S[_H_STAGES], S[_H_M], S[_H_PROCS]
        return 2 + (2 + n_procs) + n_m + n_m * n_procs + 2 * n_g + n_st

    @njit(cache=True)
    def _memo_iter(memo, table, S, F, slow, limit, sig_id, ukey_id, units, remote, n_dec, ctx, chunk, n_pre,
                   bg_chunk, prompt, extra, out, miss, work):  # noqa: ANN001, ANN202
        """= FastSimulator._iter: the memo's value for these inputs into ``out`` ([seconds, 1.0 if
        the busy dict is empty else 0.0, busy share per process...]; ``memo``: a MemoTable's
        arrays, ``table``: a LatencyTable's). Returns 0 when done, n > 0 when n table keys are
        missing (the first ones in ``miss``: fill them, call again), -1 for a value beyond the
        tables or an iteration of 0 ms (Python computes it and stores it with ``MemoTable.put``).
        ``work``: scratch of at least :func:`_work_size` floats (reused from call to call: an
        array allocated here per iteration timed cost some 0.3 us in all, session 34)."""
        key = _memo_key(sig_id, ukey_id, units, remote, n_dec, ctx, chunk, n_pre, bg_chunk, prompt, extra)
        e = memo_find(memo, key)
        if e >= 0:
            out[:] = memo[1][e, :out.shape[0]]
            return 0
        nd, cp, npre = float(key[1]), float(key[3]), float(key[4])
        bg = float(key[6]) if remote else cp
        ex = float(key[9])
        tot_tokens = cp + nd + (units - 1) * (nd + bg) + ex
        tot_seqs = units * nd + npre + (units - 1) * (npre if bg > 0 else 0.0) + ex
        n_procs = S[_H_PROCS]
        if work.shape[0] < _work_size(S):  # (numba does not check bounds: refuse rather than write past)
            raise ValueError("memo scratch smaller than _work_size(S)")
        state = work[:2]
        value = work[2:4 + n_procs]
        value[:] = 0.0
        if nd + cp <= 0:  # StepResult(0.0, {})
            value[1] = 1.0
            memo_put(memo, key, value, limit)
            out[:] = value
            return 0
        state[:] = 0.0
        ms, busy = _iteration(table, miss, state, S, F, slow, nd, float(key[2]), cp, float(key[5]), npre, tot_tokens,
                              tot_seqs, work[4 + n_procs:])
        if state[1] != 0.0 or (state[0] == 0.0 and ms == 0.0):
            return -1
        if state[0] > 0.0:
            return int(state[0])
        value[0] = ms / 1000.0
        for i in range(n_procs):
            value[2 + i] = min(busy[i] / ms, 1.0)
        memo_put(memo, key, value, limit)
        out[:] = value
        return 0

    @njit(cache=True)
    def _slowdowns(util, off, idx, share, contention, out):  # noqa: ANN001, ANN202
        """= ``StepModel.slowdown`` of each process, bit for bit: process ``i``'s co-resident shards
        are ``idx[off[i]:off[i + 1]]`` (indices into ``util``, the busy shares in process order) with
        ``share`` shards per shard of it, in the order its peers dict has them."""
        for i in range(out.shape[0]):
            a, b = off[i], off[i + 1]
            if a == b:
                out[i] = 1.0
                continue
            s = 0.0
            for j in range(a, b):
                x = util[idx[j]]
                if 0.0 > x:  # min(max(x, 0.0), 1.0) as Python evaluates it
                    x = 0.0
                if 1.0 < x:
                    x = 1.0
                s += share[j] * x
            out[i] = 1.0 + contention * s


_SERIALS = itertools.count()


def _template(sm: Any, kt: KernelTables) -> tuple:
    """(tables, processes, S, F, the slots of S that hold replicas and batch limits) of a step
    model's shape (``sm.shape``): the arrays :class:`StepKernel` copies for each step model of that
    shape, with the group rows' (replicas, max_batch) and the ends' replicas filled in."""
    order: dict[str, int] = {}
    for proc, _ in sm._stages:
        order.setdefault(proc, len(order))
    for _, _, proc, _, _ in sm._ends:
        order.setdefault(proc, len(order))
    head = [len(sm._groups), len(sm._stages), 0, sm.hops, kt.tid("send"), len(sm.m_choices), int(sm.fill),
            sm.layers, len(order)]
    groups, stages, ops, fracs = [], [], [], []
    slots = []
    for kind, g, tp, _, _ in sm._groups:
        slots += [len(head) + len(groups) + 3, len(head) + len(groups) + 4]
        groups += [kind, kt.tid((g, tp, "decode")), kt.tid((g, tp, "prefill")) if kind == 0 else 0, 0, 0]
    for proc, row in sm._stages:
        stages += [order[proc], len(ops), len(ops) + len(row)]
        for i, frac in row:
            ops.append(i)
            fracs.append(frac)
    head[2] = len(ops)
    ends = []
    base = len(head) + len(groups) + len(stages) + len(ops)
    for g, local, proc, tp, _ in sm._ends:
        slots.append(base + len(ends) + 3)
        ends += [kt.tid((g, tp, "decode")), int(local), order[proc], 0]
    S = np.asarray(head + groups + stages + ops + ends + list(sm.m_choices), dtype=np.int64)
    F = np.asarray(fracs + [float(sm.slack)] + [float(v) for v in sm.p._ovp], dtype=np.float64)
    return kt, tuple(order), S, F, np.asarray(slots, dtype=np.int64)


class StepKernel:
    """One step model's structure as the compiled code reads it (made once per StepModel).

    Args:
        sm: the :class:`envs.world.StepModel`.
    """

    def __init__(self, sm: Any) -> None:
        kt = tables_for(sm.p)
        self.kt = kt
        sh = sm.shape
        tpl = sh.kernel
        if tpl is None or tpl[0] is not kt:
            tpl = sh.kernel = _template(sm, kt)
        _, self.procs, S, self.F, slots = tpl
        #: processes in the order the Python path's busy dict has them: stages, then embed / head
        #: (from the shape's template, with this plan's replicas and batch limits in their slots)
        self.S = S.copy()
        self.S[slots] = [v for _, _, _, r, mb in sm._groups for v in (r, mb)] + [e[4] for e in sm._ends]
        #: a number no other StepKernel of this process has (the identity of its StepModel)
        self.serial = float(next(_SERIALS))
        n = len(self.procs)
        self._ones = np.ones(n, dtype=np.float64)
        #: the last memo value (see _memo_iter)
        self.out = np.zeros(2 + n, dtype=np.float64)
        self._slow: tuple = (None, self._ones)  # (util dict, slowdowns in procs order)
        self._peers: tuple | None = None         # the co-residence table as arrays (_peer_arrays)
        self._blobs: tuple | None = None         # (S, offsets and indices; shares) for segments_io (blobs)
        self.memo_ids: tuple = (None, 0)         # (KernelMemo, this step model's signature id there)
        self.arena: tuple = (None, -1, 0, 0)     # (BlobArena, its generation, int offset, float offset)

    def slow_for(self, sm: Any, util: dict[str, float]) -> np.ndarray:
        """``sm.slowdowns(util)`` in :attr:`procs` order (ones without co-residence); cached while
        the same util dict is passed (the fast simulator replaces it, never mutates it)."""
        if self._slow[0] is not util:
            if sm._has_peers:
                off, idx, share = self._peer_arrays(sm)
                arr = np.empty(len(self.procs))
                u = np.asarray([util.get(p, 0.0) for p in self.procs], dtype=np.float64)
                _slowdowns(u, off, idx, share, float(sm.sc.contention), arr)
            else:
                arr = self._ones
            self._slow = (util, arr)
        return self._slow[1]

    def blobs(self, sm: Any) -> tuple[np.ndarray, np.ndarray]:
        """(:attr:`S`, then the co-residence offsets (n + 1) and indices of :meth:`_peer_arrays`, as
        one int64 array; the co-residence shares), as ``fluidkernel.segments_io`` reads a segment
        (made on first use; offsets all 0 and no indices without co-residence)."""
        if self._blobs is None:
            if sm._has_peers:
                off, idx, share = self._peer_arrays(sm)
            else:
                off = np.zeros(len(self.procs) + 1, dtype=np.int64)
                idx, share = off[:0], np.zeros(0, dtype=np.float64)
            self._blobs = (np.concatenate((self.S, off, idx)), share)
        return self._blobs

    def _peer_arrays(self, sm: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets, indices into :attr:`procs`, shares): each process's co-resident shards as
        ``_slowdowns`` reads them (made on first use; a co-resident process is one of the layout's,
        so one of :attr:`procs`)."""
        if self._peers is None:
            at = {p: i for i, p in enumerate(self.procs)}
            off, idx, share = [0], [], []
            for p in self.procs:
                for o, v in sm._peers.get(p, ()):
                    idx.append(at[o])
                    share.append(v)
                off.append(len(idx))
            self._peers = (np.asarray(off, dtype=np.int64), np.asarray(idx, dtype=np.int64),
                           np.asarray(share, dtype=np.float64))
        return self._peers


_WARM = False


def _fit(a: np.ndarray, used: int, need: int) -> np.ndarray:
    """``a`` if it holds ``need`` values, else a copy of its first ``used`` in one twice as long
    as needed."""
    if need <= a.shape[0]:
        return a
    b = np.zeros(2 * need, dtype=a.dtype)
    b[:used] = a[:used]
    return b


class BlobArena:
    """The step kernels' blobs (:meth:`StepKernel.blobs`) side by side in one int64 and one
    float64 array, which ``fluidkernel.segments_io`` takes whole, with each run's offsets in its
    slots: an interval's call then joins no arrays (two ``np.concatenate`` of the runs' blobs cost
    some 15 us a step in situ, session 34).

    A kernel's blobs are appended on its first use and stay. Once more than ``limit`` values are
    used, the next :meth:`start` empties the arena (a new generation: kernels placed before are
    appended again when next used), which bounds it while step models come and go.
    """

    def __init__(self, limit: int = 1 << 20) -> None:
        self.ints = np.zeros(1 << 12, dtype=np.int64)
        self.floats = np.zeros(1 << 10, dtype=np.float64)
        self.n_int = self.n_float = 0
        self.gen = 0
        self.limit = int(limit)

    def start(self) -> None:
        """Called before the placements of one call (never empties the arena inside one)."""
        if self.n_int > self.limit or self.n_float > self.limit:
            self.n_int = self.n_float = 0
            self.gen += 1

    def place(self, k: StepKernel, sm: Any) -> tuple:
        """``k``'s (arena, generation, int offset, float offset), its blobs appended if needed."""
        a = k.arena
        if a[0] is self and a[1] == self.gen:
            return a
        ib, fb = k.blobs(sm)
        i0, f0 = self.n_int, self.n_float
        self.ints = _fit(self.ints, i0, i0 + len(ib))
        self.ints[i0:i0 + len(ib)] = ib
        self.floats = _fit(self.floats, f0, f0 + len(fb))
        self.floats[f0:f0 + len(fb)] = fb
        self.n_int, self.n_float = i0 + len(ib), f0 + len(fb)
        a = k.arena = (self, self.gen, i0, f0)
        return a


class KernelMemo:
    """The fast simulator's iteration-time memo, held and filled by the compiled code.

    Keys are ``FastSimulator._iter``'s with the step model's signature and the rounded busy
    shares replaced by ids (numbered here in order of first use, never reused); values hold
    (seconds, busy shares). ``limit`` entries at most, evicted as :func:`envs.memo.put` does.
    """

    def __init__(self, limit: int = 32_768) -> None:
        self.limit = int(limit)
        self.memo = MemoTable(self.limit)
        self.sig_ids: dict[tuple, int] = {}
        self.ukey_ids: dict[tuple, int] = {}
        self._uk: tuple = (None, 0)  # (the last rounded busy shares looked up, their id)
        self._miss = np.empty(_MISS_MAX, dtype=np.int64)  # missing table keys of the last call
        #: the step kernels' blobs as ``fluidkernel.segments_io`` reads them
        self.arena = BlobArena()
        self._work = np.zeros(0)  # (lookup()'s scratch for _memo_iter, grown to the widest kernel)
        _warm()

    def __len__(self) -> int:
        return len(self.memo)

    def segments(self, sim: Any, segs: list[tuple]) -> tuple[StepKernel, dict[str, float], list, np.ndarray,
                                                           np.ndarray]:
        """What ``fluidkernel.segments_io`` takes of the runs of sub-steps ``segs`` (the fast
        simulator's: (layout, step model, first sub-step, end, units, batch limit, KV capacity)
        each, their step models of one shape): (the first one's StepKernel, the busy shares the
        slowdowns are computed from, the runs' SEG_W slots each in SG_* order, the int blob and
        the float blob: the :class:`BlobArena`'s arrays, which hold every run's). Lookups are made
        at the simulator's current busy shares (``FastSimulator._ukey_for``); the compiled
        sub-steps compute the slowdowns themselves. One call an interval (a call per run and per
        part cost microseconds each in situ)."""
        slots: list = []
        arena = self.arena
        arena.start()
        k0 = util = None
        for layout, sm, s0, s1, U, B, kv_cap in segs:
            k, sig_id, ukey_id = self._ids(sm, sim._rounded_util() if layout.shared else ())  # (= _ukey_for's)
            if k0 is None:
                k0, util = k, sim.util
            at = k.arena
            if at[0] is not arena or at[1] != arena.gen:
                at = arena.place(k, sm)
            slots += (s0, s1, layout.units, sm.remote, sm.fill, sig_id, ukey_id, U, B, kv_cap, layout.unit_kv_tokens,
                      k.serial, sm._has_peers, at[2], len(k.S), at[3])
        return k0, util, slots, arena.ints, arena.floats

    def _ids(self, sm: Any, rnd: tuple) -> tuple[StepKernel, int, int]:
        """(``sm``'s StepKernel, its signature id, the id of the rounded busy shares ``rnd``)."""
        k = sm._kernel
        if k is None:
            k = sm._kernel = StepKernel(sm)
        if k.memo_ids[0] is not self:
            self.memo.ensure_width(2 + len(k.procs))
            k.memo_ids = (self, self.sig_ids.setdefault(sm.signature, len(self.sig_ids)))
        if self._uk[0] is not rnd:  # (one tuple per util dict: the runs of an interval share it)
            self._uk = (rnd, self.ukey_ids.setdefault(rnd, len(self.ukey_ids)))
        return k, k.memo_ids[1], self._uk[1]

    def _prepare(self, sm: Any, uk: tuple) -> tuple[StepKernel, int, int, np.ndarray]:
        """``_ids`` and the slowdowns in the kernel's process order (``uk``: ``_ukey_for``'s)."""
        k, sig_id, ukey_id = self._ids(sm, uk[2])
        return k, sig_id, ukey_id, k.slow_for(sm, uk[1])

    def resolve(self, sim: Any, layout: Any, sm: Any, k: StepKernel, args: tuple, r: int) -> None:
        """What a compiled lookup with ``args`` (``_memo_key``'s) could not do, done in Python: ``r``
        > 0: fill the kernel tables with the missing latencies (``self._miss``); -1: time the
        iteration with the Python step model (it raises what it raises) and store it in the memo."""
        if r > 0:
            k.kt.fill(self._miss[:min(r, _MISS_MAX)])
            return
        key = _memo_key(*args)
        sec, busy = sim._timed(layout, sm, key)
        value = np.zeros(2 + len(k.procs))
        value[0] = sec
        value[1] = 0.0 if busy else 1.0
        for i, p in enumerate(k.procs):
            value[2 + i] = busy.get(p, 0.0)
        self.memo.put(key, value)
        k.out[:] = value

    def lookup(self, sim: Any, layout: Any, sm: Any, uk: tuple, n_dec: float, ctx: float, chunk: float, n_pre: float,
               bg_chunk: float, prompt: float, extra: float) -> tuple[float, dict[str, float]]:
        """= ``FastSimulator._iter`` (``uk``: the simulator's (layout, util, rounded shares))."""
        k, sig_id, ukey_id, slow = self._prepare(sm, uk)
        args = (sig_id, ukey_id, layout.units, sm.remote, float(n_dec), float(ctx), float(chunk),
                float(n_pre), float(bg_chunk), float(prompt), float(extra))
        need = int(_work_size(k.S))
        if self._work.shape[0] < need:
            self._work = np.zeros(need)
        while True:
            r = _memo_iter(self.memo.arrays, k.kt.table.arrays, k.S, k.F, slow, self.limit, *args, k.out, self._miss,
                           self._work)
            if r == 0:
                break
            self.resolve(sim, layout, sm, k, args, r)
            if r < 0:
                break
        v = k.out.tolist()
        return v[0], ({} if v[1] else dict(zip(k.procs, v[2:])))


def _warm() -> None:
    """Compile (or load from numba's cache) the kernels once per process, outside any env step."""
    global _WARM
    if _WARM:
        return
    _WARM = True
    memo, table = MemoTable(4), LatencyTable()
    # one local group in one stage, no hops, embed and head local, one micro-batch count
    S = np.asarray([1, 1, 1, 0, 0, 1, 0, 1, 1] + [1, 0, 0, 1, 1] + [0, 0, 1] + [0] + [0, 1, 0, 1] * 2 + [1],
                   dtype=np.int64)
    F = np.asarray([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    out, miss = np.zeros(3), np.empty(_MISS_MAX, dtype=np.int64)
    args = (0, 0, 1, False, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    n = _memo_iter(memo.arrays, table.arrays, S, F, np.ones(1), 4, *args, out, miss, np.zeros(_work_size(S)))
    table.put(miss[:n], np.ones(n))
    table.put(miss[:n], np.ones(n), overwrite=False)
    memo.put(_memo_key(*args), out)
    _slowdowns(np.ones(1), np.asarray([0, 1, 1], dtype=np.int64), np.zeros(1, dtype=np.int64), np.ones(1), 0.1,
               np.zeros(2))
