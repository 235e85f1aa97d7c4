"""The operator profiler: CLI, row schema, hand-computed memory, timing statistics, and
loading its CSV through ProfileDB."""
from __future__ import annotations

import csv
import importlib.util
import time

import pytest
import torch

from runtime.models import get_model
from runtime.profile import (
    EXTRA_COLUMNS,
    OPS,
    SCHEMA,
    OpTimer,
    ProfileConfig,
    _Bench,
    _percentile,
    gpu_short_name,
    main,
    profile_model,
)

TINY = get_model("tiny")  # d=64, H=4, KV=2, hd=16, d_ff=172, V=256, max_seq_len=512


@pytest.fixture(scope="module")
def quick_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "p.csv"
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # one thread: on a shared 2-core machine multi-threaded kernels stall for whole time slices
    rc = main(["--model", "tiny", "--device", "cpu", "--out", str(out), "--quick", "-q", "--threads", "1"])
    assert torch.get_num_threads() == threads  # restored for the rest of the process
    elapsed = time.perf_counter() - t0
    assert rc == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0].keys())
    return out, header, rows, elapsed


def test_quick_cli_writes_project_schema(quick_csv):
    _, header, rows, elapsed = quick_csv
    assert elapsed < 60
    assert header[: len(SCHEMA)] == list(SCHEMA)
    assert header[len(SCHEMA):] == list(EXTRA_COLUMNS)
    # quick grid: 12 token-wise ops x 6 token counts + 3 prefill lengths + 3 batches x 2 KV lengths
    assert len(rows) == 12 * 6 + 3 + 3 * 2
    assert {r["op"] for r in rows} == set(OPS)
    for r in rows:
        assert (r["gpu"], r["model"], r["tp"], r["source"], r["dtype"]) == ("cpu", "tiny", "1", "opscale-profiler", "float32")
        assert r["torch_version"] == torch.__version__ and r["device_name"]
        lo, med, p90, hi = (float(r[k]) for k in ("latency_ms_min", "latency_ms_median", "latency_ms_p90", "latency_ms_max"))
        assert 0 < lo <= med <= p90 <= hi, r
        assert r["power_w"] == ""  # no NVML on CPU
        assert r["memory_method"] == "analytic" and r["threads"] == "1"
        assert int(r["memory_bytes"]) == int(r["weight_bytes"]) + int(r["activation_bytes"])


def _row(rows, op, tokens, context="", batch=""):
    hits = [r for r in rows if r["op"] == op and r["tokens"] == str(tokens)
            and r["context"] == str(context) and r["batch"] == str(batch)]
    assert len(hits) == 1, (op, tokens, context, batch)
    return hits[0]


def test_memory_counts_hand_computed(quick_csv):
    _, _, rows, _ = quick_csv
    f32 = 4
    # fused gate+up GEMM, 4 tokens: W[344, 64]; in [4, 64]; out [4, 344]
    r = _row(rows, "mlp_up_proj", 4)
    assert int(r["weight_bytes"]) == 2 * 172 * 64 * f32 == 88064
    assert int(r["activation_bytes"]) == (4 * 64 + 4 * 344) * f32
    # fused QKV: (4 + 2*2) heads x 16 = 128 output columns
    r = _row(rows, "attn_pre_proj", 16)
    assert int(r["weight_bytes"]) == 128 * 64 * f32
    assert int(r["activation_bytes"]) == (16 * 64 + 16 * 128) * f32
    # decode: 4 sequences x 128 cached tokens x 2 KV heads x 16 x (K and V)
    r = _row(rows, "attn_decode", 4, context=128, batch=4)
    assert int(r["kv_bytes"]) == 4 * 128 * 2 * 16 * 2 * f32
    q_and_out = 2 * 4 * 4 * 16 * f32
    lengths = 4 * 8
    assert int(r["activation_bytes"]) == int(r["kv_bytes"]) + q_and_out + lengths
    # prefill of one 256-token sequence
    r = _row(rows, "attn_prefill", 256, context=256, batch=1)
    assert int(r["kv_bytes"]) == 256 * 2 * 16 * 2 * f32
    # sampling: one token per sequence, batch = rows of logits
    r = _row(rows, "sampling", 16, batch=16)
    assert int(r["activation_bytes"]) == 16 * 256 * f32 + 16 * 8


def test_bigger_gemm_takes_longer(quick_csv):
    _, _, rows, _ = quick_csv
    small = float(_row(rows, "mlp_up_proj", 1)["latency_ms_median"])
    big = float(_row(rows, "mlp_up_proj", 1024)["latency_ms_median"])
    assert big > 3 * small  # 1024x the FLOPs


