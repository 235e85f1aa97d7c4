"""The env's speed work must not change what it computes: caches, twins and the bench."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from envs import make_env
from envs.memo import RecurringTable, put
from envs.obs import FastActionDecoder
from envs import world as envs_world
from envs.world import Placer, StepModel
from runtime.codec import ActionDecoder


def _trajectory(env, actions):  # noqa: ANN001, ANN202
    obs, _ = env.reset(seed=3, options={"start_s": 100.0})
    out = [obs]
    rewards = []
    for a in actions:
        o, r, term, trunc, info = env.step(a)
        out.append(o)
        rewards.append(r)
        assert not term
    return np.stack(out), np.array(rewards)


def test_put_evicts_oldest_half_when_full():
    t: dict = {}
    for i in range(4):
        put(t, i, i * 10, limit=4)
    assert list(t) == [0, 1, 2, 3]
    assert put(t, 4, 40, limit=4) == 40
    assert list(t) == [2, 3, 4]  # 0 and 1 (the oldest half of 4) went first
    put(t, 2, 21, limit=4)  # overwriting an entry of a table below the limit evicts nothing
    assert t == {2: 21, 3: 30, 4: 40}


def test_fast_decoder_equals_codec_on_any_action():
    env = make_env(seed=0)
    env.reset(seed=0)
    dec = ActionDecoder(env.scenario.codec_config)
    fast = FastActionDecoder(env.scenario.codec_config)
    prev = env.sim.timeline.target_plan
    rng = np.random.default_rng(1)
    nvec = np.asarray(dec.nvec)
    for _ in range(300):
        a = rng.integers(-2, nvec + 2)  # out-of-range entries are clipped like the codec does
        plan = fast.decode(a, prev)
        assert plan == dec.decode(a, prev)
        prev = plan
    assert fast.decode(np.full(len(nvec), 1.7), prev) == dec.decode(np.full(len(nvec), 1.7), prev)
    with pytest.raises(ValueError, match="expected 15"):
        fast.decode([0, 1], prev)


def test_warm_caches_give_the_same_trajectory_as_a_fresh_env():
    """Plan-changing actions: a second pass (every cache warm, identity caches hit) and a
    fresh env (cold caches) see bit-identical observations and rewards."""
    rng = np.random.default_rng(7)
    env = make_env(seed=0)
    actions = [rng.integers(0, env.action_space.nvec) for _ in range(40)]
    first = _trajectory(env, actions)
    second = _trajectory(env, actions)
    fresh = _trajectory(make_env(seed=0), actions)
    for a, b in ((first, second), (first, fresh)):
        assert np.array_equal(a[0], b[0])
        assert np.array_equal(a[1], b[1])


def test_placer_caches_are_bounded_and_keep_answers(monkeypatch):
    env = make_env(seed=0)
    env.reset(seed=0)
    placer: Placer = env.sim.placer
    rng = np.random.default_rng(2)
    fresh = Placer(placer.sc, placer.pred)
    prev = env.sim.timeline.target_plan
    placed = []
    for _ in range(700):
        plan = env._fast_decoder.decode(rng.integers(0, env.action_space.nvec), prev)
        try:
            a = placer.place(plan)
        except Exception as e:  # noqa: BLE001 - refusals must match too
            with pytest.raises(type(e)):
                fresh.place(plan)
            continue
        b = fresh.place(plan)
        assert (a.plan, a.n_gpus, a.units, a.unit_kv_tokens, a.proc_gpus, a.peers, a.memory_bytes) == \
            (b.plan, b.n_gpus, b.units, b.unit_kv_tokens, b.proc_gpus, b.peers, b.memory_bytes)
        placed.append((plan, a))
        prev = plan
    # a plan that comes back is kept while the table has room (since session 30 more than the 512
    # the tables held): after a second pass over 700 plans, a third places none of them again
    assert len({envs_world._plan_key(p) for p, _ in placed}) > 512
    again = [placer.place(p) for p, _ in placed]
    assert all(a.plan == b.plan and a.n_gpus == b.n_gpus for a, (_, b) in zip(again, placed))
    calls = []
    monkeypatch.setattr(placer, "_place", lambda plan: calls.append(plan))
    assert all(placer.place(p) is a for p, a in zip((p for p, _ in placed), again)) and not calls
    monkeypatch.undo()
    # and the tables stay bounded: plans met once stay among the few recent ones; those met again
    # after they left them (300 placements later, past the identity cache too) are held long
    small = Placer(placer.sc, placer.pred)
    small._cache = RecurringTable(limit=512, recent=16)
    for p, _ in placed[:300] + placed[:300]:
        small.place(p)
    n = len({envs_world._plan_key(p) for p, _ in placed[:300]})
    assert len(small._cache.recent) <= 16 and len(small._cache.main) == n - len(small._cache.recent)
    assert len(small._last) <= 256


def test_recurring_table_holds_long_only_what_comes_back():
    t = RecurringTable(limit=4, recent=2)
    assert t.put("a", 1) == 1 and t.get("a") == 1 and t.get("a") == 1  # uses of a recent entry
    assert t.main == {} and t.recent == {"a": 1}                        # do not move it
    t.put("b", 2)
    t.put("c", 3)  # the recent part holds 2: a (the oldest half) goes
    assert t.recent == {"b": 2, "c": 3} and t.get("a") is None and "a" not in t
    t.put("a", 11)  # a was put before: it came back, so it is kept long
    assert t.main == {"a": 11} and t.get("a") == 11 and len(t) == 3
    t.put("d", 4)
    t.put("e", 5)  # remembered keys: a, b, c, d, then the oldest half (a, b) forgotten
    assert list(t.seen) == ["c", "d", "e"] and t.recent == {"d": 4, "e": 5}
    t.put("b", 22)  # b left the recent part but is forgotten too: recent again
    assert "b" in t.recent and "b" not in t.main
    assert t.get("zz", "no") == "no"
    assert t.values == {**t.main, **t.recent} and len(t) == len(t.main) + len(t.recent)  # (get's one dict)


def test_recurring_table_holds_few_values_of_a_stream_that_never_comes_back():
    t = RecurringTable(limit=64, recent=8)
    for i in range(1000):
        assert t.get(i) is None
        t.put(i, object())
    assert t.main == {} and len(t.recent) <= 8 and len(t.seen) <= 64
    for i in range(10):  # a bounded set revisited ends up held whole
        for k in range(2000, 2020):
            if t.get(k) is None:
                t.put(k, k)
    assert all(t.get(k) == k for k in range(2000, 2020))
    assert len(t.main) == 20 - len(t.recent) and len(t.recent) <= 8  # (the last few never left it)
    assert t.values == {**t.main, **t.recent}  # (evictions from either part leave get's dict too)


def test_step_model_hand_checked_mono_iteration():
    """A whole-model layout's iteration is the predictor's calibrated whole-model step."""
    env = make_env(seed=0)
    env.reset(seed=0)
    sim = env.sim
    layout = sim.placer.place(env.scenario.initial_plan())
    assert "attn" in layout.mono and len(layout.mono) == 5
    sm = StepModel(layout, sim.pred, sim.sc)
    r = sm.iteration(16, 1000, 0, 0, 0, 16, 16)
    tp = layout.unit_tp
    assert r.ms == pytest.approx(sim.pred.mono_iteration_ms(tp, 16, 1000), rel=1e-9)
    assert set(r.busy) == {"model"} and 0 < r.busy["model"] <= 1


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_env_rate_runs_every_stream_but_ppo(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import env_speed

    for stream in ("keep", "random", "oq", "train", "trained"):
        assert env_speed.env_rate(stream, 25) > 0
    monkeypatch.setattr(sys, "argv", ["env_speed.py", "--streams", "keep,bogus"])
    with pytest.raises(SystemExit):
        env_speed.main()
    assert "unknown stream(s) ['bogus']" in capsys.readouterr().err


def test_bench_reports_the_host_its_ratios_were_measured_on(monkeypatch):
    """The ratios depend on the CPU and the libraries (session 35: 4.8x on one host, 2.95x on
    another for the same code), so the bench names them."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import env_speed

    hw = env_speed.host()
    assert set(hw) == {"cpu", "cpus", "python", "torch", "numpy", "numba"}
    assert hw["cpu"] and hw["cpus"] == os.cpu_count() and hw["numpy"] == np.__version__
    assert hw["python"] == ".".join(map(str, sys.version_info[:3]))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_gc_share_worker_measures_with_the_collector_off(monkeypatch):
    import gc

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import env_speed

    assert gc.isenabled()
    try:
        got = env_speed._measure("keep", 20, 0, True)
        assert not gc.isenabled()  # the measurement ran (and the worker process ends) without collections
    finally:
        gc.enable()
    assert got["keep"]["steps_per_s"] > 0 and got["keep"]["same_trajectory"] is None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_replays_a_recorded_stream_onto_the_same_trajectory(monkeypatch, tmp_path):
    """A policy-driven stream is recorded live and replayed: the replay steps the env through the
    recording's states (it ends on its last observation), with or without warm-up; a recording of
    the wrong length, or a tree that walks elsewhere, is named."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import env_speed

    path = str(tmp_path / "oq.npz")
    assert env_speed.record_actions("oq", 30, path) == 30
    with np.load(path) as f:
        acts = f["actions"]
    assert acts.shape == (30, 15) and acts.dtype == np.int64
    # the controller changes the plan within these steps: the replay is not of a kept plan
    assert len({a.tobytes() for a in acts}) > 1
    for warmup in (0, 10):
        got = env_speed.replay_rate("oq", 30 - warmup, warmup=warmup, actions=path)
        assert got["steps_per_s"] > 0 and got["same_trajectory"] is True
    with pytest.raises(ValueError, match=r"oq.npz: 30 recorded actions, but warm-up \+ timed steps need 31"):
        env_speed.replay_rate("oq", 31, actions=path)
    with pytest.raises(RuntimeError, match="'oq' was opened for a replay"):
        env_speed._Stream("oq", live=False).action()  # a replay builds no controller to ask
    # the same actions on another env (train.py's: frozen layout, another start plan) end elsewhere
    assert env_speed.replay_rate("train", 30, actions=path)["same_trajectory"] is False


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_replay_option_records_and_replays_another_stream(monkeypatch, capsys):
    """``--replay train`` records train.py's stream once per round and replays it (session 32's
    A/Bs), the result marked replayed and on the recording's trajectory; an unknown name is refused."""
    import json

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import env_speed

    def in_process(root, what, steps, warmup=0, gc_off=False, actions=None):  # noqa: ANN001, ANN202
        out = env_speed._measure(what, steps, warmup, gc_off, actions)[what]
        return out if isinstance(out, dict) else float(out)

    monkeypatch.setattr(env_speed, "_run", in_process)
    monkeypatch.setattr(sys, "argv", ["env_speed.py", "--streams", "train", "--replay", "train", "--rounds", "1",
                                      "--steps", "200", "--no-reference", "--json"])
    assert env_speed.main() == 0
    got = json.loads(capsys.readouterr().out)["current"]["train"]
    assert got["replayed"] is True and got["same_trajectory"] == [True] and got["steps_per_s"] > 0
    monkeypatch.setattr(sys, "argv", ["env_speed.py", "--streams", "train", "--replay", "bogus"])
    with pytest.raises(SystemExit):
        env_speed.main()
    assert "unknown stream(s) ['bogus']" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_interleaved_times_predict_and_step_in_one_loop(monkeypatch, tmp_path):
    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import env_speed

    before = torch.distributions.Distribution._validate_args
    path = str(tmp_path / "trained.npz")
    env_speed.record_actions("trained", 12, path)
    got = env_speed.interleaved_rates("trained", 8, warmup=4, actions=path)
    assert got["same_trajectory"] is True
    assert got["steps_per_s"] > 0 and got["predict_per_s"] > 0 and got["predict_nochecks_per_s"] > 0
    assert got["ratio_to_predict"] == pytest.approx(got["steps_per_s"] / got["predict_per_s"])
    assert got["ratio_to_predict_nochecks"] == pytest.approx(got["steps_per_s"] / got["predict_nochecks_per_s"])
    assert torch.distributions.Distribution._validate_args == before  # the checks' default is restored
    live = env_speed.interleaved_rates("random", 6)
    assert live["same_trajectory"] is None and live["steps_per_s"] > 0


