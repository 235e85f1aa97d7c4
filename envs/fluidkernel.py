"""The fast simulator's fluid sub-steps, compiled: the body of ``FastSimulator._run``'s loop in
numba, bit for bit.

Session 20 compiled the iteration-time memo (envs/stepkernel.py), but each of the 10-15 lookups
of an env step still crossed into compiled code from Python (about 3 us a call) and the fluid
arithmetic around them stayed in Python (docs/SIMULATOR.md "Speed"). Here the sub-steps of an
interval are one compiled call (:func:`segments_io`; one call per run of sub-steps between
replicas becoming ready until session 32), which makes its lookups through
:func:`envs.stepkernel._memo_iter` directly.

Exactness: every operation is the IEEE double operation the Python loop makes, in the same order;
``min`` / ``max`` keep Python's tie rule (the first argument unless a later one is strictly
smaller / larger, which decides the sign of a zero); powers take a float exponent (Python's
``float ** int`` is ``pow``). The sub-steps are restartable: the call works on copies of its
state and writes them back only when it finished, so when a lookup needs Python (a latency the
kernel tables lack, a value beyond them) the call returns, Python fills in what was missing and the
call is repeated from the same state; the memo then holds the same entries in the same order as
the Python path's. tests/test_fluidkernel.py and bench/env_equivalence.py compare the two.

The state is one float64 vector (slots below); the interval's constants come in one int64 and
one float64 vector. Units: seconds, tokens, requests, as in envs/fast.py.
"""
from __future__ import annotations

import math

import numpy as np

from envs import stepkernel

# --- state slots (float64 vector) -------------------------------------------------------------
# the fluid state (the Python loop's locals, copied in and out around each call)
(Q, Q_PROMPT, Q_OUTPUT, N_DEC, N_PRE, BACKLOG, KV, R_PROMPT, R_OUTPUT, T_IT, D_N, D_KV, D_UNITS,
 SYS_OK) = range(14)
N_FLUID = 14
# the interval's accumulators (zeroed at the start of an interval)
(FIN_OK, FIN, KV_FRAC, TTFT_W, TTFT50_ACC, TTFT99, GAPS_MIX, GAPS_DEC, T_DEC_ACC, T_MIX_ACC, T_DEC_MAX,
 T_FULL_ACC, TPOT_ACC, REJECTED, D_OP, D_OP_ND, D_OP_T) = range(14, 31)
# kept across intervals: the last decode iteration (FastSimulator._last_T), the operating point the
# cached iteration times were computed at (step-model serial, per-unit decodes, background chunk,
# draining sequences; serial -1: none) and those times (FastSimulator._op_ref / _op_val /
# _op_full99; the busy shares are separate vectors)
(LAST_T, REF_SM, REF_ND, REF_BG, REF_DN, VAL_T_DEC, VAL_T_FULL, FULL99) = range(31, 39)
N_STATE = 39

# --- constants: int64 vector ------------------------------------------------------------------
(CI_K, CI_S0, CI_S1, CI_IN_TRACE, CI_UNITS, CI_REMOTE, CI_FILL, CI_LIMIT, CI_SIG, CI_UKEY, CI_SUB) = range(11)
# --- constants: float64 vector ----------------------------------------------------------------
(CF_U, CF_B, CF_KV_CAP, CF_UNIT_KV, CF_C, CF_H, CF_SLO_TTFT, CF_MAX_WAIT, CF_P50, CF_P99, CF_SM) = range(11)

# --- the per-call inputs of segments_io: one float64 vector (integers are exact in it) ----------
# the fluid state (N_FLUID slots), the last decode iteration, the interval's accumulators FIN_OK ..
# REJECTED (outputs only), the interval's constants (IO_K ..), the number of segments and the
# first one still to run, then n busy shares of the interval so far and n of the last interval
# (both in the step kernel's process order), then one block of SEG_W slots per segment (SG_*:
# its sub-steps, its step model's constants, where its arrays lie in the blobs); the first
# IO_K slots and the interval's busy shares are written back when a call is done
IO_LAST_T = N_FLUID
IO_ACC = IO_LAST_T + 1
N_ACC = REJECTED + 1 - FIN_OK
(IO_K, IO_IN_TRACE, IO_LIMIT, IO_SUB, IO_C, IO_H, IO_SLO_TTFT, IO_MAX_WAIT, IO_P50, IO_P99, IO_CONTENTION,
 IO_NSEG, IO_FIRST) = range(IO_ACC + N_ACC, IO_ACC + N_ACC + 13)
