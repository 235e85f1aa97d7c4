"""The compiled iteration-time memo (envs/stepkernel.py) must give the Python path's numbers to the
last bit: the memo values, the busy dicts (their order too), the eviction rule and whole env
trajectories."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytest.importorskip("numba")

from envs import make_env, stepkernel  # noqa: E402
from envs.memo import put  # noqa: E402
from envs.predictor import quantise  # noqa: E402
from envs.world import StepModel  # noqa: E402
from runtime.control import OperatorPlan, Plan, PlanError  # noqa: E402
from runtime.models import OPERATOR_GROUPS  # noqa: E402


def test_quantise_is_pythons():
    xs = [0.0, 0.2, 0.5, 1.5, 2.5, 63.49, 63.5, 64.0, 64.4, 64.5, 65.0, 100.5, 127.5, 128.0, 1000.0, 1999.5,
          4095.5, 4096.0, 123456.7, 2 ** 19 + 0.5]
    xs += np.random.default_rng(0).uniform(0, 200_000, 5000).tolist()
    assert [stepkernel._quantise(x) for x in xs] == [quantise(x) for x in xs]


def test_memo_eviction_is_envs_memo_put():
    from envs.kernelhash import MemoTable

    memo = MemoTable(16)
    table: dict = {}
    rng = np.random.default_rng(1)
    for _ in range(500):
        key = tuple(int(v) for v in rng.integers(0, 40, 10))
        if key in table:  # (the kernel puts only what it missed)
            continue
        value = np.asarray([float(rng.random())])
        memo.put(key, value)
        put(table, key, float(value[0]), 16)
    assert memo.keys() == list(table)
    assert [float(memo.get(k)[0]) for k in memo.keys()] == list(table.values())


def _random_plan(rng: np.random.Generator) -> Plan:
    ops = {}
    for g in OPERATOR_GROUPS:
        place = str(rng.choice(["pack", "pack", "dedicated", "model"]))
        ops[g] = OperatorPlan(int(rng.integers(1, 20)), int(rng.choice([8, 16, 64, 256])), place,
                              int(rng.choice([1, 2, 4])))
    return Plan(ops)


def _placed(sim, rng: np.random.Generator, n: int):  # noqa: ANN001, ANN202
    """Layouts of up to ``n`` random plans (those the placer refuses are skipped)."""
    for _ in range(n):
        try:
            yield sim.placer.place(_random_plan(rng))
        except PlanError:
            continue


@pytest.mark.parametrize("variant", [
    {},
    {"pool_dispatch": "spread"},
    {"micro_batching": "fixed", "micro_batches": 2},
    {"micro_batches": 3, "micro_batch_slack": 0.05},
    {"micro_batches": 1},
])
def test_compiled_memo_equals_the_python_iteration_times(variant):
    env = make_env(seed=0, **variant)
    env.reset(seed=0)
    sim = env.sim
    assert sim._kmemo is not None
    rng = np.random.default_rng(3)
    checked = empty = 0
    for _ in range(12):
        try:
            layout = sim.placer.place(_random_plan(rng))
        except PlanError:
            continue
        sm = StepModel(layout, sim.pred, sim.sc)
        procs = sorted(layout.proc_gpus)
        for _ in range(40):
            sim.util = {p: float(rng.random()) for p in procs} if rng.random() < 0.8 else {}
            n_dec = float(rng.choice([0.0, rng.uniform(0, 40), rng.integers(1, 64)]))
            chunk = float(rng.choice([0.0, 512.0, rng.uniform(0, 512)]))
            args = (n_dec, float(rng.uniform(1, 4000)), chunk, float(rng.uniform(0, 6)), float(rng.uniform(0, 512)),
                    float(rng.uniform(1, 4000)), float(rng.choice([0.0, rng.uniform(0, 30)])))
            kmemo, sim._kmemo = sim._kmemo, None
            sim._it, sim._ukey = {}, (None, None, ())
            want = sim._iter(layout, sm, *args)
            sim._kmemo, sim._ukey = kmemo, (None, None, ())
            got = sim._iter(layout, sm, *args)
            again = sim._iter(layout, sm, *args)  # from the memo
            assert got == want and list(got[1]) == list(want[1]), (variant, args)
            assert again == want and list(again[1]) == list(want[1])
            checked += 1
            empty += not want[1]
    assert checked >= 300 and empty > 0


def _digest(env, steps: int, seed: int) -> str:  # noqa: ANN001
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    h = hashlib.sha256()
    for _ in range(steps):
        obs, r, term, trunc, info = env.step(rng.integers(0, env.action_space.nvec))
        h.update(np.asarray(obs, dtype=np.float32).tobytes())
        h.update(np.float64(r).tobytes())
        h.update(repr(sorted(info.items())).encode())
        if term or trunc:
            env.reset()
    return h.hexdigest()


@pytest.mark.parametrize("overrides", [{}, {"kv_migration": False, "pool_dispatch": "spread"}])
def test_env_trajectories_do_not_depend_on_the_kernel(monkeypatch, overrides):
    on = make_env(seed=0, **overrides)
    a = _digest(on, 150, 5)
    monkeypatch.setattr(stepkernel, "ENABLED", False)
    off = make_env(seed=0, **overrides)
    b = _digest(off, 150, 5)
    assert on.sim._kmemo is not None and off.sim._kmemo is None
    assert a == b


def test_values_beyond_the_kernel_tables_take_the_python_path():
    env = make_env(seed=0)
    env.reset(seed=0)
    sim = env.sim
    layout = sim.serving_layout(0.0)
    sm = sim.step_model(layout)
    sim.util = {p: 0.5 for p in layout.proc_gpus}
    args = (8.0, 3.0e6, 512.0, 2.0, 300.0, 1200.0, 0.0)  # a KV length beyond the tables' 2**20
    kmemo, sim._kmemo = sim._kmemo, None
    sim._it, sim._ukey = {}, (None, None, ())
    want = sim._iter(layout, sm, *args)
    sim._kmemo, sim._ukey = kmemo, (None, None, ())
    calls = []
    timed = sim._timed
    sim._timed = lambda *a: calls.append(a) or timed(*a)
    got = sim._iter(layout, sm, *args)
    again = sim._iter(layout, sm, *args)  # stored in the compiled memo
    assert len(calls) == 1
    assert got == want and again == want and list(got[1]) == list(want[1])


def test_step_models_sharing_a_shape_equal_step_models_built_alone():
    """Step models built from a shared StepShape table (as the simulators build them), and their
    kernels filled from the shape's template, equal ones built from scratch: the same tables,
    signature and kernel arrays, for plans that share a shape and differ in replicas and batches."""
    env = make_env(seed=0)
    env.reset(seed=0)
    sim = env.sim
    shapes: dict = {}
    checked = 0
    for layout in _placed(sim, np.random.default_rng(5), 60):
        alone = StepModel(layout, sim.pred, sim.sc)
        built = StepModel(layout, sim.pred, sim.sc, shapes)
        checked += 1
        for attr in ("signature", "_groups", "_stages", "_ends", "_peers", "_procs", "replicas", "max_batch",
                     "stages", "hops", "remote", "m_choices", "slack", "fill", "local_proc", "site", "tp"):
            assert getattr(built, attr) == getattr(alone, attr), attr
        ka, kb = stepkernel.StepKernel(alone), stepkernel.StepKernel(built)
        assert ka.procs == kb.procs
        assert ka.S.tolist() == kb.S.tolist()
        assert ka.F.tolist() == kb.F.tolist()
    # the random plans repeat shapes (placements and tp), so some models above reused one
    assert 0 < len(shapes) < checked


def test_compiled_slowdowns_equal_the_step_models():
    """StepKernel.slow_for (compiled) gives StepModel.slowdown to the bit, for busy shares inside
    and outside [0, 1], processes missing from the dict, and a fresh dict each call."""
    env = make_env(seed=0)
    env.reset(seed=0)
    sim = env.sim
    rng = np.random.default_rng(9)
    checked = 0
    for layout in _placed(sim, rng, 40):
        sm = StepModel(layout, sim.pred, sim.sc)
        k = stepkernel.StepKernel(sm)
        for _ in range(10):
            procs = [p for p in layout.proc_gpus if rng.random() < 0.8]
            util = {p: float(rng.choice([rng.uniform(0, 1), rng.uniform(-0.5, 1.5), 0.0, 1.0])) for p in procs}
            want = [sm.slowdown(p, util) for p in k.procs]
            assert k.slow_for(sm, util).tolist() == want
            checked += sm._has_peers
    assert checked > 100


def test_token_grid_is_the_image_of_quantise():
    for limit in (64, 256, 1 << 16):
        assert stepkernel._grid(limit).tolist() == sorted({quantise(n) for n in range(1, limit + 1)})


def _key(kt: stepkernel.KernelTables, curve, tok: int, ctx: int, batch: int) -> int:
    return (kt.tid(curve) << 56) | (batch << 40) | (ctx << 20) | tok


def _scalar(kt: stepkernel.KernelTables, key: int) -> float:
    """The Python path's value of a table key, uncached (the predictor's own scalar query)."""
    p = kt.pred
    tid, batch, ctx, tok = key >> 56, (key >> 40) & 0xFFFF, (key >> 20) & 0xFFFFF, key & 0xFFFFF
    curve = kt.curves[tid]
    if curve == "send":
        return p._send_uncached(tok * p.cfg.d_model * p.cfg.dtype_bytes)
    return p._group_uncached(curve[0], tok, ctx, batch, curve[1], curve[2])


def test_a_fill_prefetches_its_row_with_the_scalar_values():
    from envs import predictor_for

    kt = stepkernel.KernelTables(predictor_for("llama-2-70b", "h100"))
    asked = [_key(kt, ("mlp", 2, "decode"), 100, 0, 1), _key(kt, "send", 3000, 0, 0),
             _key(kt, ("attn", 4, "decode"), 12, 1536, 12), _key(kt, ("attn", 1, "prefill"), 512, 2048, 3)]
    kt.fill(np.asarray(asked, dtype=np.int64))
    assert kt.prefetch
    keys = list(kt.table.keys())
    grid = stepkernel._grid(stepkernel._PREFETCH_TOKENS).tolist()
    ctxs = stepkernel._grid(stepkernel._PREFETCH_CONTEXT).tolist()
    expected = {_key(kt, ("mlp", 2, "decode"), t, 0, 1) for t in grid} | {_key(kt, "send", t, 0, 0) for t in grid}
    batches = stepkernel._grid(stepkernel._PREFETCH_BATCH).tolist()
    expected |= {_key(kt, ("attn", 4, "decode"), b, c, b) for b in batches for c in ctxs}
    expected |= {_key(kt, ("attn", 1, "prefill"), 512, c, 3) for c in ctxs}
    assert set(keys) == expected | set(asked)  # (send's 3000 tokens is off the grid: asked, not prefetched)
    assert all(kt.table[k] == _scalar(kt, k) for k in keys)  # bit for bit, beyond the grid's measured end too


def test_prefetching_stops_when_a_vectorised_value_differs(monkeypatch):
    from envs import predictor_for

    kt = stepkernel.KernelTables(predictor_for("llama-2-70b", "h100"))
    vector = kt._vector
    monkeypatch.setattr(kt, "_vector", lambda *a: np.nextafter(vector(*a), np.inf))  # one ulp off
    key = _key(kt, ("proj", 1, "decode"), 200, 0, 1)
    kt.fill(np.asarray([key], dtype=np.int64))
    assert not kt.prefetch and list(kt.table.keys()) == [key] and kt.table[key] == _scalar(kt, key)
    kt.fill(np.asarray([_key(kt, ("proj", 1, "decode"), 300, 0, 1)], dtype=np.int64))
    assert len(kt.table) == 2  # the per-key path from then on


class _Blobs:
    """A stand-in for a StepKernel as BlobArena uses it (``arena`` and ``blobs``)."""

    def __init__(self, ints, floats) -> None:  # noqa: ANN001
        self.arena = (None, -1, 0, 0)
        self._b = (np.asarray(ints, dtype=np.int64), np.asarray(floats, dtype=np.float64))

    def blobs(self, sm):  # noqa: ANN001, ANN201
        return self._b


def test_blob_arena_places_each_kernel_once_and_empties_past_its_limit():
    arena = stepkernel.BlobArena(limit=10)
    big, small = _Blobs(range(5000), [0.5]), _Blobs([7, 8], [])
    assert arena.place(big, None)[2:] == (0, 0)  # (past the first 4,096 ints: grown, kept)
    assert arena.place(small, None)[2:] == (5000, 1)
    assert arena.place(big, None)[2:] == (0, 0) and arena.n_int == 5002  # placed once
    assert arena.ints[:5000].tolist() == list(range(5000)) and arena.ints[5000:5002].tolist() == [7, 8]
    assert arena.floats[:1].tolist() == [0.5]
    arena.start()  # 5,002 ints used > limit 10: a new generation, empty
    assert arena.gen == 1 and arena.n_int == 0
    assert arena.place(small, None)[2:] == (0, 0) and arena.place(big, None)[2:] == (2, 0)
    assert arena.ints[:2].tolist() == [7, 8] and arena.ints[2:5002].tolist() == list(range(5000))
    arena.start()  # (5,002 > 10 again; within limit it keeps what it holds)
    small2 = _Blobs([1], [2.0])
    arena.place(small2, None)
    arena.start()
    assert arena.gen == 2 and arena.n_int == 1
