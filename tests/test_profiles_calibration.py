"""The A100 overhead and power fits: reproducible, within stated error bounds, carried to other GPUs."""
from __future__ import annotations

import numpy as np
import pytest

from profiles import ProfileDB
from profiles.calibrate import calibrate
from profiles.gpus import BUSY_FRACTION_OF_TDP, GPUS, IDLE_FRACTION_OF_TDP
from profiles.overhead import OVERHEAD

#: Error bounds this fit must hold (docs/PROFILES.md reports the numbers).
DECODE_MAPE_BOUND = 5.0
PREFILL_MAPE_BOUND = 15.0
POWER_MAPE_BOUND = 7.0


@pytest.fixture(scope="module")
def db() -> ProfileDB:
    return ProfileDB.load(measured_dir=None)


@pytest.fixture(scope="module")
def res(db):
    return calibrate(db)


def test_shipped_constants_are_the_fit(res):
    m = res.model
    assert m.floor_ms_per_layer == pytest.approx(OVERHEAD.floor_ms_per_layer, abs=1e-9)
    assert m.base_ms == pytest.approx(OVERHEAD.base_ms, abs=1e-3)
    assert m.per_seq_ms == pytest.approx(OVERHEAD.per_seq_ms, abs=1e-4)
    assert m.prefill_base_ms == pytest.approx(OVERHEAD.prefill_base_ms, abs=1e-3)
    assert m.prefill_kernel_scale == pytest.approx(OVERHEAD.prefill_kernel_scale, abs=1e-4)
    assert res.power["idle_fraction"] == pytest.approx(IDLE_FRACTION_OF_TDP, abs=1e-3)
    assert res.power["busy_fraction"] == pytest.approx(BUSY_FRACTION_OF_TDP, abs=1e-3)
    assert GPUS["a100"].idle_w == pytest.approx(res.power["idle_w"], abs=0.5)


def test_fit_errors_within_bounds(res):
    assert len(res.table) == 2 * 57
    assert int(res.table["excluded"].sum()) == 1  # the TP2 batch-64 prefill
    assert res.mean_abs_pct("decode") < DECODE_MAPE_BOUND
    assert res.mean_abs_pct("prefill") < PREFILL_MAPE_BOUND
    # the uncalibrated kernel sum is much worse for decode: the overhead term earns its place
    t = res.table[(res.table.phase == "decode") & ~res.table.excluded]
    raw = float(np.mean(np.abs(t.kernel_ms - t.measured_ms) / t.measured_ms) * 100)
    assert raw > 5 * res.mean_abs_pct("decode")
    assert res.power["mean_abs_pct"] < POWER_MAPE_BOUND


def test_calibrated_decode_step_matches_measured_a100_serving(db):
    # Measured (profiles/data/calibration, batch 1, prompt 512, 128 out): 54.9 / 45.0 / 44.9 ms.
    for tp, measured in ((2, 54.86), (4, 44.99), (8, 44.85)):
        ms = db.model_step_latency("a100", "llama-2-70b", 1, 576, 1, tp, "decode", calibrated=True)
        assert ms == pytest.approx(measured, rel=0.08), tp
    # The kernel sum alone is 53 / 28 / 19 ms: the floor binds at TP4 and TP8.
    assert db.model_step_latency("a100", "llama-2-70b", 1, 576, 1, 8) < 25


def test_overhead_is_step_minus_kernels_and_carries_through_kernels(db):
    kw = dict(tokens=8, context=1000, batch=8, tp=2, phase="decode")
    for gpu in ("a100", "h100", "h200"):
        k = db.model_step_latency(gpu, "llama-2-70b", **kw)
        c = db.model_step_latency(gpu, "llama-2-70b", calibrated=True, **kw)
        ov = db.iteration_overhead_ms(gpu, "llama-2-70b", 2, 8, 8, "decode", context=1000)
        assert c - k == pytest.approx(ov, rel=1e-9)
        # Same constants everywhere: step = max(kernel, floor) + base + per_seq * batch.
        assert c == pytest.approx(max(k, OVERHEAD.floor_ms_per_layer * 80) + OVERHEAD.base_ms
                                  + OVERHEAD.per_seq_ms * 8, rel=1e-9)
    # Faster kernels on H100 leave the floor binding: the overhead share grows.
    a = db.iteration_overhead_ms("a100", "llama-2-70b", 2, 8, 8, "decode", context=1000)
    h = db.iteration_overhead_ms("h100", "llama-2-70b", 2, 8, 8, "decode", context=1000)
    assert h > a
    # Prefill: relative term on the kernel time.
    k = db.model_step_latency("h100", "llama-2-7b", 2048, 0, 1, 1, "prefill")
    c = db.model_step_latency("h100", "llama-2-7b", 2048, 0, 1, 1, "prefill", calibrated=True)
    assert c == pytest.approx(max(k, OVERHEAD.floor_ms_per_layer * 32) + OVERHEAD.prefill_base_ms
                              + OVERHEAD.prefill_kernel_scale * k, rel=1e-9)


def test_vectorised_calibrated_step(db):
    tok = np.array([0.0, 1.0, 16.0, 64.0])
    v = db.model_step_latency_vec("a100", "llama-2-70b", tok, np.full(4, 600.0), np.maximum(tok, 1), 4,
                                  "decode", calibrated=True)
    assert v[0] == 0.0
    for i in range(1, 4):
        assert v[i] == pytest.approx(db.model_step_latency("a100", "llama-2-70b", tok[i], 600, tok[i], 4, "decode",
                                                           calibrated=True), rel=1e-9)
