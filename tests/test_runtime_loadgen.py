"""The load generator: trace slicing, summaries, and a bounded replay against the server."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from runtime.control import Plan
from runtime.engine import Engine
from runtime.loadgen import RequestResult, Workload, replay, summarise, workload_from_trace
from runtime.model import build_model
from runtime.models import get_model
from runtime.server import ServerThread, create_app


def test_workload_from_trace_is_bounded_and_clipped():
    wl = workload_from_trace("azure-conv", rate_scale=2.0, duration_s=30.0, max_requests=40, max_prompt=100,
                             max_output=20)
    assert 0 < len(wl.arrival_s) <= 40
    assert wl.arrival_s[0] == 0.0 and wl.arrival_s[-1] < 30.0
    assert np.all(np.diff(wl.arrival_s) >= 0)
    assert wl.prompt_tokens.max() <= 100 and wl.output_tokens.max() <= 20 and wl.prompt_tokens.min() >= 1
    slow = workload_from_trace("azure-conv", rate_scale=1.0, duration_s=30.0, max_requests=10_000)
    fast = workload_from_trace("azure-conv", rate_scale=2.0, duration_s=30.0, max_requests=10_000)
    assert len(fast.arrival_s) > len(slow.arrival_s)  # compressing time sends more in the same window
    with pytest.raises(ValueError, match="rate_scale must be > 0"):
        workload_from_trace("azure-conv", rate_scale=0)


def test_workload_rejects_unsorted_and_ragged():
    with pytest.raises(ValueError, match="sorted"):
        Workload(np.array([1.0, 0.5]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(ValueError, match="differ in length"):
        Workload(np.array([0.0]), np.array([1, 1]), np.array([1]))


def test_summarise_hand_computed():
    rs = [RequestResult(0, 0.0, 4, 3, status=200, tokens=3, ttft_s=0.1, tbt_s=[0.02, 0.04]),
          RequestResult(1, 0.1, 4, 2, status=200, tokens=2, ttft_s=0.3, tbt_s=[0.06]),
          RequestResult(2, 0.2, 4, 2, status=429, error="busy")]
    s = summarise(rs, wall_s=2.0)
    assert s["requests"] == 3 and s["completed"] == 2 and s["errors"] == {"429": 1}
    assert s["ttft_p50_s"] == pytest.approx(0.2)
    assert s["tbt_p50_s"] == pytest.approx(0.04)
    assert s["tokens"] == 5 and s["throughput_tok_s"] == pytest.approx(2.5)
    assert s["incomplete"] == 0


def test_replay_against_live_server():
    model = build_model(get_model("tiny"), seed=4)
    eng = Engine(model, Plan.model_level(1, 16, 1)).start()
    srv = ServerThread(create_app(eng)).start()
    try:
        wl = Workload(np.array([0.0, 0.05, 0.1, 0.1, 0.2]), np.array([3, 10, 1, 30, 8]), np.array([4, 2, 6, 3, 5]))
        results = asyncio.run(replay(srv.url, wl, vocab_size=256, timeout_s=30))
        s = summarise(results, 1.0)
        assert s["completed"] == 5 and s["errors"] == {} and s["incomplete"] == 0
        assert [r.tokens for r in results] == [4, 2, 6, 3, 5]
        assert all(r.ttft_s is not None and len(r.tbt_s) == r.tokens - 1 for r in results)
        assert results[4].sent_s >= 0.2
    finally:
        srv.stop()
        eng.stop()
