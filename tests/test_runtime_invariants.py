"""The engine under hypothesis-drawn memory, batch limits, placements, plan changes and requests:
every request ends with the tokens the unsplit model generates, and every KV block comes back,
whatever preemption (on-demand KV), micro-batching, hand-overs on scale-down and hops between
pools happened on the way."""
from __future__ import annotations

import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.control import OperatorPlan, Plan
from runtime.engine import Engine, EngineConfig
from runtime.kvcache import KVLayout
from runtime.model import build_model, generate_split
from runtime.models import OPERATOR_GROUPS, get_model

TINY = get_model("tiny")
BLOCK = 4  # tokens per KV block: small, so that sequences cross blocks and memory runs out often
MODEL = build_model(TINY, dtype=torch.float64, seed=3)


@st.composite
def cases(draw):  # noqa: ANN001, ANN201
    n = draw(st.integers(1, 8))
    reqs = [(draw(st.lists(st.integers(0, TINY.vocab_size - 1), min_size=1, max_size=16)), draw(st.integers(1, 16)))
            for _ in range(n)]
    longest = max(len(p) + m - 1 for p, m in reqs)
    least = -(-longest // BLOCK)  # the longest request fits one replica, and little more
    blocks = draw(st.integers(least, least + 3))
    return {
        "reqs": reqs, "blocks": blocks,
        "attn": draw(st.integers(1, 2)), "attn_batch": draw(st.integers(1, 8)),
        "placement": draw(st.sampled_from(["pack", "dedicated"])),
        "alloc": draw(st.sampled_from(["on_demand", "reserve"])),
        "micro": draw(st.sampled_from([(1, "fixed"), (2, "fixed"), (2, "adaptive"), (3, "fixed")])),
        # a second plan applied while the requests run (None: the first stays), and when
        # (attention replicas, batch, placement, attention tp: a change of tp replaces the replicas)
        "change": draw(st.none() | st.tuples(st.integers(1, 3), st.integers(1, 8),
                                             st.sampled_from(["pack", "dedicated"]), st.integers(1, 2))),
        "after_s": draw(st.sampled_from([0.0, 0.005, 0.02])),
        # projection and MLP pools: replicas, max_batch, and how a stage is shared among them
        "pools": draw(st.tuples(st.integers(1, 2), st.integers(1, 8), st.sampled_from(["fill", "spread"]))),
        # tensor parallelism of attention and of the projection / MLP pools (split over 2 "devices")
        "tp": draw(st.tuples(st.integers(1, 2), st.integers(1, 2))),
    }


def plan_of(attn: int, attn_batch: int, placement: str, attn_tp: int = 1, pools: tuple[int, int] = (1, 8),
            pools_tp: int = 1) -> Plan:
    ops = {g: OperatorPlan(1, 8, placement) for g in OPERATOR_GROUPS}
    ops["attn"] = OperatorPlan(attn, attn_batch, placement, attn_tp)
    for g in ("proj", "mlp"):
        ops[g] = OperatorPlan(pools[0], pools[1], placement, pools_tp)
    return Plan(ops)


# 60 examples (~15 s here; session 18 added the projection / MLP pools' size and dispatch, session
# 19 tensor parallelism of attention and the pools, and attention tp changes while serving). Of 100 examples counted once: 39 preempt, 29 cut micro-batches, and
# 6 retire an attention replica that still holds sequences (hand-over). 300 passed locally in
# session 17, after the admission fix this test found (a request filling a replica exactly
# never started).
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_request_ends_with_the_reference_tokens_and_no_block_leaks(case):
    lay = KVLayout(TINY.n_layers, TINY.n_kv_heads, TINY.head_dim, BLOCK, torch.float64)
    conf = EngineConfig(kv_bytes_per_replica=case["blocks"] * lay.bytes_per_block, kv_block_tokens=BLOCK,
                        kv_allocation=case["alloc"],
                        micro_batches=case["micro"][0], micro_batching=case["micro"][1],
                        pool_dispatch=case["pools"][2])
    tp_attn, tp_pools = case["tp"]
    eng = Engine(MODEL, plan_of(case["attn"], case["attn_batch"], case["placement"], tp_attn, case["pools"][:2],
                                tp_pools), conf).start()
    try:
        with eng._lock:  # all queued before the first iteration: the most contention for memory
            seqs = [eng.submit(p, m) for p, m in case["reqs"]]
        if case["change"] is not None:  # scaling while they run: hand-overs, drains, new replicas
            time.sleep(case["after_s"])
            eng.apply(plan_of(*case["change"], case["pools"][:2], tp_pools))
        deadline = time.perf_counter() + 20
        for s in seqs:
            assert s.finished.wait(max(deadline - time.perf_counter(), 0.01)), f"request {s.id} did not finish"
        for s, (p, m) in zip(seqs, case["reqs"]):
            assert s.finish_reason == "length"
            assert s.generated == generate_split(MODEL, p, m)
        with eng._lock:
            assert not eng._running and not eng._waiting
            for r in eng.replicas["attn"]:
                assert r.kv.free_blocks == r.kv.n_blocks and not r.kv.sequences()
    finally:
        eng.stop()