def test_first_reset_freezes_the_heap_once():
    """After a simulator's first reset the objects alive then sit in the collector's permanent
    generation (full collections skip them); later resets do not freeze again."""
    import gc

    import envs.memo as memo

    env = make_env(seed=0)
    env.reset(seed=0)
    assert memo._FROZEN
    frozen = gc.get_freeze_count()
    assert frozen > 0
    env.reset(seed=1)
    assert gc.get_freeze_count() == frozen


def test_equivalence_bench_compares_kernels_with_the_python_path_and_reports_the_first_difference(
        monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import env_equivalence

    root = str(Path(__file__).resolve().parents[1])
    # the compiled kernels against this tree's own Python path (OPSCALE_KERNEL=0): identical
    monkeypatch.setattr(sys, "argv", ["env_equivalence.py", "--baseline", root, "--baseline-env", "OPSCALE_KERNEL=0",
                                      "--steps", "30", "--seeds", "0", "--streams", "mixed", "--training-world"])
    assert env_equivalence.main() == 0
    assert "seed 0 mixed   30 steps: identical" in capsys.readouterr().out
    # a difference is found and placed at its first step
    real = env_equivalence._run

    def run(path, stream, steps, seed, scenario, hash_seed, extra_env=None, training_world=False):  # noqa: ANN001, ANN202
        out = real(path, stream, steps, seed, scenario, hash_seed, extra_env, training_world)
        if extra_env:
            out = {"digest": "x", "steps": out["steps"][:7] + ["y"] * (steps - 7)}
        return out

    monkeypatch.setattr(env_equivalence, "_run", run)
    assert env_equivalence.main() == 1
    assert "DIFFERENT from step 7" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["env_equivalence.py", "--baseline", root, "--baseline-env", "OPSCALE_KERNEL"])
    with pytest.raises(SystemExit):
        env_equivalence.main()
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_equivalence_bench_training_world_is_ppo_yaml_overrides(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import env_equivalence
    from envs.scenario import DEFAULT_CONFIG

    default = env_equivalence.trajectory_digest("mixed", 40, 3, str(DEFAULT_CONFIG))
    world = env_equivalence.trajectory_digest("mixed", 40, 3, str(DEFAULT_CONFIG), training_world=True)
    assert world["digest"] != default["digest"]  # kv_migration off, pool calls spread: other numbers


def test_plan_cost_bench_times_each_part_of_a_new_plan():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import plan_cost

    out = plan_cost.measure(12, passes=1)
    assert out["plans"] >= 12  # train.py's stream meets at least one new plan a step
    assert all(out[part] > 0 for part in plan_cost.PARTS)
    assert out["total"] == pytest.approx(sum(out[part] for part in plan_cost.PARTS))


def test_instruction_bench_driver_replays_a_recorded_stream_with_the_collector_restored(monkeypatch, tmp_path,
                                                                                       capsys):
    """bench/env_instructions.py's driver (what runs under valgrind) without valgrind: it records
    train.py's stream, replays it (cold and warm) and leaves the cyclic collector as it found it."""
    import gc

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import env_instructions

    rec = tmp_path / "acts.npy"
    env_instructions.drive("train", 6, record=str(rec))
    acts = np.load(rec)
    assert acts.shape[0] == 6 and acts.dtype.kind == "i"
    env_instructions.drive("train", 6, actions=str(rec), warm=True)
    env_instructions.drive("keep", 4)
    assert gc.isenabled()
    monkeypatch.setattr(sys, "argv", ["env_instructions.py", "--baseline", str(tmp_path), "--streams", "bogus"])
    with pytest.raises(SystemExit):
        env_instructions.main()
    assert "unknown stream(s) ['bogus']" in capsys.readouterr().err


def test_trace_index_quantiles_are_numpys_per_interval_whichever_sort_runs():
    """The per-interval percentiles an episode's index holds are numpy's (linear interpolation)
    of each interval's requests; token counts take the packed-key sort (session 29), anything
    else the two-key lexsort, and both give the same ordering."""
    from envs.base import TraceIndex, _sorted_by_interval

    rng = np.random.default_rng(3)
    for n, hi in ((1, 5), (7, 2), (500, 4096), (3000, 1 << 20)):
        idx = np.sort(rng.integers(0, 40, n))
        vals = rng.integers(0, hi, n)  # ties and zeros included
        want = vals.astype(np.float64)[np.lexsort((vals, idx))]
        assert np.array_equal(_sorted_by_interval(vals, idx), want)
        assert np.array_equal(_sorted_by_interval(vals.astype(np.float64) + 0.5, idx), want + 0.5)  # lexsort path
    arrival = np.sort(rng.uniform(0.0, 50.0, 400))
    prompt = rng.integers(1, 4000, 400)
    output = rng.integers(1, 900, 400)
    ti = TraceIndex(arrival, prompt, output, 5.0, 10)
    for k in range(10):
        sel = (arrival // 5.0).astype(int) == k
        assert ti.count[k] == sel.sum()
        if sel.any():
            assert ti.prompt_p50[k] == np.percentile(prompt[sel], 50)
            assert ti.prompt_p99[k] == np.percentile(prompt[sel], 99)
            assert ti.output_p99[k] == np.percentile(output[sel], 99)