IO_UTIL = IO_FIRST + 1
# a segment's block: sub-steps s0 .. s1 - 1, units, remote, fill, signature id, busy-shares id,
# units (float), batch limit, KV capacity, KV tokens per unit, step-model serial, whether
# processes share GPUs, where its int blob starts in ``iblob`` and its S array's length (the blob
# is StepKernel.blobs' [S, n + 1 co-residence offsets, indices]), where its shares start in ``fblob``
(SG_S0, SG_S1, SG_UNITS, SG_REMOTE, SG_FILL, SG_SIG, SG_UKEY, SG_U, SG_B, SG_KV_CAP, SG_UNIT_KV, SG_SM,
 SG_PEERS, SG_S_OFF, SG_S_LEN, SG_SHARE_OFF) = range(16)
SEG_W = SG_SHARE_OFF + 1

#: status of a call: done; an iteration time needs Python; a memo value had no busy shares
DONE, NEEDS_PYTHON, EMPTY_BUSY = 0, -1, -2

_Z99 = 2.326          # = envs.fast._Z99
_G99, _G50 = 0.5, 0.25  # = envs.fast._G99, _G50
_ROUNDS = 3           # = envs.fast._ROUNDS


def new_state() -> np.ndarray:
    """A state vector for a reset simulator (no cached operating point)."""
    x = np.zeros(N_STATE, dtype=np.float64)
    x[LAST_T] = 0.05
    x[REF_SM] = -1.0
    return x


