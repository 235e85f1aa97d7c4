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
"""
from __future__ import annotations

import math

import numpy as np

from runtime.control import SLO

from envs.base import IntervalMetrics, Simulator
from envs.predictor import ExecutionPredictor, quantise
from envs.scenario import Scenario
from envs.world import Layout, StepModel

_Z99 = 2.326


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
        self._reset_queues()

    # ------------------------------------------------------------------ state
    def _reset_queues(self) -> None:
        self.q = 0.0          # requests waiting for admission
        self.q_prompt = 0.0   # their prompt tokens
        self.q_output = 0.0   # their output tokens
        self.n = 0.0          # running sequences (prefilling + decoding)
        self.backlog = 0.0    # prompt tokens admitted but not yet prefilled
        self.r_prompt = 1.0   # mean prompt of running sequences
        self.r_output = 1.0   # mean output of running sequences
        self.kv = 0.0         # KV tokens held
        self.drain_until: list[tuple[float, int]] = []
        # run-level accumulators
        self.tot_arrived = 0.0
        self.tot_finished = 0.0
        self.tot_met = 0.0
        self.tot_rejected = 0.0
        self.ttft_rec: list[tuple[float, float, float]] = []
        self.tbt_rec: list[tuple[float, float, float]] = []

    def _idle(self) -> bool:
        return self.q < 0.5 and self.n < 0.5

    # ------------------------------------------------------------------ iteration time, memoised
    def _iter(self, layout: Layout, sm: StepModel, n_dec: float, ctx: float, chunk: float, n_pre: float) -> tuple[float, dict]:
        peers = layout.peers.get(sm.local_proc) or any(layout.peers.values())
        ukey = tuple(round(v, 1) for v in self.util.values()) if peers else ()
        key = (id(sm), int(round(n_dec)), quantise(ctx), quantise(chunk), int(round(n_pre)),
               quantise(self.r_prompt), ukey)
        hit = self._it.get(key)
        if hit is None:
            u = layout.units
            nd, cp = float(key[1]), float(key[3])
            r = sm.iteration(nd, float(key[2]), cp, float(key[5]), float(key[4]), (nd + cp) * u,
                             (nd + key[4]) * u, self.util)
            if len(self._it) > 200_000:
                self._it.clear()
            hit = self._it[key] = (r.ms / 1000.0, r.busy)
        return hit

    # ------------------------------------------------------------------ one interval
    def _run(self, t0: float, t1: float) -> IntervalMetrics:
        sc = self.sc
        k = self.k
        idx = self.index
        in_trace = k < self.n_intervals
        a_tot = idx.count[k] if in_trace else 0.0
        p_mean = idx.prompt_sum[k] / a_tot if a_tot else self.r_prompt
        o_mean = idx.output_sum[k] / a_tot if a_tot else self.r_output
        p50 = idx.prompt_p50[k] if a_tot else p_mean
        p99 = idx.prompt_p99[k] if a_tot else p_mean
        h = (t1 - t0) / self.sub_steps
        C = float(sc.prefill_chunk_tokens)
        m = IntervalMetrics(arrivals=a_tot, prompt_mean=p_mean if a_tot else 0.0,
                            output_mean=o_mean if a_tot else 0.0)
        util_acc: dict[str, float] = {}
        waits: list[float] = []
        t_dec_acc = t_mix_acc = f_mix_acc = w_acc = 0.0
        t_mix_max = t_dec_max = 0.0
        fin = met_ttft_w = 0.0
        kv_frac = 0.0
        backlog_u_max = 0.0
        for s in range(self.sub_steps):
            t = t0 + s * h
            # draining units hand back GPUs when their sequences should have finished
            if self.drain_until and self.drain_until[0][0] <= t:
                self.account(t)
                while self.drain_until and self.drain_until[0][0] <= t:
                    self.timeline.drained(self.drain_until.pop(0)[1])
            layout = self.serving_layout(t + 0.5 * h)
            sm = self.step_model(layout)
            U = max(layout.units, 1)
            B = layout.plan["attn"].max_batch
            # arrivals
            a = a_tot / self.sub_steps
            self.q += a
            self.q_prompt += a * p_mean
            self.q_output += a * o_mean
            # current operating point
            n_u = self.n / U
            pre_u = self.backlog / U
            chunk = min(C, pre_u)
            n_pre = min(n_u, max(pre_u / max(self.r_prompt, 1.0), 0.0))
            n_dec = max(n_u - n_pre, 0.0)
            ctx = self.r_prompt + 0.5 * self.r_output
            T, busy = self._iter(layout, sm, max(n_dec, 1.0), ctx, chunk, n_pre)
            T_dec, _ = self._iter(layout, sm, max(n_dec, 1.0), ctx, 0.0, 0.0)
            iters = h / T
            # prefill and decode progress
            pre_done = min(self.backlog, iters * C * U)
            self.backlog -= pre_done
            tokens = n_dec * U * iters
            done = min(self.n - self.backlog / max(self.r_prompt, 1.0),
                       tokens / max(self.r_output - 1.0, 1.0)) if self.n > 0 else 0.0
            done = max(done, 0.0)
            self.n -= done
            self.kv = max(self.kv + tokens + pre_done - done * (self.r_prompt + self.r_output), 0.0)
            fin += done
            # admission
            kv_cap = layout.unit_kv_tokens * U
            foot = self.r_prompt + 0.5 * self.r_output
            n_max = min(U * B, kv_cap / max(foot, 1.0))
            if self.n > n_max + 1e-9:
                # capacity shrank (fewer units, smaller batch or KV): preempt back to the queue
                out = self.n - n_max
                self.q += out
                self.q_prompt += out * self.r_prompt
                self.q_output += out * self.r_output
                self.backlog = max(self.backlog - out * self.r_prompt, 0.0) if self.backlog > 0 else 0.0
                self.kv = max(self.kv - out * foot, 0.0)
                self.n = n_max
            q_before = self.q
            admit = min(self.q, max(n_max - self.n, 0.0))
            if admit > 0:
                ap = self.q_prompt / self.q
                ao = self.q_output / self.q
                w_old = self.n
                self.n += admit
                self.r_prompt = (self.r_prompt * w_old + ap * admit) / self.n
                self.r_output = (self.r_output * w_old + ao * admit) / self.n
                self.backlog += admit * ap
                self.kv += 0.0
                self.q -= admit
                self.q_prompt -= admit * ap
                self.q_output -= admit * ao
            # queue wait by Little's law: what is left waits for the service rate
            serve_rate = max(done / h, 1e-9) if done > 0 else (U * B / max(self.r_output * T, 1e-9))
            wait = (q_before - admit) / serve_rate if q_before - admit > 1e-9 else 0.0
            if wait > sc.max_queue_wait_s and self.q > 0:
                keep = serve_rate * sc.max_queue_wait_s
                rej = max(self.q - keep, 0.0)
                frac = rej / self.q
                self.q -= rej
                self.q_prompt *= (1 - frac)
                self.q_output *= (1 - frac)
                m.rejected += rej
                wait = sc.max_queue_wait_s
            waits.append(wait)
            # TBT and TTFT ingredients
            f_mix = min(1.0, self.backlog / U / C) if self.backlog > 0 else min(1.0, admit * p_mean / (U * C * iters + 1e-9))
            f_mix_acc += f_mix
            t_dec_acc += T_dec
            t_mix_acc += T
            self._last_T = T
            t_mix_max = max(t_mix_max, T)
            t_dec_max = max(t_dec_max, T_dec)
            backlog_u_max = max(backlog_u_max, self.backlog / U)
            w_acc += wait
            kv_frac = max(kv_frac, self.kv / max(kv_cap, 1.0))
            active = min(1.0, n_u) if self.n > 0 else 0.0
            for proc, b in busy.items():
                util_acc[proc] = util_acc.get(proc, 0.0) + b * active / self.sub_steps
        n_s = self.sub_steps
        T_dec = t_dec_acc / n_s
        T_mix = t_mix_acc / n_s
        f = f_mix_acc / n_s
        wait50 = w_acc / n_s
        wait99 = max(waits) if waits else 0.0
        # TTFT: queue wait + wait for the running iteration + prefill iterations (FCFS chunk budget)
        ttft50 = wait50 + 0.5 * T_mix + math.ceil(max(p50, 1.0) / C) * T_mix
        ttft99 = wait99 + T_mix + math.ceil((max(p99, 1.0) + backlog_u_max) / C) * max(t_mix_max, T_mix)
        tbt50 = T_mix if f >= 0.5 else T_dec
        tbt99 = max(t_mix_max, T_dec) if f > 0.01 else t_dec_max
        tpot = f * T_mix + (1 - f) * T_dec
        p_ok = _lognorm_cdf(self.slo.ttft_s, ttft50, max(ttft99, ttft50)) * _phi(
            (math.log(self.slo.tbt_s) - math.log(max(tpot, 1e-9))) / 0.1)
        m.finished = fin
        m.met = fin * p_ok
        m.ttft_p50_s, m.ttft_p99_s, m.tbt_p50_s, m.tbt_p99_s = ttft50, ttft99, tbt50, tbt99
        m.queued, m.running = self.q, self.n
        m.kv_used_frac = kv_frac
        m.queue_tokens = self.q_prompt + self.q_output
        m.util = util_acc
        self.util = util_acc
        for g in ("embed", "attn", "proj", "mlp", "head"):
            m.group_ms[g] = 0.0
        self.tot_arrived += a_tot
        self.tot_finished += fin
        self.tot_met += m.met
        self.tot_rejected += m.rejected
        if fin > 0:
            self.ttft_rec.append((fin, ttft50, ttft99))
            tok = self.n * self.dt / max(T_mix, 1e-9)
            self.tbt_rec.append((max(tok, 1.0), tbt50, tbt99))
        return m

    # ------------------------------------------------------------------ drains
    def _on_drain(self, units: int) -> None:
        """Removed attention units finish their sequences after about half a mean output of iterations."""
        t = self.now + 0.5 * self.r_output * getattr(self, "_last_T", 0.05)
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
        from math import erf  # noqa: F401  (scalar erf below is vectorised by numpy via erfc approximation)
        cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
        mix = (cdf * w[None, :]).sum(axis=1) / w.sum()
        return float(np.interp(q, mix, grid))

    def summary(self) -> dict:
        """Whole-run metrics (mixture of the per-interval fitted distributions)."""
        out = {
            "requests": int(round(self.tot_arrived)),
            "finished": int(round(self.tot_finished)),
            "rejected": int(round(self.tot_rejected)),
            "queued": int(round(self.q + self.n)),
            "slo_attainment": self.tot_met / max(self.tot_arrived, 1e-9),
            "ttft_p50_s": self._mixture_quantile(self.ttft_rec, 0.5),
            "ttft_p99_s": self._mixture_quantile(self.ttft_rec, 0.99),
            "tbt_p50_s": self._mixture_quantile(self.tbt_rec, 0.5),
            "tbt_p99_s": self._mixture_quantile(self.tbt_rec, 0.99),
        }
        out.update(self._cost_summary())
        return out
