"""traces/generate.py: seeded generators fitted to a real trace, labelled as generated."""
import numpy as np
import pytest

from traces import load_trace
from traces.cli import main
from traces.generate import GENERATORS, MMPPFit, day_shape, fit_mmpp, generate, interarrival_cv


def within(x, ref, tol=0.05):
    return abs(x / ref - 1.0) <= tol


def assert_tokens_like(gen, src):
    for col in ("prompt_tokens", "output_tokens"):
        g, s = getattr(gen, col), getattr(src, col)
        for q in (50, 99):
            assert within(np.percentile(g, q), np.percentile(s, q)), (gen.name, col, q)
        assert within(g.mean(), s.mean()), (gen.name, col)


@pytest.mark.parametrize("kind", ["poisson", "gamma", "mmpp", "diurnal"])
def test_long_sample_matches_source_rate_and_tokens(kind):
    src = load_trace("azure-conv")
    gen = generate(kind, src, 2 * 86_400.0, seed=3)            # two whole days, ~956,000 requests
    assert gen.generated and gen.name == f"generated:{kind}(azure-conv, seed=3)"
    assert gen.duration_s == 2 * 86_400.0
    assert np.all(np.diff(gen.arrival_s) >= 0) and gen.arrival_s.max() < gen.duration_s
    assert within(gen.mean_rate_per_s, src.mean_rate_per_s)
    assert_tokens_like(gen, src)
    assert set(gen.service) == {"conv"}


def test_gamma_fits_the_code_trace_burstiness():
    src = load_trace("azure-code")
    cv = interarrival_cv(src)
    assert 12.0 < cv < 14.0                                     # code arrives in bursts
    gen = generate("gamma", src, 1_000_000.0, seed=0)
    assert within(gen.mean_rate_per_s, src.mean_rate_per_s)
    assert within(interarrival_cv(gen), cv, tol=0.1)
    assert_tokens_like(gen, src)


def test_poisson_cv_is_one_and_mmpp_is_overdispersed():
    src = load_trace("azure-code")
    pois = generate("poisson", src, 200_000.0, seed=1)
    assert within(interarrival_cv(pois), 1.0, tol=0.02)
    c = pois.counts_per_window(60.0)[:-1]
    assert within(c.var() / c.mean(), 1.0, tol=0.15)             # Poisson: variance = mean
    fit = fit_mmpp(src)
    assert fit.high_rate_per_s > 3 * fit.low_rate_per_s
    assert fit.mean_rate_per_s == pytest.approx(src.mean_rate_per_s)
    m = generate("mmpp", src, 400_000.0, seed=1)
    c = m.counts_per_window(60.0)[:-1]
    assert c.var() / c.mean() > 10
    assert within(m.mean_rate_per_s, src.mean_rate_per_s)


def test_mmpp_with_given_parameters_hits_its_stationary_rate():
    src = load_trace("azure-conv")
    fit = MMPPFit(high_rate_per_s=20.0, low_rate_per_s=2.0, high_dwell_s=30.0, low_dwell_s=90.0)
    assert fit.mean_rate_per_s == pytest.approx(0.25 * 20 + 0.75 * 2)   # 6.5 req/s
    gen = generate("mmpp", src, 300_000.0, seed=5, fit=fit)
    assert within(gen.mean_rate_per_s, 6.5)


def test_diurnal_day_shape():
    src = load_trace("azure-conv")
    gen = generate("diurnal", src, 10 * 3600.0, seed=2, period_s=3600.0, amplitude=0.5, peak_hour=14)
    assert within(gen.mean_rate_per_s, src.mean_rate_per_s)
    by_hour = np.bincount((gen.arrival_s % 3600.0 // 150.0).astype(int), minlength=24)  # 1 "hour" = 150 s
    assert int(np.argmax(by_hour)) in (13, 14, 15) and int(np.argmin(by_hour)) in (1, 2, 3)
    # peak/trough of 1 + 0.5 cos: 1.5 / 0.5 = 3 (hour bins average the cosine a little)
    assert 2.6 < by_hour.max() / by_hour.min() < 3.3
    m = day_shape(period_s=24.0, shape=[1.0, 3.0])              # knots at 0 h and 12 h
    np.testing.assert_allclose(m(np.array([0.0, 6.0, 12.0, 18.0])), [0.5, 1.0, 1.5, 1.0])
    with pytest.raises(ValueError, match="amplitude=1.5"):
        generate("diurnal", src, 100.0, amplitude=1.5)


def test_surge_step():
    src = load_trace("azure-conv")
    T = 300_000.0
    gen = generate("surge", src, T, seed=4, factor=3.0, at_s=100_000.0, length_s=50_000.0)
    before = gen.window(0.0, 100_000.0)
    during = gen.window(100_000.0, 150_000.0)
    after = gen.window(150_000.0)
    assert within(before.mean_rate_per_s, src.mean_rate_per_s)
    assert within(during.mean_rate_per_s, 3 * src.mean_rate_per_s)
    assert within(after.mean_rate_per_s, src.mean_rate_per_s)
    assert_tokens_like(gen, src)


def test_seeds_reproduce():
    src = load_trace("azure-code")
    for kind in GENERATORS:
        a, b = generate(kind, src, 3600.0, seed=7), generate(kind, src, 3600.0, seed=7)
        c = generate(kind, src, 3600.0, seed=8)
        assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
        assert len(a) != len(c) or not np.array_equal(a.arrival_s, c.arrival_s)


def test_generator_argument_errors():
    src = load_trace("azure-conv")
    with pytest.raises(ValueError, match="unknown generator 'weekly'"):
        generate("weekly", src, 10.0)
    with pytest.raises(ValueError, match="duration_s=-1"):
        generate("poisson", src, -1.0)
    with pytest.raises(ValueError, match="rate 0.0 req/s"):
        generate("poisson", src, 10.0, rate_per_s=0.0)


def test_cli_generate_then_info(tmp_path, capsys):
    out = tmp_path / "gen.csv"
    assert main(["generate", "surge", "--like", "azure-conv", "--duration", "600", "--seed", "1",
                 "--factor", "2", "--out", str(out)]) == 0
    assert "generated:surge(azure-conv, seed=1)" in capsys.readouterr().out
    assert out.read_text().splitlines()[0] == \
        "arrived_at,num_prefill_tokens,num_decode_tokens,service,generator"
    tr = load_trace(out)
    assert tr.generated and tr.name == "generated:surge(azure-conv, seed=1)"
    direct = generate("surge", load_trace("azure-conv"), 600.0, seed=1, factor=2.0)
    np.testing.assert_allclose(tr.arrival_s, direct.arrival_s, atol=1e-6)
    assert tr.prompt_tokens.tolist() == direct.prompt_tokens.tolist()
    assert main(["info", str(out)]) == 0
    assert "generated:surge(azure-conv, seed=1) (GENERATED, not recorded)" in capsys.readouterr().out
    assert main(["generate", "gamma", "--like", "azure-conv", "--factor", "2", "--out", str(out)]) == 2
    assert "--factor do not apply to gamma" in capsys.readouterr().err
