"""ProfileDB: shipped measurements reproduced, interpolation, errors, roofline, groups, network, power."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from profiles import GPUS, ProfileDB, ProfileError
from profiles.convert import convert_compute_file
from profiles.paths import OPERATORS_CSV, VIDUR
from profiles.schema import COLUMNS, read_profile_csv

RAW_H100_7B = VIDUR / "compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv.gz"


@pytest.fixture(scope="module")
def db() -> ProfileDB:
    return ProfileDB.load()


@pytest.fixture(scope="module")
def strict_db() -> ProfileDB:
    return ProfileDB.load(strict=True)


@pytest.fixture(scope="module")
def raw_up() -> pd.DataFrame:
    """Raw Vidur mlp_up_proj medians for H100 Llama-2-7B, repeats averaged (the documented rule)."""
    raw = pd.read_csv(RAW_H100_7B)
    g = raw.groupby(["num_tensor_parallel_workers", "num_tokens"])["time_stats.mlp_up_proj.median"]
    # first() for single measurements keeps the file's number bit for bit.
    med = g.first().where(g.size() == 1, g.mean())
    return pd.DataFrame({"median": med, "n": g.size()}).reset_index()


def test_grid_points_reproduce_shipped_medians_exactly(db, raw_up):
    assert len(raw_up) == 4 * 259
    for r in raw_up.itertuples():
        est = db.estimate("mlp_up_proj", "h100", "llama-2-7b", int(r.num_tokens), tp=int(r.num_tensor_parallel_workers))
        assert est.source == "measured"
        if r.n == 1:
            assert est.ms == r.median, (r.num_tokens, r.num_tensor_parallel_workers)
        else:
            assert est.ms == pytest.approx(r.median, rel=1e-9)
    # A point measured once keeps the file's number itself (README example: 0.064 ms at 1 token).
    assert db.latency("mlp_up_proj", "h100", "llama-2-7b", 1) == 0.064
    # A point measured twice (2048 tokens, TP1) gives the mean of the two medians.
    raw = pd.read_csv(RAW_H100_7B)
    two = raw[(raw.num_tokens == 2048) & (raw.num_tensor_parallel_workers == 1)]["time_stats.mlp_up_proj.median"]
    assert len(two) == 2
    assert db.latency("mlp_up_proj", "h100", "llama-2-7b", 2048) == pytest.approx(two.mean(), abs=1e-12)


def test_off_grid_within_5pct_of_neighbour_interpolation(db, raw_up):
    for tp, g in raw_up.groupby("num_tensor_parallel_workers"):
        x = g["num_tokens"].to_numpy(float)
        y = g["median"].to_numpy()
        for i in range(0, len(x) - 1, 7):
            for frac in (0.25, 0.5, 0.8):
                t = x[i] + frac * (x[i + 1] - x[i])
                if t == int(t) and t in x:
                    continue
                expect = y[i] + frac * (y[i + 1] - y[i])
                est = db.estimate("mlp_up_proj", "h100", "llama-2-7b", t, tp=int(tp))
                assert est.source == "interpolated"
                assert abs(est.ms - expect) <= 0.05 * expect, (tp, t, est.ms, expect)


def test_unknown_gpu_model_op_name_the_value_and_the_choices(db):
    with pytest.raises(ProfileError, match=r"unknown gpu 'v100'.*a100.*h100.*h200"):
        db.latency("mlp_up_proj", "v100", "llama-2-7b", 8)
    with pytest.raises(ProfileError, match=r"unknown model 'llama-9b'.*llama-2-7b"):
        db.latency("mlp_up_proj", "h100", "llama-9b", 8)
    with pytest.raises(ProfileError, match=r"unknown op 'mlp_gate'.*mlp_up_proj"):
        db.latency("mlp_gate", "h100", "llama-2-7b", 8)
    with pytest.raises(ProfileError, match=r"unknown group 'ffn'"):
        db.group_latency("ffn", "h100", "llama-2-7b", 8)
    with pytest.raises(ProfileError, match=r"tp=3 is not supported"):
        db.latency("mlp_up_proj", "h100", "llama-2-7b", 8, tp=3)
    with pytest.raises(ProfileError, match=r"tp=16 is not supported.*tp <= 8"):
        db.all_reduce_ms("h100", 1 << 20, 16)
    with pytest.raises(ProfileError, match=r"unknown gpu 'b200'"):
        db.gpu("b200")
    # 'tiny' is a known model shape, but nothing is profiled for it.
    with pytest.raises(ProfileError, match=r"no profile of model 'tiny'.*models profiled on h100: .*llama-2-7b"):
        db.latency("mlp_up_proj", "h100", "tiny", 8)


def test_tokens_beyond_grid_strict_raises_default_extrapolates_with_flag(strict_db):
    with pytest.raises(ProfileError, match=r"tokens=8192 outside the measured grid 1..4096"):
        strict_db.latency("mlp_up_proj", "h100", "llama-2-7b", 8192)
    with pytest.raises(ProfileError, match="strict=True"):
        strict_db.latency_vec("mlp_up_proj", "h100", "llama-2-7b", np.array([8.0, 5000.0]))
    with pytest.raises(ProfileError, match="strict=True"):
        strict_db.group_latency("mlp", "h100", "llama-2-7b", 5000, 0, 1, 1, "prefill")
    fresh = ProfileDB.load(measured_dir=None)
    at_max = fresh.latency("mlp_up_proj", "h100", "llama-2-7b", 4096)
    with pytest.warns(UserWarning, match="outside the measured grid"):
        est = fresh.estimate("mlp_up_proj", "h100", "llama-2-7b", 8192, tp=1)
    assert est.source == "extrapolated"
    assert est.ms == pytest.approx(2 * at_max)  # compute-bound: time in proportion to tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per key, not on every call
        fresh.latency("mlp_up_proj", "h100", "llama-2-7b", 6000)
    assert fresh.flags[("extrapolated", "h100", "llama-2-7b", "mlp_up_proj", 1)] == 2
    with pytest.raises(ProfileError, match=r"unknown phase 'generate'"):
        fresh.group_latency("mlp", "h100", "llama-2-7b", 8, phase="generate")
    with pytest.raises(ProfileError, match=r"tokens must be >= 1, got 0"):
        fresh.latency("mlp_up_proj", "h100", "llama-2-7b", 0)


def test_tp_not_profiled_is_extrapolated_or_refused(db, strict_db):
    # phi-2 was profiled at TP1 only.
    t1 = db.latency("mlp_up_proj", "a100", "phi-2", 512, tp=1)
    with pytest.warns(UserWarning, match="tp=2 not profiled"):
        est = db.estimate("mlp_up_proj", "a100", "phi-2", 512, tp=2)
    assert est.source == "extrapolated" and est.ms == pytest.approx(t1 / 2)
    with pytest.raises(ProfileError, match="tp=2 not profiled"):
        strict_db.latency("mlp_up_proj", "a100", "phi-2", 512, tp=2)


def test_attention_roofline_matches_hand_computation(db):
    floor = db.launch_floor_ms("h100")
    assert floor == 0.003  # median attn_rope at 1 token over the H100 files
    # Decode, Llama-2-7B (32 KV heads x 128), 8 sequences at 1000 tokens, fp16, TP1:
    # 8 * 1000 * 2 (K,V) * 32 * 128 * 2 bytes = 131,072,000 bytes / 3.0e12 B/s = 0.043690667 ms.
    est = db.estimate("attn_decode", "h100", "llama-2-7b", tokens=8, context=1000, batch=8)
    assert est.source == "roofline"
    assert est.ms == pytest.approx(131_072_000 / 3.0e12 * 1e3 + 0.003, rel=1e-12)
    # Prefill, Llama-2-70B on A100 TP4, 2 prompts of 1024 tokens:
    # flops = 2 * (64/4 heads) * 128 * 2 * 1024 * 1025 = 8,598,323,200;
    # A100 rate = 312e12 * 798/989 = 2.517452e14 FLOP/s -> 0.034155 ms, + floor 0.004 ms.
    est = db.estimate("attn_prefill", "a100", "llama-2-70b", tokens=2048, context=1024, batch=2, tp=4)
    rate = 312e12 * 798e12 / 989e12
    assert est.ms == pytest.approx(8_598_323_200 / rate * 1e3 + 0.004, rel=1e-12)
    # context=0 in prefill means tokens / batch.
    assert db.latency("attn_prefill", "a100", "llama-2-70b", 2048, 0, 2, 4) == est.ms
    # Decode time grows linearly in context once bandwidth-bound.
    a = db.latency("attn_decode", "h100", "llama-2-70b", 16, 2000, 16) - floor
    b = db.latency("attn_decode", "h100", "llama-2-70b", 16, 4000, 16) - floor
    assert b == pytest.approx(2 * a)


def test_lm_head_derived_from_measured_gemm_curve(db):
    up = db.latency("mlp_up_proj", "h100", "llama-2-7b", 64)
    est = db.estimate("lm_head", "h100", "llama-2-7b", 64)
    # lm_head weight 32000 x 4096 vs fused gate+up 2 x 11008 x 4096.
    assert est.source == "derived"
    assert est.ms == pytest.approx(up * 32000 / (2 * 11008))


def test_group_latency_is_the_sum_of_its_ops(db):
    L, tok, ctx, tp = 32, 64, 500, 2
    ops = ["post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add", "add"]
    per_layer = sum(db.latency(o, "h100", "llama-2-7b", tok, tp=tp) for o in ops)
    per_layer += db.all_reduce_ms("h100", tok * 4096 * 2, tp)
    assert db.group_latency("mlp", "h100", "llama-2-7b", tok, ctx, tok, tp) == pytest.approx(L * per_layer, rel=1e-12)
    attn = L * (db.latency("input_layernorm", "h100", "llama-2-7b", tok, tp=tp)
                + db.latency("attn_rope", "h100", "llama-2-7b", tok, tp=tp)
                + db.latency("attn_decode", "h100", "llama-2-7b", tok, ctx, tok, tp))
    assert db.group_latency("attn", "h100", "llama-2-7b", tok, ctx, tok, tp) == pytest.approx(attn, rel=1e-12)
    # Prefill: 4 prompts of 256 tokens; the head sees one row per prompt.
    head = (db.latency("input_layernorm", "h100", "llama-2-7b", 1024, tp=1)
            + db.latency("lm_head", "h100", "llama-2-7b", 4) + db.latency("sampling", "h100", "llama-2-7b", 4, 0, 4))
    assert db.group_latency("head", "h100", "llama-2-7b", 1024, 0, 4, 1, "prefill") == pytest.approx(head, rel=1e-12)
    total = sum(db.group_latency(g, "h100", "llama-2-7b", tok, ctx, tok, tp) for g in
                ("embed", "attn", "proj", "mlp", "head"))
    assert db.model_step_latency("h100", "llama-2-7b", tok, ctx, tok, tp) == pytest.approx(total, rel=1e-12)


def test_vectorised_equals_scalar(db):
    tokens = np.array([0.0, 1.0, 7.0, 64.0, 300.0, 4096.0])
    ctx = np.array([0.0, 100.0, 900.0, 2000.0, 50.0, 10.0])
    batch = np.maximum(tokens, 1)
    for phase in ("decode", "prefill"):
        for g in ("embed", "attn", "proj", "mlp", "head"):
            v = db.group_latency_vec(g, "a100", "llama-2-70b", tokens, ctx, batch, 4, phase)
            s = [0.0 if t == 0 else db.group_latency(g, "a100", "llama-2-70b", t, c, b, 4, phase)
                 for t, c, b in zip(tokens, ctx, batch)]
            np.testing.assert_allclose(v, s, rtol=1e-12)
            assert v[0] == 0.0


def test_network_profiles(db):
    n = pd.read_csv(OPERATORS_CSV.parent / "network.csv.gz")
    row = n[(n.node == "h100_dgx") & (n.collective == "all_reduce") & (n.num_workers == 2)
            & (n.devices_per_node == 2) & (n.nbytes == 501760)].iloc[0]
    assert db.all_reduce_ms("h100", 501760, 2) == pytest.approx(row.latency_ms_median, rel=1e-9)
    assert db.all_reduce_ms("h100", 501760, 1) == 0.0
    # Between sizes: log-log interpolation stays between the neighbours.
    lo, hi = db.all_reduce_ms("a100", 2048, 8), db.all_reduce_ms("a100", 10240, 8)
    assert min(lo, hi) <= db.all_reduce_ms("a100", 6000, 8) <= max(lo, hi)
    # Across nodes is slower than NVLink within one for a 64 MiB activation.
    assert db.send_recv_ms("h100", 1 << 26, same_node=False) > 5 * db.send_recv_ms("h100", 1 << 26)
    # A40 has no all-reduce profile: ring estimate from its send/recv, 2 (tp-1) steps of nbytes/tp.
    assert db.all_reduce_ms("a40", 1 << 20, 2) == pytest.approx(2 * db.send_recv_ms("a40", (1 << 20) / 2))


def test_memory_counts_weights_activations_and_kv(db):
    # attn group, Llama-2-70B TP8, 4 sequences at 1000 tokens, decode (4 tokens):
    # weights 80 * 8192 (norms) * 2 B / 8; input 4*8192*2; largest activation = input size;
    # KV 4 * 1000 * 2 * (8/8) * 128 * 2 B * 80 layers.
    w = 80 * 8192 * 2 / 8
    act = 4 * 8192 * 2
    kv = 4 * 1000 * 2 * 1 * 128 * 2 * 80
    assert db.memory("attn", "h100", "llama-2-70b", 4, 1000, 4, 8) == pytest.approx(w + 2 * act + kv)
    # one op: the fused gate+up GEMM weights of one layer at TP2 + input + 2*d_ff output.
    m = db.memory("mlp_up_proj", "h100", "llama-2-7b", 16, tp=2)
    assert m == pytest.approx(2 * 4096 * 11008 / 2 * 2 + 16 * 4096 * 2 + 16 * 2 * 11008 / 2 * 2)
    # mlp group, Llama-2-70B TP8, 1 token: 80 x (3 x 8192 x 28672 + 8192) x 2 B / 8 (~1.4 GB/layer
    # unsharded, 112.7 GB in all) + input + largest activation (gate+up output, 2 x 28672 / 8 wide).
    want = 80 * (3 * 8192 * 28672 + 8192) * 2 / 8 + 8192 * 2 + 2 * 28672 / 8 * 2
    assert db.memory("mlp", "h100", "llama-2-70b", 1, tp=8) == pytest.approx(want)


def test_gpu_specs_and_power(db):
    h100 = db.gpu("h100")
    assert h100.memory_bytes == 80_000_000_000 and h100.hbm_bw == 3.0e12 and h100.matmul_flops == 798e12
    assert db.gpu("h200").memory_bytes == 141_000_000_000 and db.gpu("a40").memory_bytes == 48_000_000_000
    for g in GPUS.values():
        assert 0 < g.idle_w < g.peak_w <= g.tdp_w
        assert set(g.sources) >= {"memory_bytes", "hbm_bw_bytes_per_s", "matmul_flops", "idle_w", "peak_w", "tdp_w"}
        assert db.power_w(g.name, 0.0) == pytest.approx(g.idle_w)
        assert db.power_w(g.name, 1.0) == pytest.approx(g.peak_w)
    a100 = db.gpu("a100")
    assert db.power_w("a100", 0.5) == pytest.approx((a100.idle_w + a100.peak_w) / 2)
    np.testing.assert_allclose(db.power_w("a100", np.array([0.0, 1.0])), [a100.idle_w, a100.peak_w])
    with pytest.raises(ProfileError, match=r"utilisation must lie in \[0, 1\], got 1.5"):
        db.power_w("a100", 1.5)


def test_other_gpu_or_model_is_derived_by_roofline_ratio(db):
    # H200 has no profile: H100 curve x roofline ratio; memory-bound GEMMs get faster.
    h100 = db.latency("mlp_up_proj", "h100", "llama-2-70b", 1, tp=1)
    est = db.estimate("mlp_up_proj", "h200", "llama-2-70b", 1, tp=1)
    assert est.source == "derived"
    assert h100 * 3.0 / 4.3 < est.ms < h100
    # Llama-3-8B was profiled on A100 only.
    assert db.estimate("mlp_down_proj", "h100", "llama-3-8b", 64).source == "derived"


def test_measured_attention_rows_replace_the_roofline(tmp_path: Path):
    row = {c: "" for c in COLUMNS}
    row.update(gpu="h100", model="llama-2-7b", op="attn_decode", tokens=8, context=1000, batch=8, tp=1,
               latency_ms_median=0.1, source="opscale-profiler", dtype="bf16")
    p = tmp_path / "attn.csv"
    pd.DataFrame([row])[list(COLUMNS)].to_csv(p, index=False)
    db2 = ProfileDB.load([p], measured_dir=None)
    est = db2.estimate("attn_decode", "h100", "llama-2-7b", 8, 1000, 8)
    assert est.source == "measured" and est.ms == pytest.approx(0.1)
    # Elsewhere the roofline is scaled by the measured/roofline ratio (0.1 / 0.046690667).
    roof = ProfileDB.load(measured_dir=None).latency("attn_decode", "h100", "llama-2-7b", 16, 1000, 16)
    est2 = db2.estimate("attn_decode", "h100", "llama-2-7b", 16, 1000, 16)
    assert est2.source == "interpolated"
    assert est2.ms == pytest.approx(roof * 0.1 / (131_072_000 / 3.0e12 * 1e3 + 0.003))


def test_profile_csv_errors_name_file_line_column_value(tmp_path: Path):
    row = {c: "" for c in COLUMNS}
    row.update(gpu="h100", model="llama-2-7b", op="mlp_up_proj", tokens=8, tp=1, latency_ms_median=0.1,
               source="opscale-profiler")
    good = pd.DataFrame([row, dict(row, tokens=16)])[list(COLUMNS)]
    bad = good.copy()
    bad.loc[1, "tp"] = 3
    p = tmp_path / "bad.csv"
    bad.to_csv(p, index=False)
    with pytest.raises(ProfileError, match=r"bad.csv: line 3, column 'tp': value 3.* must be one of"):
        read_profile_csv(p)
    bad = good.copy()
    bad.loc[0, "op"] = "mlp_gate"
    bad.to_csv(p, index=False)
    with pytest.raises(ProfileError, match=r"line 2, column 'op': value 'mlp_gate' is unknown"):
        read_profile_csv(p)
    good.drop(columns=["latency_ms_median"]).to_csv(p, index=False)
    with pytest.raises(ProfileError, match=r"missing columns \['latency_ms_median'\]"):
        read_profile_csv(p)


def test_shipped_conversion_is_reproducible():
    conv, notes = convert_compute_file(RAW_H100_7B, "h100", "llama-2-7b")
    shipped = read_profile_csv(OPERATORS_CSV)
    shipped = shipped[(shipped.gpu == "h100") & (shipped.model == "llama-2-7b")]
    key = ["op", "tp", "tokens"]
    a = conv.sort_values(key).reset_index(drop=True)
    b = shipped.sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == 10 * 4 * 259
    np.testing.assert_allclose(a["latency_ms_median"], b["latency_ms_median"], rtol=1e-8)
    assert any("32768" in n for n in notes)  # Vidur's padded vocabulary is reported


def test_device_without_spec_answers_from_its_own_rows(tmp_path: Path):
    # A profiler run on a CPU: token ops and measured attention, no GPUSpec for "cpu".
    rows = []
    base = {c: "" for c in COLUMNS}
    for op in ("input_layernorm", "attn_rope"):
        for t, ms in ((1, 0.01), (64, 0.03)):
            rows.append(dict(base, gpu="cpu", model="tiny", op=op, tokens=t, tp=1, latency_ms_median=ms,
                             source="opscale-profiler"))
    for b, c, ms in ((1, 128, 0.02), (16, 512, 0.2)):
        rows.append(dict(base, gpu="cpu", model="tiny", op="attn_decode", tokens=b, context=c, batch=b, tp=1,
                         latency_ms_median=ms, source="opscale-profiler"))
    p = tmp_path / "cpu.csv"
    pd.DataFrame(rows)[list(COLUMNS)].to_csv(p, index=False)
    db2 = ProfileDB.load([p], include_shipped=False, measured_dir=None)
    assert db2.estimate("attn_decode", "cpu", "tiny", 16, 512, 16) == (0.2, "measured", "roofline x measured correction")
    # group = layers x (norm + rope + attention), each from the CPU rows.
    want = 2 * (0.03 + 0.03 + 0.2)
    assert db2.group_latency("attn", "cpu", "tiny", 64, 512, 16) == pytest.approx(want)
    with pytest.raises(ProfileError, match=r"unknown gpu 'cpu'; GPUs with a spec"):
        db2.gpu("cpu")