if stepkernel.njit is not None:
    njit = stepkernel.njit
    _memo_iter = stepkernel._memo_iter
    _slowdowns = stepkernel._slowdowns
    _work_size = stepkernel._work_size

    @njit(cache=True)
    def _max(a: float, b: float) -> float:  # Python's max(a, b)
        return b if b > a else a

    @njit(cache=True)
    def _min(a: float, b: float) -> float:  # Python's min(a, b)
        return b if b < a else a

    @njit(cache=True)
    def _lognorm_cdf(s: float, p50: float, p99: float) -> float:  # = envs.fast._lognorm_cdf
        if p50 <= 0:
            return 1.0
        sigma = _max(math.log(_max(p99, p50) / p50) / _Z99, 0.02)
        x = (math.log(_max(s, 1e-12)) - math.log(p50)) / sigma
        return 0.5 * math.erfc(-x / math.sqrt(2.0))

    @njit(cache=True)
    def _look(memo, table, Sa, Fa, slow, ci, n_dec, ctx, chunk, n_pre, bg, prompt, extra, out, miss,
              fail, work):  # noqa: ANN001, ANN202
        """= FastSimulator._iter into ``out``; a non-zero status leaves the arguments in ``fail``."""
        r = _memo_iter(memo, table, Sa, Fa, slow, ci[CI_LIMIT], ci[CI_SIG], ci[CI_UKEY], ci[CI_UNITS],
                       ci[CI_REMOTE] != 0, n_dec, ctx, chunk, n_pre, bg, prompt, extra, out, miss, work)
        if r == 0 and out[1] != 0.0:
            r = EMPTY_BUSY
        if r != 0:
            fail[0] = n_dec
            fail[1] = ctx
            fail[2] = chunk
            fail[3] = n_pre
            fail[4] = bg
            fail[5] = prompt
            fail[6] = extra
        return r

    @njit(cache=True)
    def _dec_iter(memo, table, Sa, Fa, slow, ci, C, n_dec, ctx, bg, prompt, extra, out, miss, fail,
                  busy, work):  # noqa: ANN001, ANN202
        """= FastSimulator._dec_iter: (status, seconds); the busy shares into ``busy``."""
        U = ci[CI_UNITS]
        n = busy.shape[0]
        if not (ci[CI_FILL] != 0 and ci[CI_REMOTE] != 0) or bg <= 0 or U <= 1:
            r = _look(memo, table, Sa, Fa, slow, ci, n_dec, ctx, 0.0, 0.0, bg, prompt, extra, out, miss, fail, work)
            busy[:] = out[2:2 + n]
            return r, out[0]
        fb = _min(bg / C, 1.0)
        p0 = (1.0 - fb) ** float(U - 1)
        if p0 >= 1.0:
            r = _look(memo, table, Sa, Fa, slow, ci, n_dec, ctx, 0.0, 0.0, 0.0, prompt, extra, out, miss, fail, work)
            busy[:] = out[2:2 + n]
            return r, out[0]
        r = _look(memo, table, Sa, Fa, slow, ci, n_dec, ctx, 0.0, 0.0, bg / (1.0 - p0), prompt, extra, out, miss,
                  fail, work)
        if r != 0:
            return r, 0.0
        t_mix = out[0]
        b_mix = out[2:2 + n].copy()
        if p0 <= 0.0:
            busy[:] = b_mix
            return 0, t_mix
        r = _look(memo, table, Sa, Fa, slow, ci, n_dec, ctx, 0.0, 0.0, 0.0, prompt, extra, out, miss, fail, work)
        if r != 0:
            return r, 0.0
        t_dec = out[0]
        for i in range(n):
            busy[i] = p0 * out[2 + i] + (1.0 - p0) * b_mix[i]
        return 0, p0 * t_dec + (1.0 - p0) * t_mix

    @njit(cache=True)
    def substeps(x0, bd0, bm0, util0, memo, table, Sa, Fa, slow, ci, cf, cnt, psum, osum, out, miss,
                 fail, work, x, bd, bm, util):  # noqa: ANN001, ANN202, C901
        """Sub-steps ``ci[CI_S0]`` .. ``ci[CI_S1] - 1`` of interval ``ci[CI_K]`` (= the body of
        FastSimulator._run's loop). State ``x0``, the cached busy shares ``bd0`` / ``bm0`` and the
        interval's accumulated busy shares ``util0`` (all in the step kernel's process order) are
        updated in place when the call returns DONE, left as they were otherwise (then ``fail``
        holds the lookup's arguments: fill the tables (status > 0) or time it in Python
        (NEEDS_PYTHON) and call again). ``x``, ``bd``, ``bm``, ``util``: the caller's scratch of
        their shapes, the working copies; ``work``: :func:`envs.stepkernel._memo_iter`'s."""
        x[:] = x0
        bd[:] = bd0
        bm[:] = bm0
        util[:] = util0
        n = bd.shape[0]
        k, s0, s1, in_trace, n_sub = ci[CI_K], ci[CI_S0], ci[CI_S1], ci[CI_IN_TRACE] != 0, ci[CI_SUB]
        remote = ci[CI_REMOTE] != 0
        U, B, kv_cap, unit_kv = cf[CF_U], cf[CF_B], cf[CF_KV_CAP], cf[CF_UNIT_KV]
        C, h, slo_ttft, max_wait = cf[CF_C], cf[CF_H], cf[CF_SLO_TTFT], cf[CF_MAX_WAIT]
        p50, p99, sm_serial = cf[CF_P50], cf[CF_P99], cf[CF_SM]
        q, q_prompt, q_output = x[Q], x[Q_PROMPT], x[Q_OUTPUT]
        n_dec, n_pre, backlog, kv = x[N_DEC], x[N_PRE], x[BACKLOG], x[KV]
        r_prompt, r_output, t_it = x[R_PROMPT], x[R_OUTPUT], x[T_IT]
        d_n, d_kv, d_units, sys_ok = x[D_N], x[D_KV], x[D_UNITS], x[SYS_OK]
        fin_ok, fin, kv_frac = x[FIN_OK], x[FIN], x[KV_FRAC]
        ttft_w, ttft50_acc, ttft99 = x[TTFT_W], x[TTFT50_ACC], x[TTFT99]
        gaps_mix, gaps_dec, t_dec_acc, t_mix_acc = x[GAPS_MIX], x[GAPS_DEC], x[T_DEC_ACC], x[T_MIX_ACC]
        t_dec_max, t_full_acc, tpot_acc, rejected = x[T_DEC_MAX], x[T_FULL_ACC], x[TPOT_ACC], x[REJECTED]
        T_dec = T_full = 0.0
        for s in range(s0, s1):
            # arrivals of this sub-step join the queue
            j = k * n_sub + s
            a = cnt[j] if in_trace else 0.0
            if a != 0.0:
                pa = psum[j] / a
                q += a
                q_prompt += psum[j]
                q_output += osum[j]
            else:
                pa = r_prompt
            # admission: free batch slots and KV room, FIFO
            running = n_dec + n_pre
            if running > U * B + 1e-9 or kv > kv_cap + 1e-9:
                over = _max(_max(running - U * B, (kv - kv_cap) / _max(r_prompt + 0.5 * r_output, 1.0)), 0.0)
                over = _min(over, n_dec)
                n_dec -= over
                q += over
                q_prompt += over * (r_prompt + 0.5 * r_output)
                q_output += over * 0.5 * r_output
                kv = _max(kv - over * (r_prompt + 0.5 * r_output), 0.0)
                running = n_dec + n_pre
            admit = 0.0
            if q > 0:
                qp = q_prompt / q
                qo = q_output / q
                room = _min(U * B - running, (kv_cap - kv) / _max(qp + 1.0, 1.0))
                admit = _min(q, _max(room, 0.0))
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
            chunk = _min(C, back_u)
            npre_u = _min(n_pre / U, _max(chunk / _max(r_prompt, 1.0), 1.0)) if chunk > 0 else 0.0
            ctx = r_prompt + 0.5 * r_output
            bg = _min(C, back_u * t_it / h) if back_u > 0 else 0.0
            adm_u = admit / U
            fresh = False  # the last round re-timed the operating point
            slope = T_mix = mix = dec_it = iters = 0.0
            for _ in range(_ROUNDS):
                ref_nd, ref_bg, ref_dn = x[REF_ND], x[REF_BG], x[REF_DN]
                if x[REF_SM] != sm_serial or abs(nd_u - ref_nd) > (0.1 * ref_nd if ref_nd > 20.0 else 2.0) \
                        or abs(bg - ref_bg) > (0.1 * ref_bg if ref_bg > 320.0 else 32.0) \
                        or abs(d_n - ref_dn) > (0.1 * ref_dn if ref_dn > 20.0 else 2.0):
                    r, T_dec = _dec_iter(memo, table, Sa, Fa, slow, ci, C, _max(nd_u, 1.0), ctx, bg,
                                                   r_prompt, d_n, out, miss, fail, bd, work)
                    if r != 0:
                        return r
                    r = _look(memo, table, Sa, Fa, slow, ci, nd_u, ctx, C, _max(npre_u, 1.0), bg, r_prompt, d_n,
                              out, miss, fail, work)
                    if r != 0:
                        return r
                    T_full = out[0]
                    bm[:] = out[2:2 + n]
                    x[REF_SM], x[REF_ND], x[REF_BG], x[REF_DN] = sm_serial, nd_u, bg, d_n
                    x[VAL_T_DEC], x[VAL_T_FULL] = T_dec, T_full
                    fresh = True
                else:
                    T_dec, T_full = x[VAL_T_DEC], x[VAL_T_FULL]
                    fresh = False
                slope = (T_full - T_dec) / C if T_full > T_dec else 0.0  # seconds per prefilled token
                T_mix = T_dec + slope * chunk
                # time split between mixed (prefill) and decode-only iterations
                need_mix = back_u / _max(chunk, 1.0) + 0.5 * adm_u if chunk > 0 else 0.0
                mix = _min(need_mix, h / T_mix)
                left = h - mix * T_mix
                dec_it = left / T_dec if nd_u > 0 and left > 0 else 0.0
                iters = mix + dec_it
                t_it = h / iters if iters > 0 else T_dec
                if not remote or back_u <= 0:
                    break
                bg_new = _min(C, back_u * t_it / h)
                if abs(bg_new - bg) <= 0.1 * bg + 32.0:
                    break
                bg = bg_new
            if remote and fresh:
                fb = _min(bg / C, 1.0)
                bg99 = C * _min(1.0, fb + _Z99 * math.sqrt(_max(fb * (1 - fb), 0.0) / U))
                r = _look(memo, table, Sa, Fa, slow, ci, nd_u, ctx, C, _max(npre_u, 1.0), bg99, r_prompt, d_n,
                          out, miss, fail, work)
                if r != 0:
                    return r
                T_full99 = out[0]
                x[FULL99] = T_full99
            elif remote:
                T_full99 = x[FULL99]
            else:
                T_full99 = T_full
            slope99 = (T_full99 - T_dec) / C if T_full99 > T_dec else 0.0
            # progress
            pre_done = _min(backlog, mix * chunk * U)
            seq_pre_done = _min(n_pre, pre_done / _max(r_prompt, 1.0)) if backlog > 0 else n_pre
            if backlog - pre_done < 1e-6:
                seq_pre_done = n_pre
            backlog -= pre_done
            tokens = n_dec * iters
            done = _min(n_dec, tokens / _max(r_output - 1.0, 1.0))
            n_dec += seq_pre_done - done
            n_pre -= seq_pre_done
            kv = _max(kv + tokens - done * (r_prompt + r_output), 0.0)
            if done > 0:
                n_sys = _max(q + n_dec + n_pre + d_n + done - a, done)
                share = done * _min(sys_ok / n_sys, 1.0) if n_sys > 1e-9 else done
                fin_ok += share
                sys_ok -= share
            fin += done
            # queue wait (Little) and rejections
            serve = done / h if done > 0 else U * B / _max(r_output * T_dec, 1e-9)
            wait = q / serve if q > 1e-9 else 0.0
            if wait > max_wait:
                keep = serve * max_wait
                rej = _max(q - keep, 0.0)
                frac = rej / q
                q -= rej
                q_prompt *= 1 - frac
                q_output *= 1 - frac
                rejected += rej
                n_sys = _max(q + rej + n_dec + n_pre + d_n - a, rej)
                sys_ok -= rej * _min(sys_ok / n_sys, 1.0) if n_sys > 1e-9 else 0.0
                wait = max_wait
            # TTFT of this sub-step's arrivals (see envs/fast.py)
            f_time = mix * T_mix / h
            resid = 0.5 * (f_time * T_mix + (1 - f_time) * T_dec)
            new_u = adm_u * pa
            old_u = _max(back_u - new_u, 0.0)
            ahead99 = old_u + _max(adm_u - 1.0, 0.0) * pa * _min(1.0, pa / C * T_full / h)
            grow = _max(new_u - h * C / T_full, 0.0) if T_full > 0 else 0.0
            ahead99 += grow * _G99
            w50 = old_u + _G50 * grow + p50
            w99 = ahead99 + p99
            lo = wait + resid + math.ceil(w50 / C - 1e-9) * T_dec + slope * w50
            hi = _max(wait + resid + math.ceil(w99 / C - 1e-9) * T_dec + slope99 * w99, lo)
            if a > 0:
                ttft_w += a
                ttft50_acc += a * lo
                p_ok = _lognorm_cdf(slo_ttft, lo, hi)
                sys_ok += a * p_ok
                ttft99 = _max(ttft99, hi)
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
                nd_d = d_n / _max(d_units, 1.0)
                d_nd = x[D_OP_ND]
                if x[D_OP] == 0.0 or abs(nd_d - d_nd) > (0.1 * d_nd if d_nd > 20.0 else 2.0):
                    r = _look(memo, table, Sa, Fa, slow, ci, _max(nd_d, 1.0), ctx, 0.0, 0.0, bg, r_prompt,
                              _max(d_n - nd_d, 0.0), out, miss, fail, work)
                    if r != 0:
                        return r
                    x[D_OP], x[D_OP_ND], x[D_OP_T] = 1.0, nd_d, out[0]
                T_dd = x[D_OP_T]
                it_d = h / T_dd
                tok_d = d_n * it_d
                done_d = _min(d_n, tok_d / _max(r_output - 1.0, 1.0))
                gaps_dec += tok_d
                t_dec_acc += T_dd * tok_d
                tpot_acc += T_dd * done_d
                n_sys = _max(q + n_dec + n_pre + d_n, done_d)
                share = done_d * _min(sys_ok / n_sys, 1.0) if n_sys > 1e-9 else done_d
                fin_ok += share
                sys_ok -= share
                fin += done_d
                d_kv = _max(d_kv + tok_d - done_d * (r_prompt + r_output), 0.0) if d_n - done_d > 1e-6 else 0.0
                d_n -= done_d
                if d_n <= 1e-6:
                    d_n = d_kv = d_units = 0.0
            kv_all = kv + d_kv
            cap_all = kv_cap + d_units * unit_kv
            if kv_all > kv_frac * cap_all:
                kv_frac = kv_all / cap_all if cap_all > 1.0 else kv_all
            wd = dec_it * T_dec / (h * n_sub)
            wm = mix * T_mix / (h * n_sub)
            for i in range(n):
                util[i] = util[i] + bd[i] * wd
            if wm > 0:
                for i in range(n):
                    util[i] = util[i] + bm[i] * wm
            x[LAST_T] = T_dec
        x[Q], x[Q_PROMPT], x[Q_OUTPUT] = q, q_prompt, q_output
        x[N_DEC], x[N_PRE], x[BACKLOG], x[KV] = n_dec, n_pre, backlog, kv
        x[R_PROMPT], x[R_OUTPUT], x[T_IT] = r_prompt, r_output, t_it
        x[D_N], x[D_KV], x[D_UNITS], x[SYS_OK] = d_n, d_kv, d_units, sys_ok
        x[FIN_OK], x[FIN], x[KV_FRAC] = fin_ok, fin, kv_frac
        x[TTFT_W], x[TTFT50_ACC], x[TTFT99] = ttft_w, ttft50_acc, ttft99
        x[GAPS_MIX], x[GAPS_DEC], x[T_DEC_ACC], x[T_MIX_ACC] = gaps_mix, gaps_dec, t_dec_acc, t_mix_acc
        x[T_DEC_MAX], x[T_FULL_ACC], x[TPOT_ACC], x[REJECTED] = t_dec_max, t_full_acc, tpot_acc, rejected
        x0[:] = x
        bd0[:] = bd
        bm0[:] = bm
        util0[:] = util
        return DONE

    @njit(cache=True)
    def segments_io(io, x0, bd0, bm0, memo, table, Fa, iblob, fblob, cnt, psum, osum, out, miss,
                    fail):  # noqa: ANN001, ANN202
        """:func:`substeps` for each segment of an interval in turn (a segment: the sub-steps up to
        the next replica becoming ready, under one serving layout), its inputs in ``io`` (IO_*
        slots), one vector from Python instead of a dozen numpy and numba calls (each costs
        microseconds in an env step, whose Python leaves the CPU's caches cold), and one call for
        the segments of an interval instead of one each. The segments' step models share a shape
        (processes, n, and the float table ``Fa``); each has its S array, co-residence offsets
        and indices in ``iblob`` and its co-residence shares in ``fblob`` (StepKernel.blobs).

        A call from the first segment (``io[IO_FIRST]`` 0) copies the fluid state and the last
        decode iteration into ``x0``; a segment starting at sub-step 0 zeroes the interval's
        accumulators (and the draining units' operating point); each segment computes its
        slowdowns from the last interval's busy shares (= ``StepKernel.slow_for``: ``_slowdowns``,
        ones without co-residence) and runs its sub-steps, which update ``x0``, ``bd0`` / ``bm0``
        and the interval's busy shares (in ``io``) when done. A segment whose lookup needs Python
        returns its status with its index in ``io[IO_FIRST]`` and ``fail`` holding the lookup's
        arguments, the segments before it done: fill in what was missing, call again. When all
        are DONE, the fluid state, the last decode iteration and the accumulators go back into
        ``io``."""
        n = bd0.shape[0]
        nseg = int(io[IO_NSEG])
        first = int(io[IO_FIRST])
        if first == 0:
            for i in range(N_FLUID):
                x0[i] = io[i]
            x0[LAST_T] = io[IO_LAST_T]
        util0 = io[IO_UTIL:IO_UTIL + n]  # (a view: substeps writes the busy shares back into io)
        last = io[IO_UTIL + n:IO_UTIL + 2 * n]
        ci = np.empty(11, dtype=np.int64)
        # the floats as one scratch (each array allocated in an env step costs: session 34):
        # substeps' working copies of x0, bd0, bm0, util0, then the slowdowns and cf
        m = x0.shape[0]
        buf = np.empty(m + 4 * n + 11)
        xs, bds, bms, utils = buf[:m], buf[m:m + n], buf[m + n:m + 2 * n], buf[m + 2 * n:m + 3 * n]
        slow = buf[m + 3 * n:m + 4 * n]
        cf = buf[m + 4 * n:]
        ci[CI_K], ci[CI_IN_TRACE], ci[CI_LIMIT], ci[CI_SUB] = (int(io[IO_K]), int(io[IO_IN_TRACE]),
                                                               int(io[IO_LIMIT]), int(io[IO_SUB]))
        cf[CF_C], cf[CF_H], cf[CF_SLO_TTFT], cf[CF_MAX_WAIT] = io[IO_C], io[IO_H], io[IO_SLO_TTFT], io[IO_MAX_WAIT]
        cf[CF_P50], cf[CF_P99] = io[IO_P50], io[IO_P99]
        contention = io[IO_CONTENTION]
        work = np.empty(0)  # (_memo_iter's scratch, sized at the first segment: one shape for all)
        for j in range(first, nseg):
            b = IO_UTIL + 2 * n + j * SEG_W
            ci[CI_S0], ci[CI_S1], ci[CI_UNITS] = int(io[b + SG_S0]), int(io[b + SG_S1]), int(io[b + SG_UNITS])
            ci[CI_REMOTE], ci[CI_FILL] = int(io[b + SG_REMOTE]), int(io[b + SG_FILL])
            ci[CI_SIG], ci[CI_UKEY] = int(io[b + SG_SIG]), int(io[b + SG_UKEY])
            cf[CF_U], cf[CF_B], cf[CF_KV_CAP], cf[CF_UNIT_KV] = io[b + SG_U], io[b + SG_B], io[b + SG_KV_CAP], \
                io[b + SG_UNIT_KV]
            cf[CF_SM] = io[b + SG_SM]
            if ci[CI_S0] == 0:  # (= FastSimulator._run zeroing them before an interval's first sub-step)
                x0[FIN_OK:D_OP_T + 1] = 0.0
            s_off = int(io[b + SG_S_OFF])
            o_off = s_off + int(io[b + SG_S_LEN])  # (the blob: S, offsets, indices)
            Sa = iblob[s_off:o_off]
            if work.shape[0] < _work_size(Sa):
                work = np.empty(_work_size(Sa))
            if io[b + SG_PEERS] != 0.0:
                off = iblob[o_off:o_off + n + 1]
                idx = iblob[o_off + n + 1:o_off + n + 1 + off[n]]
                sh_off = int(io[b + SG_SHARE_OFF])
                _slowdowns(last, off, idx, fblob[sh_off:sh_off + off[n]], contention, slow)
            else:
                slow[:] = 1.0
            r = substeps(x0, bd0, bm0, util0, memo, table, Sa, Fa, slow, ci, cf, cnt, psum, osum, out, miss, fail,
                         work, xs, bds, bms, utils)
            if r != DONE:
                io[IO_FIRST] = j
                return r
        for i in range(N_FLUID):
            io[i] = x0[i]
        io[IO_LAST_T] = x0[LAST_T]
        for i in range(N_ACC):
            io[IO_ACC + i] = x0[FIN_OK + i]
        return DONE
