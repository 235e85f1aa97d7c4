"""The compiled fluid sub-steps (envs/fluidkernel.py) must give the Python loop's numbers to the
last bit: the env's observations, rewards and info, the simulator's fluid state, the busy-share
dict (its order too, which the iteration-time memo's key depends on), also when a call has to
return to Python for missing latencies or for a value beyond the kernel's tables."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from envs import fluidkernel, make_env, stepkernel  # noqa: E402

_FLUID = ("q", "q_prompt", "q_output", "n_dec", "n_pre", "backlog", "kv", "r_prompt", "r_output", "d_n", "d_kv",
          "d_units", "sys_ok", "_t_it", "_last_T", "tot_finished", "tot_met", "tot_rejected", "gpu_seconds",
          "energy_j")


def _trace(env, steps: int, seed: int, every: int) -> list:  # noqa: ANN001
    """Per step: observation bytes, reward, info, the fluid state and the busy dict's items."""
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    keep = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)
    out = []
    for i in range(steps):
        a = rng.integers(0, env.action_space.nvec) if i % every == 0 else keep
        obs, r, term, trunc, info = env.step(a)
        sim = env.sim
        out.append((np.asarray(obs, dtype=np.float32).tobytes(), float(r), repr(sorted(info.items())),
                     tuple(float(getattr(sim, f)) for f in _FLUID), tuple(sim.util.items())))
        if term or trunc:
            env.reset()
        keep = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)
    return out


def _both(monkeypatch, steps: int, seed: int, every: int, cold: bool = False, **overrides) -> tuple:  # noqa: ANN001
    on = make_env(seed=0, **overrides)
    if cold:  # the kernel tables start empty: calls return to Python for latencies again and again
        on.pred.__dict__.pop("_kernel_tables", None)
    a = _trace(on, steps, seed, every)
    with monkeypatch.context() as m:
        m.setattr(stepkernel, "ENABLED", False)
        off = make_env(seed=0, **overrides)
        b = _trace(off, steps, seed, every)
    assert on.sim._kx is not None and off.sim._kx is None
    return a, b


@pytest.mark.parametrize("overrides,every", [
    ({}, 1),                                                     # the default world, a new plan every step
    ({}, 4),                                                     # plans kept for three steps in four
    ({"kv_migration": False, "pool_dispatch": "spread"}, 2),     # the training world
    ({"micro_batching": "fixed", "micro_batches": 2}, 3),
])
def test_trajectories_equal_the_python_loop(monkeypatch, overrides, every):
    a, b = _both(monkeypatch, 160, 3, every, **overrides)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"step {i} differs"


def test_cold_kernel_tables_restart_calls_and_change_nothing(monkeypatch):
    calls = []
    resolve = stepkernel.KernelMemo.resolve
    monkeypatch.setattr(stepkernel.KernelMemo, "resolve", lambda self, *a: calls.append(a[-1]) or resolve(self, *a))
    a, b = _both(monkeypatch, 60, 1, 1, cold=True)
    assert a == b
    assert sum(1 for r in calls if r > 0) >= 5  # sub-steps were re-run after their tables were filled


def test_values_beyond_the_tables_are_timed_in_python_and_match(monkeypatch):
    """A context beyond the kernel tables' 2**20 tokens: the compiled sub-steps hand that lookup to
    the Python step model (status NEEDS_PYTHON) and go on with its value."""
    def run(enabled: bool) -> tuple:
        with monkeypatch.context() as m:
            m.setattr(stepkernel, "ENABLED", enabled)
            env = make_env(seed=0)
        env.reset(seed=0)
        keep = env.decoder.encode(env.sim.timeline.target_plan, env.sim.timeline.target_plan)
        env.step(keep)
        sim = env.sim
        sim.r_prompt, sim.n_dec, sim.kv = 3.0e6, 4.0, 4.0 * 3.0e6
        timed = []
        orig = sim._timed
        sim._timed = lambda *a: timed.append(a) or orig(*a)
        obs, r, *_ = env.step(keep)
        return np.asarray(obs).tobytes(), r, tuple(float(getattr(sim, f)) for f in _FLUID), len(timed)

    on, off = run(True), run(False)
    assert on[:3] == off[:3]
    assert on[3] >= 1


def test_new_state_has_no_cached_operating_point():
    x = fluidkernel.new_state()
    assert x.shape == (fluidkernel.N_STATE,) and x[fluidkernel.REF_SM] == -1.0 and x[fluidkernel.LAST_T] == 0.05


def test_runs_of_an_interval_share_one_call_and_resume_where_python_was_needed(monkeypatch):
    """Replicas becoming ready inside an interval split it into runs of sub-steps, which go to the
    compiled code in one call (session 32); a lookup that needs Python in a later run resumes the
    call at that run, the runs before it done once. Cold tables make such returns frequent."""
    seen = []
    orig = fluidkernel.segments_io

    def spy(io, *a):  # noqa: ANN001, ANN002, ANN202
        r = orig(io, *a)
        seen.append((int(io[fluidkernel.IO_NSEG]), int(io[fluidkernel.IO_FIRST]), r))
        return r

    monkeypatch.setattr(fluidkernel, "segments_io", spy)
    a, b = _both(monkeypatch, 60, 1, 1, cold=True)
    assert a == b
    assert any(n > 1 and r == fluidkernel.DONE for n, _, r in seen)        # several runs in one call
    assert any(first > 0 and r != fluidkernel.DONE for _, first, r in seen)  # a return in a later run