def test_csv_loads_into_profiledb(quick_csv):
    if importlib.util.find_spec("profiles.db") is None:
        pytest.skip("profiles/db.py is not in this tree yet")
    from profiles import ProfileDB

    path, _, rows, _ = quick_csv
    db = ProfileDB.load(paths=[path])
    r = _row(rows, "mlp_down_proj", 64)
    assert db.latency("mlp_down_proj", "cpu", "tiny", tokens=64) == pytest.approx(float(r["latency_ms_median"]), rel=1e-4)
    est = db.estimate("attn_pre_proj", "cpu", "tiny", tokens=100)
    assert est.source == "interpolated"
    lo = float(_row(rows, "attn_pre_proj", 64)["latency_ms_median"])
    hi = float(_row(rows, "attn_pre_proj", 256)["latency_ms_median"])
    assert min(lo, hi) <= est.ms <= max(lo, hi)


def test_timer_counts_calls_and_measures_sleep():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    times = OpTimer(torch.device("cpu"), warmup=2, repeats=5)(fn)
    assert len(calls) == 7 and len(times) == 5
    assert all(t >= 2.0 for t in times)  # ms
    assert sorted(times)[2] < 50.0


def test_percentile_and_gpu_names():
    xs = [float(i) for i in range(1, 11)]
    assert _percentile(xs, 90) == pytest.approx(9.1)
    assert _percentile(xs, 50) == pytest.approx(5.5)
    assert _percentile([3.0], 90) == 3.0
    assert gpu_short_name("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_short_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_short_name("NVIDIA A40") == "a40"
    assert gpu_short_name("NVIDIA H200") == "h200"
    assert gpu_short_name("NVIDIA L40S") == "l40s"
    assert gpu_short_name("Tesla Foo 9") == "tesla-foo-9"


def test_bench_allocates_one_layer_only():
    cfg = get_model("small")  # 4 layers
    bench = _Bench(cfg, torch.device("cpu"), torch.float32, seed=0)
    params = sum(p.numel() for m in (bench.layer, bench.embed, bench.head) for p in m.parameters())
    per_layer = (cfg.group_params("attn") + cfg.group_params("proj") + cfg.group_params("mlp")) // cfg.n_layers
    assert params == per_layer + 2 * cfg.vocab_size * cfg.d_model


def test_default_grid_is_clipped_to_the_model_and_explicit_contexts_are_checked(tmp_path, capsys):
    pc = ProfileConfig(ops=("attn_prefill",), repeats=1, warmup=0)
    rows = profile_model(pc)
    assert [r["context"] for r in rows] == [128, 256, 512]  # tiny's max_seq_len is 512
    rc = main(["--model", "tiny", "--out", str(tmp_path / "x.csv"), "--decode-contexts", "128,1024", "-q"])
    assert rc == 2
    assert "contexts [1024] exceed tiny's max_seq_len 512" in capsys.readouterr().err
    rc = main(["--model", "tiny", "--out", str(tmp_path / "x.csv"), "--ops", "attn_decode,softmax", "-q"])
    assert rc == 2
    assert "unknown ops ['softmax']" in capsys.readouterr().err
    rc = main(["--model", "llama-5", "--out", str(tmp_path / "x.csv")])
    assert rc == 2
    assert "unknown model 'llama-5'" in capsys.readouterr().err


def test_subset_and_custom_grid(tmp_path):
    out = tmp_path / "sub.csv"
    rc = main(["--model", "small", "--out", str(out), "--ops", "attn_decode,add", "--tokens", "2,8",
               "--decode-contexts", "64", "--decode-batches", "1,3", "--repeats", "3", "--warmup", "1", "-q"])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    got = sorted((r["op"], r["tokens"], r["context"], r["batch"]) for r in rows)
    assert got == [("add", "2", "", ""), ("add", "8", "", ""),
                   ("attn_decode", "1", "64", "1"), ("attn_decode", "3", "64", "3")]
    assert all(r["repeats"] == "3" and r["model"] == "small" for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="torch.cuda.is_available\\(\\) is False"):
        profile_model(ProfileConfig.quick(device="cuda"))


@pytest.mark.gpu
def test_cuda_quick_profile_measures_memory_and_power(tmp_path):
    out = tmp_path / "gpu.csv"
    assert main(["--model", "tiny", "--device", "cuda", "--out", str(out), "--quick", "-q"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert all(r["memory_method"] == "cuda_max_memory_allocated" for r in rows)
    assert all(r["dtype"] == "float16" for r in rows)
    assert all(int(r["memory_bytes"]) >= int(r["weight_bytes"]) for r in rows)
    powered = [float(r["power_w"]) for r in rows if r["power_w"]]
    if powered:  # NVML present
        assert all(10 < w < 2000 for w in powered)
