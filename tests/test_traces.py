"""traces/: the shipped Azure 2023 traces, the Trace operations and the CSV schemas."""
import pickle

import numpy as np
import pytest

from traces import Trace, TraceError, load_trace


def small(arrival, prompt=None, output=None, **kw):
    n = len(arrival)
    return Trace(np.asarray(arrival, float),
                 np.arange(1, n + 1) * 10 if prompt is None else prompt,
                 np.arange(1, n + 1) if output is None else output, **kw)


# --------------------------------------------------------------- shipped traces
def test_shipped_counts():
    assert len(load_trace("azure-conv")) == 19_366
    assert len(load_trace("azure-code")) == 8_819
    assert len(load_trace("azure")) == 19_366 + 8_819


def test_first_rows_parsed_from_timestamps():
    # 18:15:46.6805900 -> 18:15:50.9951690 = 4.314579 s, -> 18:15:51.2224670 = 4.541877 s
    tr = load_trace("azure-conv")
    np.testing.assert_allclose(tr.arrival_s[:4], [0.0, 4.314579, 4.541877, 4.710427], atol=1e-9)
    assert tr.prompt_tokens[:4].tolist() == [374, 396, 879, 91]
    assert tr.output_tokens[:4].tolist() == [44, 109, 55, 16]
    # last row 19:14:08.4025270 -> span 58 min 21.721937 s
    assert tr.duration_s == pytest.approx(3501.721937, abs=1e-6)
    assert tr.num_images.tolist() == [0] * len(tr) and not tr.generated
    assert set(tr.service) == {"conv"}


@pytest.mark.parametrize("name, row", [
    # README table of shared/traces: requests, span, mean req/s, busiest second,
    # req/min min (non-empty minutes)..max, prompt mean/p50/p99, output mean/p50/p99
    ("azure-conv", (19366, 3502, 5.53, 16, 37, 507, 1155, 1020, 4142, 211, 129, 601)),
    ("azure-code", (8819, 3436, 2.57, 67, 15, 632, 2048, 1469, 7436, 28, 13, 251)),
])
def test_stats_match_readme_table(name, row):
    s = load_trace(name).stats()
    got = (s["requests"], round(s["duration_s"]), round(s["mean_rate_per_s"], 2), s["peak_per_s"],
           s["min_per_min_nonempty"], s["peak_per_min"], round(s["prompt_mean"]), round(s["prompt_p50"]),
           round(s["prompt_p99"]), round(s["output_mean"]), round(s["output_p50"]), round(s["output_p99"]))
    assert got == row


def test_code_trace_has_empty_minutes():
    # azure-code is bursty: 12 of its 58 minutes see no request at all.
    assert load_trace("azure-code").stats()["empty_minutes"] == 12


def test_azure_merges_both_services_by_wall_clock():
    az, conv, code = load_trace("azure"), load_trace("azure-conv"), load_trace("azure-code")
    assert az.name == "azure"
    assert np.all(np.diff(az.arrival_s) >= 0)
    assert {k: int(v) for k, v in zip(*np.unique(az.service, return_counts=True))} == {"conv": 19366, "code": 8819}
    # conv starts first (18:15:46.68059); code's first request is at 18:17:03.97996.
    is_code = az.service == "code"
    np.testing.assert_allclose(az.arrival_s[~is_code], conv.arrival_s, atol=1e-9)
    np.testing.assert_allclose(az.arrival_s[is_code], code.arrival_s + 77.29937, atol=1e-6)
    assert az.prompt_tokens[is_code].tolist() == code.prompt_tokens.tolist()
    assert az.output_tokens[~is_code].tolist() == conv.output_tokens.tolist()
    # ends with code's last request, 19:14:19.928016
    assert az.duration_s == pytest.approx(3513.247426, abs=1e-6)


def test_loaded_traces_are_cached_and_read_only():
    a, b = load_trace("azure-conv"), load_trace("azure-conv")
    assert a is b
    with pytest.raises(ValueError, match="read-only"):
        a.prompt_tokens[0] = 1
    with pytest.raises(ValueError, match="read-only"):
        load_trace("azure").arrival_s[0] = 5.0
    back = pickle.loads(pickle.dumps(load_trace("azure")))     # e.g. into a SubprocVecEnv worker
    assert back.name == "azure" and len(back) == 28_185 and back.service[-1] in ("conv", "code")
    with pytest.raises(ValueError, match="read-only"):
        back.output_tokens[0] = 1


# --------------------------------------------------------------- operations
def test_scale_rate_x2_halves_span_and_keeps_tokens():
    tr = load_trace("azure-conv")
    fast = tr.scale_rate(2)
    assert fast.duration_s == pytest.approx(tr.duration_s / 2)
    np.testing.assert_allclose(fast.arrival_s, tr.arrival_s / 2)
    assert np.array_equal(fast.prompt_tokens, tr.prompt_tokens)
    assert np.array_equal(fast.output_tokens, tr.output_tokens)
    assert fast.mean_rate_per_s == pytest.approx(2 * tr.mean_rate_per_s)
    assert fast.name == "azure-conv x2"
    with pytest.raises(ValueError, match="k=0"):
        tr.scale_rate(0)


