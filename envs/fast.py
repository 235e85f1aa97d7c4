"""The fast fidelity: a per-interval fluid / queueing model of the same cluster, for training.

Within a control interval the model takes ``sub_steps`` fluid steps. Each step: arrivals
(the interval's trace aggregates, spread evenly) join a FIFO admission queue; admission
fills free batch slots and KV capacity of the serving attention units (all units load-
balanced, so one unit stands for all); the units iterate with the iteration time of the
shared :class:`envs.world.StepModel` at the current per-unit batch and prefill chunk;
prefill drains the prefill backlog at ``prefill_chunk_tokens`` per iteration; decodes
finish at Little's-law rate running / (mean output x iteration time). Backlog carries
across intervals. TTFT and TBT percentiles come from a fitted distribution (queue wait
from Little's law, prefill iterations at the interval's prompt-length quantiles, TBT a
mixture of decode-only and mixed iterations); calibration against the reference is
reported in docs/SIMULATOR.md. All state is a handful of floats: an env step costs
tens of microseconds.

Plan changes follow the reference: removed attention units hand the serving units what fits
in their free slots and KV (``kv_migration``, the copy time left out: milliseconds) and keep
the rest (a draining pool outside the serving units' slots and KV, still loading the shared
pools) until those finish; the prefill load the shared pools see is solved with the pace it
causes (a burst in which every unit prefills slows every unit); and SLO attainment is
credited when requests finish, with the TTFT-met probability of the requests in the system
(so a burst's misses count against the burst's requests, not those finishing meanwhile).
"""
from __future__ import annotations

import math

import numpy as np

from runtime.control import SLO

from envs import fluidkernel, stepkernel
from envs.base import IntervalMetrics, Simulator, TraceIndex
from envs.memo import put
from envs.predictor import ExecutionPredictor, quantise
from envs.scenario import Scenario
from envs.world import Layout, StepModel

_Z99 = 2.326
#: share of a sub-step's backlog growth (a burst) that the p99 / p50 arrival finds ahead of it
#: (1 / 0.5 would be a fluid backlog growing linearly through the sub-step; halved, because
#: join-shortest-queue routing spreads a burst's long prompts over the units)
_G99, _G50 = 0.5, 0.25
#: rounds of the fixed point between the shared pools' prefill load and the iteration pace
_ROUNDS = 3
#: the accumulators' slots of fluidkernel.segments_io's vector (outputs: written by the kernel)
_ACC_PAD = (0.0,) * fluidkernel.N_ACC


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _lognorm_cdf(s: float, p50: float, p99: float) -> float:
    """P(X <= s) for a log-normal with the given median and p99 (degenerate when equal)."""
    if p50 <= 0:
        return 1.0
    sigma = max(math.log(max(p99, p50) / p50) / _Z99, 0.02)
    return _phi((math.log(max(s, 1e-12)) - math.log(p50)) / sigma)


