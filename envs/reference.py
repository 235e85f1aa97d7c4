"""The reference fidelity: a discrete-event simulator at iteration granularity.

Entities: requests (numpy arrays indexed by request id), attention units (the replicas
that hold sequences' KV cache: whole-model instances, or attention-pool replicas when
attention is disaggregated) and the shared stateless pools, whose effect enters through
:class:`envs.world.StepModel`. Events: arrivals, iteration ends, replica-ready times.

Serving discipline (vLLM / Sarathi-Serve style, documented in docs/SIMULATOR.md):

* one FIFO admission queue; a request is admitted into a unit with a free batch slot and
  KV room for its whole prompt (allocated at admission, as vLLM's block manager does);
  it is rejected with a reason if it can never fit (``too_long``) or waits longer than
  ``max_queue_wait_s`` (``queue_timeout``);
* continuous batching: a unit iterates back to back while it holds sequences; each
  iteration decodes one token for every decoding sequence and prefills up to
  ``prefill_chunk_tokens`` prompt tokens, FCFS (chunked prefill);
* the first token is emitted when a prompt's last chunk is prefilled (TTFT); every
  decode iteration emits one token per decoding sequence (one TBT gap each);
* KV grows by one token per decoded token; when a unit's KV is full the most recently
  admitted sequence is preempted (recompute: back to the head of the queue, its KV freed,
  later re-prefilled over prompt + generated tokens, then it continues decoding);
* removed units stop admitting; with ``kv_migration`` (the runtime's behaviour) each first
  hands its sequences, at its next iteration boundary, to the serving units with a free batch
  slot and KV room (most free KV first, the copy taking the measured send/recv time of the
  sequence's KV); what does not fit drains there, and its GPUs are paid until it is empty.
"""
from __future__ import annotations

import heapq
from collections import deque

import numpy as np

from runtime.control import SLO

from envs.base import IntervalMetrics, Simulator
from envs.predictor import ExecutionPredictor, quantise
from envs.scenario import Scenario
from envs.world import Layout, StepModel

# request states
WAITING, PREFILL, DECODE, DONE, REJECTED = 0, 1, 2, 3, 4
REJECT_REASONS = {1: "too_long", 2: "queue_timeout"}
# event kinds (ordering at equal times: ready before iteration ends before arrivals)
_READY, _ITER, _ARRIVE = 0, 1, 2


class Unit:
    """An attention unit: its batch, its KV and its iteration in flight."""

    __slots__ = ("uid", "kv_cap", "kv", "pre", "n_dec", "ctx_sum", "order", "finish_at", "it", "busy_until",
                 "draining", "gone", "iter_plan", "last_tokens", "last_seqs", "pre_tokens", "cap_next",
                 "handoff")

    def __init__(self, uid: int, kv_cap: float) -> None:
        self.uid = uid
        self.kv_cap = kv_cap
        self.cap_next: float | None = None  # a smaller KV capacity taking effect at the next iteration
        self.kv = 0.0
        self.pre: deque[list] = deque()   # [rid, remaining prefill tokens, total prefill tokens]
        self.n_dec = 0
        self.ctx_sum = 0.0
        self.order: list[tuple[int, int]] = []   # decoding (rid, epoch), admission order
        self.finish_at: dict[int, list[tuple[int, int]]] = {}
        self.it = 0                # iterations completed
        self.busy_until = -1.0     # end of the iteration in flight (< now: idle)
        self.draining = False
        self.handoff = False  # removed, its sequences not yet offered to the serving units
        self.gone = False
        self.iter_plan: tuple = ()
        self.last_tokens = 0.0
        self.last_seqs = 0.0
        self.pre_tokens = 0   # prompt tokens admitted and not yet prefilled

    @property
    def seqs(self) -> int:
        return self.n_dec + len(self.pre)


