"""CLIs: envs.predict and envs.simulate, and run_controller."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from envs import Scenario, make_simulator, predictor_for, run_controller, scenario_trace
from envs.predict import main as predict_main
from envs.simulate import FixedPlan
from envs.simulate import main as simulate_main
from runtime.control import Plan


def test_predict_json_matches_the_simulator(capsys):
    assert predict_main(["--model", "llama-2-70b", "--gpu", "h100", "--tp", "4", "--batch", "8",
                         "--prompt-tokens", "2048", "--context-tokens", "2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    p = predictor_for("llama-2-70b", "h100")
    assert out["prefill_ms"] == pytest.approx(p.prefill_ms(4, 8, 2048))
    assert out["decode_ms"] == pytest.approx(p.decode_ms(4, 8, 2048))
    assert out["decode_ms"] < out["prefill_ms"]
    assert sum(out["decode_kernel_ms"].values()) <= out["decode_ms"]  # overhead on top of kernels


@pytest.mark.parametrize("args,msg", [(["--tp", "3"], "--tp must be 1, 2, 4 or 8"),
                                      (["--batch", "0"], "--batch must be >= 1"),
                                      (["--model", "gpt-9"], "unknown model 'gpt-9'")])
def test_predict_bad_input_names_the_problem(capsys, args, msg):
    assert predict_main(args) == 2
    assert msg in capsys.readouterr().err


def test_simulate_cli_runs_a_window_and_prints_metrics(capsys):
    rc = simulate_main(["--trace", "azure-conv", "--controller", "static", "--replicas", "2", "--window", "0", "120",
                        "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("slo_attainment", "ttft_p99_s", "tbt_p99_s", "gpu_seconds", "energy_j", "requests", "finished"):
        assert k in out
    assert out["mean_gpus"] == pytest.approx(8.0)
    assert out["finished"] + out["rejected"] + out["queued"] == out["requests"]


def test_simulate_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "envs.simulate", "--trace", "nope-trace", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope-trace" in r.stderr


def test_run_controller_loops_until_done():
    sc = Scenario.from_yaml()
    tr = scenario_trace(sc).window(0.0, 60.0)
    sim = make_simulator(sc, tr, fidelity="reference")
    plan = Plan.model_level(2, 64, 4)
    out = run_controller(sim, FixedPlan(plan), plan)
    assert sim.done and out["steps"] >= 12 and out["controller"] == "static"
    assert out["finished"] + out["rejected"] == len(tr)
