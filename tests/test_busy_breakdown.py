"""bench/busy_breakdown.py: the per-process busy GPU-seconds add up to the simulator's own joules."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.parametrize("name,dispatch", [("static", "fill"), ("operator-queueing", "spread"),
                                           ("operator-queueing", "fill")])
def test_busy_split_accounts_for_every_joule(name, dispatch):
    from busy_breakdown import breakdown

    from agents.envtools import load_scenario

    r = breakdown(name, load_scenario(None, pool_dispatch=dispatch), "val", None, window_s=120.0)
    # idle W x GPU-s + (busy W - idle W) x busy GPU-s = the simulator's energy
    assert r["check"] == pytest.approx(1.0, abs=2e-3)
    assert all(v >= 0 for v in r["busy_gpu_s"].values())
    assert r["busy_total_gpu_s"] <= r["gpu_seconds"]
    if name == "static":
        assert set(r["busy_gpu_s"]) == {"model"}  # whole-model instances only
    else:
        assert {"attn", "mlp", "proj"} <= set(r["busy_gpu_s"])