class ReferenceSimulator(Simulator):
    """Discrete-event reference (see module docstring)."""

    fidelity = "reference"

    def __init__(self, scenario: Scenario, trace, pred: ExecutionPredictor, slo: SLO, seed: int = 0,
                 cache: dict | None = None) -> None:
        super().__init__(scenario, trace, pred, slo, seed, cache)
        self._memo: dict[tuple, tuple[float, dict]] = self.cache.setdefault("ref_iter", {})
        self._reset_queues()

    # ------------------------------------------------------------------ state
    def _reset_queues(self) -> None:
        n = len(self.arrival)
        self.state = np.zeros(n, dtype=np.int8)
        self.reason = np.zeros(n, dtype=np.int8)
        self.ttft = np.full(n, np.nan)
        self.first_t = np.full(n, np.nan)
        self.finish_t = np.full(n, np.nan)
        self.last_tok = np.full(n, np.nan)
        self.gen = np.zeros(n, dtype=np.int64)   # tokens generated, as of the last prefill (decodes: see dec_it0)
        self.dec_it0 = np.zeros(n, dtype=np.int64)  # the unit's iteration count when the request began decoding
        self.epoch = np.zeros(n, dtype=np.int64)
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.queue: deque[int] = deque()
        self.units: list[Unit] = []
        self.events: list[tuple] = []
        self.next_arrival = 0
        self._seq = 0
        self.layout: Layout | None = None
        self.sm: StepModel | None = None
        self.iter_log: list[tuple[float, float, float]] = []  # (end time, duration, decoding seqs)
        self.gap_log: list[tuple[float, float]] = []          # (time, gap) of resumed and handed-over sequences
        self.reject_t = np.full(n, np.nan)
        self._busy_acc: dict[str, float] = {}
        self._retired = 0.0
        self._t0 = 0.0
        self._tot_tokens = 0.0
        self._tot_seqs = 0.0
        self._unit_sig: tuple | None = None
        self._rng = np.random.default_rng(self.seed)

    def reset(self, plan):
        """Start the run with ``plan`` loaded: its attention units exist from t=0 (so a first
        step that removes some drains real, empty units instead of units never created)."""
        state = super().reset(plan)
        self._reconcile(0.0)
        return state

    def _idle(self) -> bool:
        return not self.queue and all(u.seqs == 0 for u in self.units) and self.next_arrival >= len(self.arrival)

    def _push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, kind, self._seq, payload))

    # ------------------------------------------------------------------ units vs the timeline
    def _reconcile(self, t: float) -> None:
        """Match live units to the serving plan at ``t`` (new units, draining ones)."""
        layout = self.serving_layout(t)
        self.layout = layout
        self.sm = self.step_model(layout)
        # the KV holders change identity only when attention's placement or tp changes; other
        # groups joining or leaving an instance change its timing, not its sequences
        sig = (layout.plan["attn"].placement, layout.unit_tp)
        live = [u for u in self.units if not u.draining and not u.gone]
        if self._unit_sig is not None and sig != self._unit_sig:
            # placement / tp switch of the KV holders: old units drain, new ones take over
            for u in live:
                self._start_drain(u, t, counted=False)
            live = []
        self._unit_sig = sig
        want = layout.units
        while len(live) < want:
            u = Unit(len(self.units), layout.unit_kv_tokens)
            self.units.append(u)
            live.append(u)
        if len(live) > want:
            live.sort(key=lambda x: x.seqs)
            for u in live[: len(live) - want]:
                self._start_drain(u, t, counted=True)
            live = live[len(live) - want:]
        for u in live:
            cap = layout.unit_kv_tokens
            if cap >= u.kv:
                u.kv_cap, u.cap_next = cap, None
            else:
                # The new layout leaves this unit less KV memory than its sequences hold (e.g.
                # a replica packed onto its GPUs): it keeps them until its next iteration
                # boundary, where the newest are preempted to fit (the replica taking the
                # memory is still loading its weights then); no new admissions meanwhile.
                u.cap_next = cap
        for u in self.units:
            if u.handoff and u.busy_until < t:
                self._handoff(u, t, live)
                self._start_iteration(u, t)  # what stayed keeps iterating; retired if nothing did
        self._dispatch(t)

    def _start_drain(self, u: Unit, t: float, counted: bool) -> None:
        u.draining = True
        if not counted:
            self.timeline.draining_units += 1
        if u.seqs == 0 and u.busy_until < t:
            self._retire(u, t)
        elif self.sc.kv_migration:
            u.handoff = True  # at its next iteration boundary (now, if idle: end of _reconcile)

    def _handoff(self, u: Unit, t: float, live: list[Unit] | None = None) -> None:
        """Move the removed unit ``u``'s sequences (decoding first, then prefilling, in admission
        order) to serving units with a free batch slot and KV room for them, the one with the
        most free KV first, as the runtime's engine does; ``u`` keeps what fits nowhere.

        A moved decoding sequence waits for its KV copy (``kv_send_ms``) and for the target's
        iteration in flight: that wait is recorded as one extra TBT gap; its next tokens come
        from the target's iterations. A moved prefill keeps its progress.
        """
        u.handoff = False
        if live is None:
            live = [v for v in self.units if not v.draining and not v.gone]
        if not live or u.seqs == 0:
            return
        B = self.layout.plan["attn"].max_batch
        tp = max(self.layout.unit_tp, 1)

        def room(v: Unit) -> float:
            cap = v.kv_cap if v.cap_next is None else min(v.kv_cap, v.cap_next)
            return cap - v.kv

        started: list[Unit] = []
        order, u.order = u.order, []
        for rid, ep in order:
            if self.epoch[rid] != ep or self.state[rid] != DECODE:
                continue
            made = int(self.gen[rid] + u.it - self.dec_it0[rid])  # tokens generated so far
            ctx = int(self.prompt[rid]) + made
            best = max((v for v in live if v.seqs < B and room(v) >= ctx + 1), key=room, default=None)
            if best is None:
                u.order.append((rid, ep))
                continue
            self.gen[rid] = made
            self.epoch[rid] += 1
            new_ep = int(self.epoch[rid])
            u.kv -= ctx
            u.ctx_sum -= ctx
            u.n_dec -= 1
            idle = best.busy_until < t
            first = best.it if idle else best.it + 1  # the first of best's iterations it joins
            best.kv += ctx
            best.ctx_sum += ctx
            best.n_dec += 1
            best.order.append((rid, new_ep))
            self.dec_it0[rid] = first
            best.finish_at.setdefault(first + int(self.output[rid] - made) - 1, []).append((rid, new_ep))
            wait = self.pred.kv_send_ms(ctx, tp) / 1000.0 + (0.0 if idle else best.busy_until - t)
            self.gap_log.append((t, wait))
            if idle and best not in started:
                started.append(best)
        keep: deque[list] = deque()
        for item in u.pre:
            rid, remaining, total = item
            best = max((v for v in live if v.seqs < B and room(v) >= total + 1), key=room, default=None)
            if best is None:
                keep.append(item)
                continue
            u.kv -= total
            u.pre_tokens -= remaining
            best.kv += total
            best.pre.append(item)
            best.pre_tokens += remaining
            if best.busy_until < t and best not in started:
                started.append(best)
        u.pre = keep
        for v in started:
            if v.busy_until < t:
                self._start_iteration(v, t)

    def _retire(self, u: Unit, t: float) -> None:
        u.gone = True
        # counted among the units utilisation averages over for the share of the interval it lived
        self._retired += min(max((t - self._t0) / self.dt, 0.0), 1.0)
        # its last iteration no longer loads the shared pools
        self._tot_tokens -= u.last_tokens
        self._tot_seqs -= u.last_seqs
        u.last_tokens = u.last_seqs = 0.0
        self.account(t)
        self.timeline.drained(1)

    # ------------------------------------------------------------------ admission
    def _need(self, rid: int) -> int:
        return int(self.prompt[rid] + self.gen[rid])

    def _dispatch(self, t: float) -> None:
        """Route queued requests, FIFO, each to the least-loaded unit with a free slot and KV room.

        Load = prompt tokens waiting to be prefilled + 32 x sequences (join-shortest-queue on
        the work that delays a new request's first token). A head request that fits no
        unit waits (head-of-line blocking, as a FIFO router does).
        """
        q = self.queue
        if not q:
            return
        B = self.layout.plan["attn"].max_batch
        live = [u for u in self.units if not u.draining and not u.gone]
        max_wait = self.sc.max_queue_wait_s
        started = []
        while q:
            rid = q[0]
            if self.gen[rid] == 0 and t - self.arrival[rid] > max_wait:
                q.popleft()
                self._reject(rid, 2, t)
                continue
            need = self._need(rid)
            best = None
            best_load = 0.0
            for u in live:
                cap = u.kv_cap if u.cap_next is None else min(u.kv_cap, u.cap_next)
                if u.seqs < B and u.kv + need + 1 <= cap:
                    load = u.pre_tokens + 32.0 * u.seqs
                    if best is None or load < best_load:
                        best, best_load = u, load
            if best is None:
                break
            q.popleft()
            best.kv += need
            best.pre.append([rid, need, need])
            best.pre_tokens += need
            self.state[rid] = PREFILL
            if best.busy_until < t:
                started.append(best)
        for u in started:
            if u.busy_until < t:
                self._start_iteration(u, t)

    def _reject(self, rid: int, code: int, t: float) -> None:
        self.state[rid] = REJECTED
        self.reason[rid] = code
        self.reject_t[rid] = t

    # ------------------------------------------------------------------ iterations
    def _preempt(self, u: Unit, t: float) -> None:
        """Free KV for the coming iteration by preempting the newest decoding sequences, then
        (when a plan change shrank the unit's KV capacity) the newest prefilling ones."""
        if u.cap_next is not None:
            u.kv_cap, u.cap_next = u.cap_next, None
        while u.kv + u.n_dec > u.kv_cap and u.order:
            rid, ep = u.order.pop()
            if self.epoch[rid] != ep or self.state[rid] != DECODE:
                continue
            self.epoch[rid] += 1
            self.preemptions[rid] += 1
            # tokens decoded since its prefill are cached too: count them before freeing
            self.gen[rid] += u.it - self.dec_it0[rid]
            ctx = self._need(rid)
            u.kv -= ctx
            u.ctx_sum -= ctx
            u.n_dec -= 1
            self.state[rid] = WAITING
            self.queue.appendleft(rid)
        while u.kv + u.n_dec > u.kv_cap and u.pre:
            rid, remaining, total = u.pre.pop()  # newest prefill; its progress is recomputed later
            u.kv -= total
            u.pre_tokens -= remaining
            self.preemptions[rid] += 1
            self.state[rid] = WAITING
            self.queue.appendleft(rid)

    def _start_iteration(self, u: Unit, t: float) -> None:
        if u.seqs == 0:
            if u.draining and not u.gone:
                self._retire(u, t)
            return
        self._preempt(u, t)
        C = self.sc.prefill_chunk_tokens
        budget = C
        plan = []
        p_tok = 0
        ctx_pre = 0.0
        for item in u.pre:
            if budget <= 0:
                break
            take = min(item[1], budget)
            plan.append((item, take))
            budget -= take
            p_tok += take
            ctx_pre += item[2]
        n_pre = len(plan)
        n_dec = u.n_dec
        if n_dec + p_tok == 0:
            return
        ctx_dec = u.ctx_sum / n_dec if n_dec else 0.0
        tokens = n_dec + p_tok
        self._tot_tokens += tokens - u.last_tokens
        self._tot_seqs += n_dec + n_pre - u.last_seqs
        u.last_tokens, u.last_seqs = tokens, n_dec + n_pre
        ms, busy = self._time(n_dec, ctx_dec, p_tok, ctx_pre / n_pre if n_pre else 0.0, n_pre)
        dur = ms / 1000.0
        u.iter_plan = (plan, n_dec, dur, busy)
        u.busy_until = t + dur
        self._push(t + dur, _ITER, u)

    def _time(self, n_dec: int, ctx_dec: float, p_tok: int, ctx_pre: float, n_pre: int) -> tuple[float, dict]:
        sm = self.sm
        remote = sm.remote
        key = (sm.signature, n_dec, quantise(ctx_dec), p_tok, quantise(ctx_pre), n_pre,
               quantise(self._tot_tokens) if remote else 0, quantise(self._tot_seqs) if remote else 0,
               tuple(round(v, 1) for v in self.util.values()) if any(self.layout.peers.values()) else ())
        hit = self._memo.get(key)
        if hit is None:
            r = sm.iteration(n_dec, ctx_dec, p_tok, ctx_pre, n_pre, max(self._tot_tokens, n_dec + p_tok),
                             max(self._tot_seqs, n_dec + n_pre), self.util)
            if len(self._memo) > 500_000:
                self._memo.clear()
            hit = self._memo[key] = (r.ms, r.busy)
        return hit

    def _end_iteration(self, u: Unit, t: float) -> None:
        plan, n_dec, dur, busy = u.iter_plan
        for proc, b in busy.items():
            self._busy_acc[proc] = self._busy_acc.get(proc, 0.0) + b * dur
        j = u.it
        u.it += 1
        # decodes: one token each
        if n_dec:
            self.iter_log.append((t, dur, float(n_dec)))
            u.kv += n_dec
            u.ctx_sum += n_dec
            for rid, ep in u.finish_at.pop(j, ()):
                if self.epoch[rid] != ep or self.state[rid] != DECODE:
                    continue
                self._finish(u, rid, t)
        # prefill chunks
        for item, take in plan:
            item[1] -= take
            u.pre_tokens -= take
        while u.pre and u.pre[0][1] <= 0:
            rid = u.pre.popleft()[0]
            self._prefilled(u, rid, t)
        u.busy_until = t - 1e-12
        if u.draining:
            if u.handoff:
                self._handoff(u, t)
            if u.seqs:
                self._start_iteration(u, t)
            else:
                self._retire(u, t)
            return
        self._start_iteration(u, t)
        self._dispatch(t)
        if u.seqs == 0:
            self._tot_tokens -= u.last_tokens
            self._tot_seqs -= u.last_seqs
            u.last_tokens = u.last_seqs = 0.0

    def _prefilled(self, u: Unit, rid: int, t: float) -> None:
        if self.gen[rid] == 0:
            self.ttft[rid] = t - self.arrival[rid]
            self.first_t[rid] = t
            self.gen[rid] = 1
        else:
            self.gap_log.append((t, t - self.last_tok[rid]))
            self.gen[rid] += 1
        self.last_tok[rid] = t
        if self.gen[rid] >= self.output[rid]:
            u.kv -= self._need(rid) - 1
            self.state[rid] = DONE
            self.finish_t[rid] = t
            return
        self.state[rid] = DECODE
        u.kv += 1  # the new token's KV (prompt + generated tokens are cached from here on)
        u.n_dec += 1
        u.ctx_sum += self._need(rid)
        ep = int(self.epoch[rid])
        u.order.append((rid, ep))
        self.dec_it0[rid] = u.it
        # decoded tokens come at the ends of iterations u.it, u.it + 1, ...
        last = u.it + int(self.output[rid] - self.gen[rid]) - 1
        u.finish_at.setdefault(last, []).append((rid, ep))

    def _finish(self, u: Unit, rid: int, t: float) -> None:
        self.gen[rid] = self.output[rid]
        ctx = self._need(rid)
        u.kv -= ctx
        u.ctx_sum -= ctx
        u.n_dec -= 1
        self.state[rid] = DONE
        self.finish_t[rid] = t
        self.last_tok[rid] = t

    # ------------------------------------------------------------------ arrivals
    def _arrive(self, rid: int, t: float) -> None:
        need = int(self.prompt[rid] + self.output[rid])
        cap = self.layout.unit_kv_tokens if self.layout else 0
        if need > self.pred.cfg.max_seq_len or need > cap:
            self._reject(rid, 1, t)
            return
        self.queue.append(rid)
        self._dispatch(t)

    # ------------------------------------------------------------------ one interval
    def _run(self, t0: float, t1: float) -> IntervalMetrics:
        self._reconcile(t0)
        for r in sorted({r for tl in self.timeline.groups.values() for r in tl.ready if t0 < r < t1}
                        | {tl.switch_at for tl in self.timeline.groups.values()
                           if tl.switch_at is not None and t0 < tl.switch_at < t1}):
            self._push(r, _READY, None)
        n = len(self.arrival)
        i = self.next_arrival
        # schedule this interval's arrivals lazily: one pending arrival event at a time
        if i < n and self.arrival[i] < t1 and not any(e[1] == _ARRIVE for e in self.events):
            self._push(self.arrival[i], _ARRIVE, i)
        self._busy_acc = {}
        self._retired = 0.0  # units retired during this interval, weighted by the share of it they lived
        self._t0 = t0
        ev = self.events
        while ev and ev[0][0] < t1:
            t, kind, _, payload = heapq.heappop(ev)
            if kind == _ITER:
                self._end_iteration(payload, t)
            elif kind == _ARRIVE:
                rid = payload
                self.next_arrival = rid + 1
                self._arrive(rid, t)
                if rid + 1 < n:
                    if self.arrival[rid + 1] < t1:
                        self._push(self.arrival[rid + 1], _ARRIVE, rid + 1)
            else:
                self.account(t)
                self.timeline.advance(t)
                self._reconcile(t)
        # periodic timeout sweep of the queue head
        while self.queue and self.gen[self.queue[0]] == 0 and t1 - self.arrival[self.queue[0]] > self.sc.max_queue_wait_s:
            self._reject(self.queue.popleft(), 2, t1)
        return self._metrics(t0, t1)

    def _metrics(self, t0: float, t1: float) -> IntervalMetrics:
        dt = t1 - t0
        lo, hi = self.index.start[self.k] if self.k < self.n_intervals else 0, \
            self.index.end[self.k] if self.k < self.n_intervals else 0
        m = IntervalMetrics(arrivals=float(hi - lo))
        if hi > lo:
            m.prompt_mean = float(self.prompt[lo:hi].mean())
            m.output_mean = float(self.output[lo:hi].mean())
        ft = self.first_t
        got = (ft >= t0) & (ft < t1)
        if got.any():
            m.ttft_p50_s, m.ttft_p99_s = (float(x) for x in np.percentile(self.ttft[got], [50, 99]))
        it = [(d, w) for (te, d, w) in self.iter_log[-20000:] if t0 <= te < t1]
        gaps = [(g, 1.0) for (te, g) in self.gap_log[-5000:] if t0 <= te < t1]
        if it or gaps:
            m.tbt_p50_s, m.tbt_p99_s = _weighted_percentiles(it + gaps, (50, 99))
        fin = (self.finish_t >= t0) & (self.finish_t < t1)
        rej = (self.reject_t >= t0) & (self.reject_t < t1)
        m.finished = float(fin.sum())
        m.rejected = float(rej.sum())
        m.met = float(self._met(fin).sum())
        m.queued = float(len(self.queue))
        live = [u for u in self.units if not u.gone]
        m.running = float(sum(u.seqs for u in live))
        cap = sum(u.kv_cap for u in live)
        m.kv_used_frac = sum(u.kv for u in live) / cap if cap else 0.0
        m.queue_tokens = float(sum(self.prompt[r] + self.output[r] for r in self.queue)) if len(self.queue) < 5000 \
            else float(len(self.queue) * (self.prompt.mean() + self.output.mean()))
        # busy is summed over every unit that iterated (serving, draining, retired meanwhile):
        # average over the same units, each retired one for the part of the interval it lived
        n_units = max(len(live) + self._retired, 1)
        m.util = {k: min(v / (dt * n_units), 1.0) for k, v in self._busy_acc.items()}
        self.util = m.util
        return m

    def _met(self, mask: np.ndarray) -> np.ndarray:
        out = np.maximum(self.output[mask], 1)
        tpot = np.where(out > 1, (self.finish_t[mask] - self.first_t[mask]) / np.maximum(out - 1, 1), 0.0)
        return (self.ttft[mask] <= self.slo.ttft_s) & (tpot <= self.slo.tbt_s)

    # ------------------------------------------------------------------ results
    def request_table(self) -> dict[str, np.ndarray]:
        """Per request: state (0 waiting, 1 prefill, 2 decode, 3 done, 4 rejected), reject
        reason code, TTFT, finish time, generated tokens, preemptions."""
        return {"state": self.state.copy(), "reason": self.reason.copy(), "ttft_s": self.ttft.copy(),
                "finish_s": self.finish_t.copy(), "generated": self.gen.copy(),
                "preemptions": self.preemptions.copy()}

    def summary(self) -> dict:
        """Whole-run metrics over every request of the trace."""
        n = len(self.arrival)
        done = self.state == DONE
        rej = self.state == REJECTED
        ttft = self.ttft[~np.isnan(self.ttft)]
        gaps = [(d, w) for (_, d, w) in self.iter_log] + [(g, 1.0) for (_, g) in self.gap_log]
        tbt50, tbt99 = _weighted_percentiles(gaps, (50, 99)) if gaps else (0.0, 0.0)
        out = {
            "requests": n,
            "finished": int(done.sum()),
            "rejected": int(rej.sum()),
            "rejected_too_long": int((self.reason == 1).sum()),
            "rejected_queue_timeout": int((self.reason == 2).sum()),
            "queued": int(n - done.sum() - rej.sum()),
            "preemptions": int(self.preemptions.sum()),
            "slo_attainment": float(self._met(done).sum() / n) if n else 1.0,
            "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft.size else 0.0,
            "ttft_p99_s": float(np.percentile(ttft, 99)) if ttft.size else 0.0,
            "tbt_p50_s": tbt50,
            "tbt_p99_s": tbt99,
        }
        out.update(self._cost_summary())
        return out


def _weighted_percentiles(pairs: list[tuple[float, float]], qs: tuple[float, ...]) -> tuple[float, ...]:
    """Percentiles of values with integer-like weights (e.g. gap duration x sequences)."""
    a = np.asarray(pairs, dtype=np.float64)
    order = np.argsort(a[:, 0], kind="stable")
    v, w = a[order, 0], a[order, 1]
    cw = np.cumsum(w)
    total = cw[-1]
    return tuple(float(v[min(np.searchsorted(cw, q / 100.0 * total, side="left"), len(v) - 1)]) for q in qs)