class FastSimulator(Simulator):
    """Fluid model (see module docstring). ``sub_steps`` fluid steps per control interval."""

    fidelity = "fast"

    def __init__(self, scenario: Scenario, trace, pred: ExecutionPredictor, slo: SLO, seed: int = 0,
                 cache: dict | None = None, sub_steps: int = 5) -> None:
        super().__init__(scenario, trace, pred, slo, seed, cache)
        self.sub_steps = int(sub_steps)
        self._it: dict[tuple, tuple[float, dict]] = self.cache.setdefault("fast_iter", {})
        #: the memo and the step model compiled (envs/stepkernel.py), or None for the Python path
        self._kmemo: stepkernel.KernelMemo | None = None
        if stepkernel.ENABLED:
            if "fast_iter_kernel" not in self.cache:
                self.cache["fast_iter_kernel"] = stepkernel.KernelMemo()
            self._kmemo = self.cache["fast_iter_kernel"]
        self._reset_queues()

    # ------------------------------------------------------------------ state
    def _reset_queues(self) -> None:
        self.q = 0.0          # requests waiting for admission
        self.q_prompt = 0.0   # their prompt tokens
        self.q_output = 0.0   # their output tokens
        self.n_dec = 0.0      # decoding sequences (all units)
        self.n_pre = 0.0      # sequences admitted, prompt not yet fully prefilled
        self.backlog = 0.0    # prompt tokens admitted but not yet prefilled
        self.r_prompt = 1.0   # mean prompt of running sequences
        self.r_output = 1.0   # mean output of running sequences
        self.kv = 0.0         # KV tokens held
        self._last_T = 0.05
        self._op_ref = None   # operating point the cached iteration times were computed at
        self._op_val = None
        self._op_full99 = 0.0
        self._t_it = 0.05     # mean iteration time of the last sub-step (seconds)
        self.drain_until: list[tuple[float, int]] = []
        # sequences left on removed (draining) attention units: they finish there, outside the
        # serving units' batch slots and KV, still loading the shared pools
        self.d_n = 0.0        # decoding sequences on draining units
        self.d_kv = 0.0       # their KV tokens
        self.d_units = 0.0    # draining units holding them
        self._U = 0.0         # serving units in the last sub-step
        self._unit_sig = None  # (attention placement, unit tp) of the serving units
        self._ukey: tuple = (None, None, ())  # (layout, util dict, the memo key's busy shares)
        self._urnd: tuple = (None, ())         # (util dict, its busy shares rounded for memo keys)
        # the compiled sub-steps' state (envs/fluidkernel.py: the fluid state, the interval's
        # accumulators, the cached operating point) and the cached busy shares, or None
        self._kx = fluidkernel.new_state() if self._kmemo is not None else None
        self._kbd = self._kbm = np.zeros(0)
        self._kfail = np.zeros(7)  # a failed lookup's arguments (fluidkernel.substeps's ``fail``)
        if not hasattr(self, "sub_index"):
            h = self.dt / self.sub_steps
            self.sub_index = TraceIndex(self.arrival, self.prompt, self.output, h, self.n_intervals * self.sub_steps,
                                        quantiles=False)
            # Python floats: scalar arithmetic on numpy scalars is several times slower
            sub, idx = self.sub_index, self.index
            self._sub = (sub.count.tolist(), sub.prompt_sum.tolist(), sub.output_sum.tolist())
            self._int = (idx.count.tolist(), idx.prompt_sum.tolist(), idx.output_sum.tolist(),
                         idx.prompt_p50.tolist(), idx.prompt_p99.tolist())
            self._sub_np = tuple(np.ascontiguousarray(v, dtype=np.float64)
                                 for v in (sub.count, sub.prompt_sum, sub.output_sum))
        # run-level accumulators
        self.tot_arrived = 0.0
        self.tot_finished = 0.0
        self.tot_met = 0.0
        #: sum over requests in the system (queued or running) of P(their TTFT meets the SLO):
        #: finished requests take the mean with them, so a burst's misses are counted when its
        #: requests finish, as the reference counts them
        self.sys_ok = 0.0
        self.tot_rejected = 0.0
        self.ttft_rec: list[tuple[float, float, float]] = []
        self.tbt_rec: list[tuple[float, float, float]] = []

    def _idle(self) -> bool:
        return self.q < 0.5 and self.n_dec + self.n_pre + self.d_n < 0.5

    # ------------------------------------------------------------------ iteration time, memoised
    def _iter(self, layout: Layout, sm: StepModel, n_dec: float, ctx: float, chunk: float, n_pre: float,
              bg_chunk: float, prompt: float, extra: float = 0.0) -> tuple[float, dict]:
        """(seconds, busy shares) of one iteration of a unit with ``n_dec`` decodes and a
        ``chunk``-token prefill, while every unit's iteration carries ``n_dec`` decodes and
        ``bg_chunk`` prefill tokens on average (the load the shared remote pools see), plus
        ``extra`` decode tokens of draining units on the shared pools."""
        uk = self._ukey
        if uk[0] is not layout or uk[1] is not self.util:
            uk = self._ukey_for(layout)
        if self._kmemo is not None:  # the same, compiled (envs/stepkernel.py)
            return self._kmemo.lookup(self, layout, sm, uk, n_dec, ctx, chunk, n_pre, bg_chunk, prompt, extra)
        ukey = uk[2]
        remote = sm.remote
        key = (sm.signature, int(round(n_dec)), quantise(ctx), quantise(chunk), int(math.ceil(n_pre)),
               quantise(prompt), quantise(bg_chunk) if remote else 0, ukey, layout.units if remote else 0,
               quantise(extra) if remote else 0)
        hit = self._it.get(key)
        if hit is None:
            hit = put(self._it, key, self._timed(layout, sm, key), 32_768)
        return hit

    def _ukey_for(self, layout: Layout) -> tuple:
        """(layout, busy shares, the memo key's rounded busy shares) for lookups under ``layout`` at
        the current busy shares (cached in ``self._ukey``; ``self.util`` is replaced, never mutated,
        once per interval). The rounded shares matter only where processes share GPUs."""
        uk = self._ukey
        if uk[0] is not layout or uk[1] is not self.util:
            uk = self._ukey = (layout, self.util, self._rounded_util() if layout.shared else ())
        return uk

    def _rounded_util(self) -> tuple:
        """The busy shares rounded for memo keys (one tuple per util dict: it serves many layouts)."""
        r = self._urnd
        if r[0] is not self.util:
            r = self._urnd = (self.util, tuple([round(v, 1) for v in self.util.values()]))
        return r[1]

    def _timed(self, layout: Layout, sm: StepModel, key: tuple) -> tuple[float, dict]:
        """The memo's value for ``key`` (see :meth:`_iter`): (seconds, busy shares) of the iteration
        at the key's quantised load, every unit carrying it, at the busy shares ``self.util``."""
        remote = sm.remote
        u = layout.units
        nd, cp, npre = float(key[1]), float(key[3]), float(key[4])
        bg = float(key[6]) if remote else cp
        ex = float(key[9])
        tot_tokens = cp + nd + (u - 1) * (nd + bg) + ex
        tot_seqs = u * nd + npre + (u - 1) * (npre if bg > 0 else 0.0) + ex
        r = sm.iteration(nd, float(key[2]), cp, float(key[5]), npre, tot_tokens, tot_seqs, self.util)
        return r.ms / 1000.0, r.busy

    def _dec_iter(self, layout: Layout, sm: StepModel, n_dec: float, ctx: float, bg_chunk: float, prompt: float,
                  extra: float) -> tuple[float, dict]:
        """(seconds, busy shares) of a decode-only iteration of a unit (see :meth:`_iter`).

        With ``pool_dispatch: fill`` a remote pool's merged call is filled onto few replicas only
        when it carries no prompt tokens, i.e. when none of the other units is prefilling. Each
        prefills a share ``bg_chunk / chunk`` of its iterations, so that happens with probability
        ``p0 = (1 - bg_chunk / chunk) ** (units - 1)``; the result is the mix of the pure-decode
        call (filled) and the call with the others' prompt tokens given that one at least carries
        some (``bg_chunk / (1 - p0)`` each, spread). With ``spread`` it is the average call."""
        U = layout.units
        if not (sm.fill and sm.remote) or bg_chunk <= 0 or U <= 1:
            return self._iter(layout, sm, n_dec, ctx, 0.0, 0.0, bg_chunk, prompt, extra)
        fb = min(bg_chunk / float(self.sc.prefill_chunk_tokens), 1.0)
        p0 = (1.0 - fb) ** (U - 1)
        if p0 >= 1.0:  # a background load too small to move 1 - fb off 1.0: every call is decode-only
            return self._iter(layout, sm, n_dec, ctx, 0.0, 0.0, 0.0, prompt, extra)
        t_mix, b_mix = self._iter(layout, sm, n_dec, ctx, 0.0, 0.0, bg_chunk / (1.0 - p0), prompt, extra)
        if p0 <= 0.0:
            return t_mix, b_mix
        t_dec, b_dec = self._iter(layout, sm, n_dec, ctx, 0.0, 0.0, 0.0, prompt, extra)
        # (b_dec's order, then any process only b_mix has: never a set, whose order depends on
        # PYTHONHASHSEED and would reach the memo key through the busy dict's order)
        busy = {k: p0 * b_dec.get(k, 0.0) + (1.0 - p0) * b_mix.get(k, 0.0) for k in {**b_dec, **b_mix}}
        return p0 * t_dec + (1.0 - p0) * t_mix, busy

    def _segments(self, segs: list[tuple], in_trace: bool, h: float, p50: float, p99: float,
                  util_acc: dict[str, float], fluid: tuple) -> list[float]:
        """Runs of sub-steps of the current interval in compiled code (the loop body of
        :meth:`_run`, envs/fluidkernel.py), one call for them all: ``segs`` holds (layout, step
        model, first sub-step, end, units, batch limit, KV capacity) per run, in order, each run
        up to the next replica becoming ready, their step models of one shape. Takes the fluid
        state (the loop's locals, in the order of ``fluidkernel``'s first slots) and returns the
        call's vector as a list (``fluidkernel.IO_*`` slots: the fluid state advanced, then the
        interval's accumulators so far); the busy shares are added to ``util_acc`` as the Python
        loop adds them."""
        fk = fluidkernel
        kern = self._kmemo
        sc = self.sc
        k0, last_util, seg_slots, iblob, fblob = kern.segments(self, segs)
        procs = k0.procs
        n = len(procs)
        if self._kbd.shape[0] != n:  # (the kernel re-times before reading them: another step model)
            self._kbd, self._kbm = np.zeros(n), np.zeros(n)
        # the call's inputs as one vector (fluidkernel's IO_* slots): numpy and numba calls from here
        # cost microseconds each in situ, so one np.array and one .tolist() for the whole interval
        io = [*fluid, self._last_T, *_ACC_PAD, self.k, in_trace, kern.limit, self.sub_steps,
              float(sc.prefill_chunk_tokens), h, self.slo.ttft_s, sc.max_queue_wait_s, p50, p99,
              float(sc.contention), len(segs), 0]
        io += [util_acc.get(p, 0.0) for p in procs]
        io += [last_util.get(p, 0.0) for p in procs]
        io += seg_slots
        io = np.array(io, dtype=np.float64)
        cnt, psum, osum = self._sub_np
        fail = self._kfail  # (written whole before the kernel asks for Python; read only then)
        while True:
            r = fk.segments_io(io, self._kx, self._kbd, self._kbm, kern.memo.arrays, k0.kt.table.arrays, k0.F,
                               iblob, fblob, cnt, psum, osum, k0.out, kern._miss, fail)
            if r == fk.DONE:
                break
            j = int(io[fk.IO_FIRST])
            layout, sm = segs[j][0], segs[j][1]
            sig_id, ukey_id = seg_slots[j * fk.SEG_W + fk.SG_SIG], seg_slots[j * fk.SEG_W + fk.SG_UKEY]
            if r == fk.EMPTY_BUSY:  # cannot happen: every lookup here has decodes or a chunk
                raise RuntimeError(f"fast simulator: an iteration with no work at {fail.tolist()}")
            kern.resolve(self, layout, sm, sm._kernel, (sig_id, ukey_id, layout.units, sm.remote, *fail.tolist()), r)
        out = io.tolist()
        # the busy shares into the interval's dict (new processes in the order the Python loop adds them)
        for p, v in zip(procs, out[fk.IO_UTIL:fk.IO_UTIL + n]):
            util_acc[p] = v
        self._last_T = out[fk.IO_LAST_T]
        return out

    # ------------------------------------------------------------------ one interval
    def _run(self, t0: float, t1: float) -> IntervalMetrics:
        sc = self.sc
        k = self.k
        i_count, i_psum, i_osum, i_p50, i_p99 = self._int
        s_count, s_psum, s_osum = self._sub
        in_trace = k < self.n_intervals
        a_int = i_count[k] if in_trace else 0.0
        m = IntervalMetrics(arrivals=a_int)
        if a_int:
            m.prompt_mean = i_psum[k] / a_int
            m.output_mean = i_osum[k] / a_int
            p50, p99 = i_p50[k], i_p99[k]
        else:
            p50 = p99 = self.r_prompt
        S = self.sub_steps
        h = (t1 - t0) / S
        C = float(sc.prefill_chunk_tokens)
        slo_ttft, slo_tbt = self.slo.ttft_s, self.slo.tbt_s
        util_acc: dict[str, float] = {}
        fin = 0.0
        kv_frac = 0.0
        ttft_w = ttft50_acc = 0.0
        ttft99 = 0.0
        gaps_mix = gaps_dec = 0.0
        t_dec_acc = t_mix_acc = 0.0
        t_dec_max = 0.0
        t_full_acc = 0.0
        tpot_acc = 0.0
        layout = None
        next_ready = self.timeline.next_ready(t0)
        # the fluid state lives in locals during the interval (attribute access is slow)
        q, q_prompt, q_output = self.q, self.q_prompt, self.q_output
        n_dec, n_pre, backlog, kv = self.n_dec, self.n_pre, self.backlog, self.kv
        r_prompt, r_output = self.r_prompt, self.r_output
        t_it = self._t_it
        d_n, d_kv, d_units = self.d_n, self.d_kv, self.d_units
        d_op = None   # (per-unit batch, iteration seconds) of the draining units
        sys_ok = self.sys_ok
        fin_ok = 0.0  # finished requests x P(TTFT met)
        kx = self._kx  # the compiled sub-steps' state (envs/fluidkernel.py), or None for the Python path
        k_out: list = []  # the last compiled call's vector (its accumulators are the interval's)
        segs: list = []   # runs of sub-steps planned for the next compiled call (see below)
        s = 0
        while s < S:
            t = t0 + s * h
            if self.drain_until and self.drain_until[0][0] <= t:
                self.account(t)
                while self.drain_until and self.drain_until[0][0] <= t:
                    self.timeline.drained(self.drain_until.pop(0)[1])
            if layout is None or (next_ready is not None and next_ready <= t + 0.5 * h):
                if next_ready is not None and next_ready <= t + 0.5 * h:
                    self.account(t)
                    self.timeline.advance(t)
                    next_ready = self.timeline.next_ready(t)
                layout = self.timeline.serving(t + 0.5 * h)[1]  # (= self.serving_layout)
                sm = self.step_model(layout)
                sig = (layout.plan.ops["attn"].placement, layout.unit_tp)
                switch = self._unit_sig is not None and sig != self._unit_sig and self._U > 0
                if segs and (switch or sm.shape is not segs[0][1].shape):
                    # the runs planned so far, first: the switch below reads the fluid state, and
                    # one compiled call takes step models of one shape
                    k_out = self._segments(segs, in_trace, h, p50, p99, util_acc,
                                           (q, q_prompt, q_output, n_dec, n_pre, backlog, kv, r_prompt, r_output,
                                            t_it, d_n, d_kv, d_units, sys_ok))
                    (q, q_prompt, q_output, n_dec, n_pre, backlog, kv, r_prompt, r_output, t_it, d_n, d_kv, d_units,
                     sys_ok) = k_out[:fluidkernel.N_FLUID]
                    segs = []
                if switch:
                    # the KV holders were switched (placement / tp): the old units drain with
                    # every sequence they hold, the new ones start empty; with the hand-over the
                    # new units first take what fits (the prefilling ones are theirs already)
                    if n_dec > 0.5 and sc.kv_migration:
                        c = r_prompt + 0.5 * r_output
                        U_new = float(max(layout.units, 1))
                        room = min(U_new * float(layout.plan["attn"].max_batch) - n_pre,
                                   (layout.unit_kv_tokens * U_new - (kv - n_dec * c)) / (c + 1.0))
                        left = n_dec - min(max(room, 0.0), n_dec)
                        if left >= 0.5:
                            units = min(int(round(self._U)), math.ceil(self._U * left / n_dec - 1e-9))
                            d_n += left
                            d_kv += left * c
                            d_units += units
                            n_dec -= left
                            kv = max(kv - left * c, 0.0)
                            self.timeline.draining_units += units
                            self._schedule_drain(units)
                    elif n_dec > 0.5:
                        d_n += n_dec
                        d_kv += kv
                        d_units += self._U
                        n_dec = 0.0
                        kv = n_pre * r_prompt
                        units = int(round(self._U))
                        self.timeline.draining_units += units
                        self._schedule_drain(units)
                self._unit_sig = sig
                U = float(max(layout.units, 1))
                self._U = U
                B = float(layout.plan.ops["attn"].max_batch)
                kv_cap = layout.unit_kv_tokens * U
            if kx is not None:
                # the sub-steps up to the next replica becoming ready, compiled: planned here as a
                # run of the interval's one compiled call (``segs``, made after the loop). The
                # events between runs (a replica becoming ready: accounting, the timeline, the
                # next layout) read the timeline and the last interval's busy shares, never the
                # fluid state, so they are handled here, before the call, in the order the
                # Python loop handles them; only a switch of the KV holders (above) needs the
                # fluid state, and runs the call for the runs before it first (session 32: one
                # call an interval instead of one a run). Likewise a drain ending changes only
                # what is paid (the timeline's draining units), which the sub-steps do not read,
                # so it does not end a run: it is accounted here, at the sub-step boundary and in
                # the order the loop's top would account it (session 29)
                s_end = s + 1
                while s_end < S:
                    t_e = t0 + s_end * h
                    if next_ready is not None and next_ready <= t_e + 0.5 * h:
                        break
                    if self.drain_until and self.drain_until[0][0] <= t_e:
                        self.account(t_e)
                        while self.drain_until and self.drain_until[0][0] <= t_e:
                            self.timeline.drained(self.drain_until.pop(0)[1])
                    s_end += 1
                # (the run from s == 0 zeroes the interval's accumulators in the kernel)
                segs.append((layout, sm, s, s_end, U, B, kv_cap))
                s = s_end
                continue
            # arrivals of this sub-step join the queue
            j = k * S + s
            a = s_count[j] if in_trace else 0.0
            if a:
                pa = s_psum[j] / a
                q += a
                q_prompt += s_psum[j]
                q_output += s_osum[j]
            else:
                pa = r_prompt
            # admission: free batch slots and KV room, FIFO
            running = n_dec + n_pre
            if running > U * B + 1e-9 or kv > kv_cap + 1e-9:
                # capacity shrank: preempt back to the queue (recompute)
                over = max(running - U * B, (kv - kv_cap) / max(r_prompt + 0.5 * r_output, 1.0), 0.0)
                over = min(over, n_dec)
                n_dec -= over
                q += over
                q_prompt += over * (r_prompt + 0.5 * r_output)
                q_output += over * 0.5 * r_output
                kv = max(kv - over * (r_prompt + 0.5 * r_output), 0.0)
                running = n_dec + n_pre
            admit = 0.0
            if q > 0:
                qp = q_prompt / q
                qo = q_output / q
                room = min(U * B - running, (kv_cap - kv) / max(qp + 1.0, 1.0))
                admit = min(q, max(room, 0.0))
                if admit > 0:
                    w = running
                    tot = w + admit
                    r_prompt = (r_prompt * w + qp * admit) / tot
                    r_output = (r_output * w + qo * admit) / tot
                    n_pre += admit
                    backlog += admit * qp
                    kv += admit * qp
                    q -= admit
                    q_prompt -= admit * qp
                    q_output -= admit * qo
            # iteration times at the per-unit operating point
            nd_u = n_dec / U
            back_u = backlog / U
            chunk = min(C, back_u)
            npre_u = min(n_pre / U, max(chunk / max(r_prompt, 1.0), 1.0)) if chunk > 0 else 0.0
            ctx = r_prompt + 0.5 * r_output
            # prefill tokens per iteration of the other units (the load the shared pools see):
            # what clears the current backlog at the iteration pace, at most a full chunk. The
            # pace depends on that load (every unit prefilling at once slows the shared pools),
            # so iterate to a fixed point from last sub-step's pace (a burst would lag otherwise)
            bg = min(C, back_u * t_it / h) if back_u > 0 else 0.0
            adm_u = admit / U
            for _ in range(_ROUNDS):
                # iteration times change slowly within an interval: re-time only when the
                # operating point moved by more than 10% (or the layout changed)
                op_pt = (sm, nd_u, bg, d_n)
                ref = self._op_ref
                if ref is None or ref[0] is not sm or abs(nd_u - ref[1]) > (0.1 * ref[1] if ref[1] > 20.0 else 2.0) \
                        or abs(bg - ref[2]) > (0.1 * ref[2] if ref[2] > 320.0 else 32.0) \
                        or abs(d_n - ref[3]) > (0.1 * ref[3] if ref[3] > 20.0 else 2.0):
                    T_dec, busy_d = self._dec_iter(layout, sm, max(nd_u, 1.0), ctx, bg, r_prompt, d_n)
                    T_full, busy_m = self._iter(layout, sm, nd_u, ctx, C, max(npre_u, 1.0), bg, r_prompt, d_n)
                    self._op_ref = op_pt
                    self._op_val = (T_dec, busy_d, T_full, busy_m)
                    retimed = True
                else:
                    T_dec, busy_d, T_full, busy_m = self._op_val
                    retimed = False
                slope = (T_full - T_dec) / C if T_full > T_dec else 0.0  # seconds per prefilled token
                T_mix = T_dec + slope * chunk
                # time split between mixed (prefill) and decode-only iterations
                need_mix = back_u / max(chunk, 1.0) + 0.5 * adm_u if chunk > 0 else 0.0
                mix = min(need_mix, h / T_mix)
                left = h - mix * T_mix
                dec_it = left / T_dec if nd_u > 0 and left > 0 else 0.0
                iters = mix + dec_it
                t_it = h / iters if iters > 0 else T_dec
                if not sm.remote or back_u <= 0:
                    break
                bg_new = min(C, back_u * t_it / h)
                if abs(bg_new - bg) <= 0.1 * bg + 32.0:
                    break
                bg = bg_new
            # (the last round re-timed: a flag, not ``self._op_ref is op_pt``, whose answer would
            # rest on a tuple's identity, which compiled code, e.g. mypyc's, need not keep)
            if sm.remote and retimed:
                # shared remote pools: at the p99, more units prefill at once than on average
                # (binomial over units, each prefilling a share bg / C of its iterations)
                fb = min(bg / C, 1.0)
                bg99 = C * min(1.0, fb + _Z99 * math.sqrt(max(fb * (1 - fb), 0.0) / U))
                T_full99 = self._iter(layout, sm, nd_u, ctx, C, max(npre_u, 1.0), bg99, r_prompt, d_n)[0]
                self._op_full99 = T_full99
            elif sm.remote:
                T_full99 = self._op_full99
            else:
                T_full99 = T_full
            slope99 = (T_full99 - T_dec) / C if T_full99 > T_dec else 0.0
            # progress
            pre_done = min(backlog, mix * chunk * U)
            seq_pre_done = min(n_pre, pre_done / max(r_prompt, 1.0)) if backlog > 0 else n_pre
            if backlog - pre_done < 1e-6:
                seq_pre_done = n_pre
            backlog -= pre_done
            tokens = n_dec * iters
            done = min(n_dec, tokens / max(r_output - 1.0, 1.0))
            n_dec += seq_pre_done - done
            n_pre -= seq_pre_done
            kv = max(kv + tokens - done * (r_prompt + r_output), 0.0)
            if done > 0:
                # (this sub-step's arrivals are not in sys_ok yet: leave them out of the mean)
                n_sys = max(q + n_dec + n_pre + d_n + done - a, done)
                share = done * min(sys_ok / n_sys, 1.0) if n_sys > 1e-9 else done
                fin_ok += share
                sys_ok -= share
            fin += done
            # queue wait (Little) and rejections
            serve = done / h if done > 0 else U * B / max(r_output * T_dec, 1e-9)
            wait = q / serve if q > 1e-9 else 0.0
            if wait > sc.max_queue_wait_s:
                keep = serve * sc.max_queue_wait_s
                rej = max(q - keep, 0.0)
                frac = rej / q
                q -= rej
                q_prompt *= 1 - frac
                q_output *= 1 - frac
                m.rejected += rej
                n_sys = max(q + rej + n_dec + n_pre + d_n - a, rej)
                sys_ok -= rej * min(sys_ok / n_sys, 1.0) if n_sys > 1e-9 else 0.0
                wait = sc.max_queue_wait_s
            # TTFT of this sub-step's arrivals: queue wait, the residual of the iteration in
            # flight, then the prompt tokens ahead in the unit (join-shortest-queue routing:
            # only carried backlog, plus the burst beyond one request per unit at p99) and the
            # own prompt, at one iteration per chunk
            f_time = mix * T_mix / h
            resid = 0.5 * (f_time * T_mix + (1 - f_time) * T_dec)
            new_u = adm_u * pa
            old_u = max(back_u - new_u, 0.0)
            # an earlier arrival of this sub-step is still being prefilled with the probability
            # that its prefill (pa / C iterations) overlaps: its share of the sub-step
            ahead99 = old_u + max(adm_u - 1.0, 0.0) * pa * min(1.0, pa / C * T_full / h)
            # a burst: prompt tokens arrive faster than a unit prefills them (a chunk per
            # full-chunk iteration), so the backlog ahead grows through the sub-step
            grow = max(new_u - h * C / T_full, 0.0) if T_full > 0 else 0.0
            ahead99 += grow * _G99
            w50 = old_u + _G50 * grow + p50
            w99 = ahead99 + p99
            lo = wait + resid + math.ceil(w50 / C - 1e-9) * T_dec + slope * w50
            hi = max(wait + resid + math.ceil(w99 / C - 1e-9) * T_dec + slope99 * w99, lo)
            if a > 0:
                ttft_w += a
                ttft50_acc += a * lo
                p_ok = _lognorm_cdf(slo_ttft, lo, hi)
                sys_ok += a * p_ok
                ttft99 = max(ttft99, hi)
            # TBT gaps
            g_mix = mix * n_dec
            g_dec = dec_it * n_dec
            gaps_mix += g_mix
            gaps_dec += g_dec
            t_dec_acc += T_dec * g_dec
            t_mix_acc += T_mix * g_mix
            if T_dec > t_dec_max:
                t_dec_max = T_dec
            if mix > 0:
                t_full_acc += T_full99 * g_mix
            tpot_acc += (h / iters if iters > 0 else T_dec) * done
            if d_n > 1e-6:
                # draining units: decode-only iterations at their own batch until empty
                nd_d = d_n / max(d_units, 1.0)
                if d_op is None or abs(nd_d - d_op[0]) > (0.1 * d_op[0] if d_op[0] > 20.0 else 2.0):
                    d_op = (nd_d, self._iter(layout, sm, max(nd_d, 1.0), ctx, 0.0, 0.0, bg, r_prompt,
                                             max(d_n - nd_d, 0.0))[0])
                T_dd = d_op[1]
                it_d = h / T_dd
                tok_d = d_n * it_d
                done_d = min(d_n, tok_d / max(r_output - 1.0, 1.0))
                gaps_dec += tok_d
                t_dec_acc += T_dd * tok_d
                tpot_acc += T_dd * done_d
                n_sys = max(q + n_dec + n_pre + d_n, done_d)
                share = done_d * min(sys_ok / n_sys, 1.0) if n_sys > 1e-9 else done_d
                fin_ok += share
                sys_ok -= share
                fin += done_d
                d_kv = max(d_kv + tok_d - done_d * (r_prompt + r_output), 0.0) if d_n - done_d > 1e-6 else 0.0
                d_n -= done_d
                if d_n <= 1e-6:
                    d_n = d_kv = d_units = 0.0
            kv_all = kv + d_kv
            cap_all = kv_cap + d_units * layout.unit_kv_tokens
            if kv_all > kv_frac * cap_all:
                kv_frac = kv_all / cap_all if cap_all > 1.0 else kv_all
            wd = dec_it * T_dec / (h * S)
            wm = mix * T_mix / (h * S)
            for proc, b in busy_d.items():
                util_acc[proc] = util_acc.get(proc, 0.0) + b * wd
            if wm > 0:
                for proc, b in busy_m.items():
                    util_acc[proc] = util_acc.get(proc, 0.0) + b * wm
            self._last_T = T_dec
            s += 1
        if kx is not None:
            if segs:
                k_out = self._segments(segs, in_trace, h, p50, p99, util_acc,
                                       (q, q_prompt, q_output, n_dec, n_pre, backlog, kv, r_prompt, r_output,
                                        t_it, d_n, d_kv, d_units, sys_ok))
                (q, q_prompt, q_output, n_dec, n_pre, backlog, kv, r_prompt, r_output, t_it, d_n, d_kv, d_units,
                 sys_ok) = k_out[:fluidkernel.N_FLUID]
            (fin_ok, fin, kv_frac, ttft_w, ttft50_acc, ttft99, gaps_mix, gaps_dec, t_dec_acc, t_mix_acc, t_dec_max,
             t_full_acc, tpot_acc, m.rejected) = k_out[fluidkernel.IO_ACC:fluidkernel.IO_ACC + fluidkernel.N_ACC]
        self.q, self.q_prompt, self.q_output = q, q_prompt, q_output
        self.n_dec, self.n_pre, self.backlog, self.kv = n_dec, n_pre, backlog, kv
        self.r_prompt, self.r_output = r_prompt, r_output
        self._t_it = t_it
        self.d_n, self.d_kv, self.d_units = d_n, d_kv, d_units
        self.sys_ok = max(sys_ok, 0.0)
        # interval percentiles
        gaps = gaps_mix + gaps_dec
        f_mix = gaps_mix / gaps if gaps > 0 else 0.0
        T_dec_m = t_dec_acc / gaps_dec if gaps_dec > 0 else t_dec_max
        T_mix_m = t_mix_acc / gaps_mix if gaps_mix > 0 else T_dec_m
        tbt50 = T_mix_m if f_mix > 0.5 else T_dec_m
        # p99 gap: a full-chunk mixed iteration once more than 1% of gaps are mixed
        T_full_m = t_full_acc / gaps_mix if gaps_mix > 0 else T_dec_m
        tbt99 = max(T_full_m, T_dec_m) if f_mix > 0.01 else max(T_mix_m, T_dec_m)
        tpot = tpot_acc / fin if fin > 0 else T_dec_m
        p_tbt = _phi((math.log(slo_tbt) - math.log(max(tpot, 1e-9))) / 0.1)
        ttft50 = ttft50_acc / ttft_w if ttft_w > 0 else 0.0
        m.finished = fin
        m.met = fin_ok * p_tbt
        m.ttft_p50_s, m.ttft_p99_s = ttft50, max(ttft99, ttft50)
        m.tbt_p50_s, m.tbt_p99_s = (tbt50, tbt99) if gaps > 0 else (0.0, 0.0)
        m.queued, m.running = q, n_dec + n_pre + d_n
        m.kv_used_frac = kv_frac
        m.queue_tokens = q_prompt + q_output
        m.util = util_acc
        self.util = util_acc
        self.tot_arrived += a_int
        self.tot_finished += fin
        self.tot_met += m.met
        self.tot_rejected += m.rejected
        if ttft_w > 0 and a_int:
            self.ttft_rec.append((a_int, ttft50, max(ttft99, ttft50)))
        if gaps > 0:
            self.tbt_rec.append((gaps, tbt50, tbt99))
        return m

    # ------------------------------------------------------------------ drains
    def _on_drain(self, units: int) -> None:
        """``units`` serving attention units were removed: they take their share of the decoding
        sequences (and KV) with them into the draining pool, where those finish; the units keep
        their GPUs until their longest sequence finishes (units that hold none are freed at once).
        With ``kv_migration`` the serving units first take what fits (see the module docstring)."""
        U = self._U
        if U <= 0 or self.n_dec + self.n_pre < 0.5:
            self.timeline.drained(units)
            return
        f = min(units / U, 1.0)
        c = self.r_prompt + 0.5 * self.r_output
        out = f * self.n_dec   # decoding sequences on the removed units
        left = out
        if self.sc.kv_migration:
            # the serving units take what fits in their free batch slots and KV (the runtime's
            # hand-off); the removed units keep the rest, and only those that hold some drain
            lay = self.serving_layout(self.now)
            U2 = float(max(lay.units, 1))
            stay = self.n_dec - out + self.n_pre
            room = min(U2 * float(lay.plan["attn"].max_batch) - stay,
                       (lay.unit_kv_tokens * U2 - (self.kv - out * c)) / (c + 1.0))
            left = out - min(max(room, 0.0), out)
            if left < 0.5:
                self.timeline.drained(units)
                return
            keep = min(units, math.ceil(units * left / out - 1e-9))
            if keep < units:
                self.timeline.drained(units - keep)
            units = keep
            self.n_dec -= left
        else:
            self.n_dec *= 1.0 - f
        self.d_n += left
        self.d_kv += left * c
        self.d_units += units
        self.kv = max(self.kv - left * c, 0.0)
        self._schedule_drain(units)

    def _schedule_drain(self, units: int) -> None:
        """Draining units give back their GPUs after ``drain_residual`` x the p99 output length
        of recent requests in decode iterations (what is left of the longest of their
        sequences; they are part-way through when the unit is removed)."""
        k = min(max(self.k - 1, 0), self.n_intervals - 1)
        longest = max(self.index.output_p99[k], self.r_output)
        t = self.now + self.sc.drain_residual * longest * getattr(self, "_last_T", 0.05)
        self.drain_until.append((t, units))
        self.drain_until.sort()

    # ------------------------------------------------------------------ summary
    @staticmethod
    def _mixture_quantile(rec: list[tuple[float, float, float]], q: float) -> float:
        if not rec:
            return 0.0
        w = np.array([r[0] for r in rec])
        p50 = np.maximum(np.array([r[1] for r in rec]), 1e-9)
        p99 = np.maximum(np.array([r[2] for r in rec]), p50)
        sig = np.maximum(np.log(p99 / p50) / _Z99, 0.02)
        grid = np.exp(np.linspace(np.log(p50.min()) - 3 * sig.max(), np.log(p99.max()) + 3 * sig.max(), 400))
        z = (np.log(grid)[:, None] - np.log(p50)[None, :]) / sig[None, :]
        cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
        mix = (cdf * w[None, :]).sum(axis=1) / w.sum()
        return float(np.interp(q, mix, grid))

    def summary(self) -> dict:
        """Whole-run metrics (mixture of the per-interval fitted distributions)."""
        out = {
            "requests": int(round(self.tot_arrived)),
            "finished": int(round(self.tot_finished)),
            "rejected": int(round(self.tot_rejected)),
            "queued": int(round(self.q + self.n_dec + self.n_pre)),
            "slo_attainment": self.tot_met / max(self.tot_arrived, 1e-9),
            "ttft_p50_s": self._mixture_quantile(self.ttft_rec, 0.5),
            "ttft_p99_s": self._mixture_quantile(self.ttft_rec, 0.99),
            "tbt_p50_s": self._mixture_quantile(self.tbt_rec, 0.5),
            "tbt_p99_s": self._mixture_quantile(self.tbt_rec, 0.99),
        }
        out.update(self._cost_summary())
        return out