def test_window_rebases_and_counts():
    tr = small([0.0, 0.5, 1.0, 2.9, 3.0])
    w = tr.window(0.5, 2.9)                   # [0.5, 2.9): 0.5 and 1.0
    np.testing.assert_allclose(w.arrival_s, [0.0, 0.5])
    assert w.prompt_tokens.tolist() == [20, 30]
    assert w.duration_s == pytest.approx(2.4)
    tail = tr.window(2.0)                     # to the end, last arrival included
    np.testing.assert_allclose(tail.arrival_s, [0.9, 1.0])
    assert tail.duration_s == pytest.approx(1.0)
    with pytest.raises(ValueError, match="past the end"):
        tr.window(5.0, 6.0)
    with pytest.raises(ValueError, match="greater than t0"):
        tr.window(2.0, 1.0)


def test_split_is_disjoint_and_complete():
    tr = load_trace("azure-code")
    train, test = tr.split(0.7)
    cut = 0.7 * tr.duration_s
    assert train.duration_s == pytest.approx(cut)
    assert train.arrival_s.max() < cut
    assert test.arrival_s.min() >= 0.0                       # re-based at the cut
    assert len(train) + len(test) == len(tr)                 # no request lost or shared
    assert np.array_equal(np.concatenate([train.prompt_tokens, test.prompt_tokens]), tr.prompt_tokens)
    g_train, g_test = tr.split(0.5, gap_s=300.0)
    assert g_train.arrival_s.max() < 0.5 * tr.duration_s
    assert len(g_train) + len(g_test) == int(np.sum((tr.arrival_s < 0.5 * tr.duration_s)
                                                      | (tr.arrival_s >= 0.5 * tr.duration_s + 300)))
    with pytest.raises(ValueError, match="train_frac"):
        tr.split(1.0)


def test_rate_per_window_hand_computed():
    tr = small([0.0, 0.5, 1.0, 2.9, 3.0])     # duration 3.0 s
    assert tr.counts_per_window(1.0).tolist() == [2, 1, 2]   # 3.0 falls in the last window
    np.testing.assert_allclose(tr.rate_per_window(2.0), [3 / 2, 2 / 2])
    ws = tr.window_stats(2.0)
    assert ws["requests"].tolist() == [3, 2]
    assert ws["prompt_tokens_sum"].tolist() == [10 + 20 + 30, 40 + 50]
    assert ws["output_tokens_mean"].tolist() == [2.0, 4.5]
    assert ws["t1_s"].tolist() == [2.0, 3.0]


def test_stats_small_hand_computed():
    tr = small([0.0, 0.2, 0.4, 61.0, 130.0], prompt=[1, 2, 3, 4, 100], output=[5, 5, 5, 5, 5])
    s = tr.stats()
    assert s["requests"] == 5 and s["duration_s"] == 130.0
    assert s["mean_rate_per_s"] == pytest.approx(5 / 130)
    assert s["peak_per_s"] == 3 and s["peak_per_min"] == 3
    assert s["min_per_min_nonempty"] == 1 and s["empty_minutes"] == 0   # minutes 0, 1, 2
    assert s["prompt_mean"] == pytest.approx(22.0)
    assert s["prompt_p50"] == 3.0
    assert s["prompt_p99"] == pytest.approx(4 + 0.96 * 96)           # linear interpolation
    assert s["services"] is None and s["generated"] is False


def test_trace_rejects_bad_arrays():
    with pytest.raises(TraceError, match="not sorted"):
        small([1.0, 0.5])
    with pytest.raises(TraceError, match="negative value -1"):
        small([0.0, 1.0], prompt=[3, -1])
    with pytest.raises(TraceError, match=r"output_tokens has shape \(1,\)"):
        small([0.0, 1.0], output=[3])
    with pytest.raises(TraceError, match="duration_s=1.0 is shorter"):
        small([0.0, 2.0], duration_s=1.0)


# --------------------------------------------------------------- schemas
def test_azure_schema_with_num_images(tmp_path):
    p = tmp_path / "mm.csv"
    p.write_text("TIMESTAMP,NumImages,ContextTokens,GeneratedTokens\n"
                 "2025-05-01 10:00:00.0000000,2,100,7\n"
                 "2025-05-01 10:00:01.2500000,0,50,3\n"
                 "2025-05-01 10:01:00.0000001,1,9,1\n")
    tr = load_trace(p)
    np.testing.assert_allclose(tr.arrival_s, [0.0, 1.25, 60.0000001], atol=1e-9)
    assert tr.num_images.tolist() == [2, 0, 1]
    assert tr.prompt_tokens.tolist() == [100, 50, 9]
    assert tr.name == "mm" and tr.service is None


def test_seconds_schema_and_round_trip(tmp_path):
    p = tmp_path / "vidur.csv"
    p.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,374,44\n4.314579,396,109\n")
    tr = load_trace(p)
    assert tr.arrival_s.tolist() == [0.0, 4.314579]
    assert tr.output_tokens.tolist() == [44, 109]
    orig = small([0.25, 1.5, 1.5, 7.0], service=["a", "b", "a", "a"], num_images=[0, 1, 0, 0])
    out = orig.to_csv(tmp_path / "rt.csv.gz")
    back = load_trace(out)
    np.testing.assert_allclose(back.arrival_s, orig.arrival_s)   # seconds kept as written
    for col in ("prompt_tokens", "output_tokens", "num_images", "service"):
        assert getattr(back, col).tolist() == getattr(orig, col).tolist()
    assert not back.generated
