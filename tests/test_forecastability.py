"""bench/forecastability.py: lags, the AR fit and the scores against hand-computed cases."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.forecastability import fit_ar, forecasts, lagged, per_interval, scores  # noqa: E402


def test_lagged_rows_hold_the_intervals_before_each_target():
    rows, y = lagged(np.arange(6.0), 3)
    assert rows.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]] and y.tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="more than --history 3"):
        lagged(np.arange(3.0), 3)


def test_forecasters_on_a_hand_case():
    x = np.array([1.0, 4.0, 2.0, 8.0, 3.0])
    f = forecasts(x, 3, np.array([0.0, 0.0, 1.0, 0.0]))   # AR weight 1 on the last log value = "last"
    assert f["last"].tolist() == [2.0, 8.0]
    assert f["mean3"].tolist() == pytest.approx([7 / 3, 14 / 3])
    assert f["max2"].tolist() == [4.0, 8.0]
    assert f["ar"] == pytest.approx(f["last"])


def test_the_ar_fit_recovers_a_noiseless_recursion():
    z = [1.0, 2.0]
    for _ in range(60):
        z.append(0.5 * z[-1] + 0.25 * z[-2] + 0.7)
    w = fit_ar(np.expm1(np.array(z)), 2)
    assert w == pytest.approx([0.25, 0.5, 0.7], abs=1e-6)


def test_scores_count_under_forecasts():
    y = np.array([1.0, 2.0, 3.0, 6.0])
    s = scores(np.array([1.0, 2.0, 3.0, 3.0]), y)
    assert s["r2"] == pytest.approx(1 - 9 / 14)          # SSE 9; mean 3, squared deviations 4+1+0+9
    assert s["over_25pct"] == 0.25 and s["over_50pct"] == 0.25   # only 6 vs 3 is more than 1.5x


def test_per_interval_sums_prompt_tokens_and_counts_requests():
    class T:
        arrival_s = np.array([0.1, 0.2, 5.5, 12.0])
        prompt_tokens = np.array([10, 20, 30, 40])
        duration_s = 12.5

    out = per_interval(T, 5.0)
    assert out["prompt_tokens"].tolist() == [30.0, 30.0, 40.0] and out["requests"].tolist() == [2.0, 1.0, 1.0]
