"""The compiled best-fit packing (envs/packkernel.py) must place every plan exactly as the Python
loop does: the same GPU classes in the same order, the same bytes, the same processes in the same
order (the co-residence table and the power model iterate them), hence the same layout."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from envs import Scenario, predictor_for  # noqa: E402
from envs.world import Layout, Placer  # noqa: E402
from runtime.colocation import co_residence  # noqa: E402
from runtime.control import OperatorPlan, Plan, PlanError  # noqa: E402
from runtime.models import OPERATOR_GROUPS  # noqa: E402


def _view(layout: Layout) -> tuple:
    """Everything a layout holds, with dict orders."""
    return ([(c.count, c.kind, c.used_bytes, list(c.procs.items())) for c in layout.gpus],
            [(p, list(v.items())) for p, v in layout.peers.items()], list(layout.proc_gpus.items()),
            layout.unit_kv_tokens, layout.units, layout.unit_tp, layout.repairs, layout.plan,
            list(layout.memory_bytes.items()), list(layout.load_s.items()))


def _placers(sc: Scenario) -> tuple[Placer, Placer]:
    pred = predictor_for(sc.model, sc.gpu)
    compiled, python = Placer(sc, pred), Placer(sc, pred)
    python._compiled = False
    assert compiled._compiled
    return compiled, python


def _random_plan(rng: np.random.Generator, placements: tuple[str, ...]) -> Plan:
    return Plan({g: OperatorPlan(int(rng.integers(1, 25)), int(rng.choice([8, 16, 32, 64, 256])),
                                 str(rng.choice(placements)), int(rng.choice([1, 2, 4, 8])))
                 for g in OPERATOR_GROUPS})


@pytest.mark.parametrize("placements,max_gpus", [
    (("pack",), None),                          # everything packed (the training plans)
    (("pack", "pack", "dedicated", "model"), None),
    (("pack", "model"), 24),                    # repairs down to a 24-GPU cluster
])
def test_compiled_packing_places_as_the_python_loop(placements, max_gpus):
    sc = Scenario.from_yaml()
    if max_gpus:
        sc = sc.replace(max_gpus=max_gpus)
    compiled, python = _placers(sc)
    rng = np.random.default_rng(7)
    placed = refused = 0
    for _ in range(400):
        plan = _random_plan(rng, placements)
        try:
            want = python._place(plan)
        except PlanError as e:
            with pytest.raises(PlanError, match=str(e)[:40]):
                compiled._place(plan)
            refused += 1
            continue
        assert _view(compiled._place(plan)) == _view(want), plan
        placed += 1
    assert placed >= 300


def test_a_placement_beyond_the_kernel_arrays_takes_the_python_loop():
    sc = Scenario.from_yaml()
    compiled, python = _placers(sc)
    compiled._arrays = tuple(a[:3] for a in compiled._arrays)  # room for three GPU classes only
    calls = []
    pack = compiled._pack
    compiled._pack = lambda *a: calls.append(1) or pack(*a)
    rng = np.random.default_rng(11)
    for _ in range(30):
        plan = _random_plan(rng, ("pack",))
        assert _view(compiled._place(plan)) == _view(python._place(plan))
    assert len(calls) >= 30  # (every plan needs more than three classes)


def test_compiled_packing_keeps_ties_merges_and_rounding_of_the_python_loop(monkeypatch):
    """Crafted loads where the corner cases happen often: needs from a few values (so candidate
    GPUs tie on free bytes and the stable sort decides), some a third of a byte apart (so classes
    merge on bytes rounded to the byte while keeping the first one's exact bytes), and GPUs opened
    by whole-model instances and dedicated replicas already there."""
    from envs.world import GPUClass

    sc = Scenario.from_yaml()
    compiled, python = _placers(sc)
    rng = np.random.default_rng(5)
    gb = 1e9
    cap = compiled.cap
    for trial in range(300):
        needs = {g: float(rng.choice([8, 12, 16, 24])) * gb + float(rng.choice([0.0, 0.3, 1 / 3])) for g in OPERATOR_GROUPS}
        monkeypatch.setattr(Placer, "replica_need", lambda self, g, op: needs[g])
        start = []
        for _ in range(int(rng.integers(0, 4))):
            kind = str(rng.choice(["model", "dedicated", "pack"]))
            procs = {"model": 1} if kind == "model" else {str(rng.choice(OPERATOR_GROUPS)): int(rng.integers(1, 3))}
            start.append(GPUClass(int(rng.integers(1, 5)), kind, float(rng.choice([8, 16, 24])) * gb, procs))
        packed = [str(g) for g in rng.permutation(OPERATOR_GROUPS)[:int(rng.integers(1, 6))]]
        plan = Plan({g: OperatorPlan(int(rng.integers(1, 12)), 16, "pack", int(rng.choice([1, 2, 4])))
                     for g in OPERATOR_GROUPS})
        copy = [GPUClass(c.count, c.kind, c.used_bytes, dict(c.procs)) for c in start]
        want = python._pack(copy, packed, plan)
        out = compiled._pack_compiled(start, packed, plan)
        assert out is not None
        got, peers = out
        assert all(c.used_bytes <= cap * (1 + 1e-9) or c.kind != "pack" for c in got)
        assert [(c.count, c.kind, c.used_bytes, list(c.procs.items())) for c in got] == \
            [(c.count, c.kind, c.used_bytes, list(c.procs.items())) for c in want], trial
        # the co-residence table made on the kernel's arrays: Python's, to the bit and in dict order
        table = co_residence((c.count, c.procs) for c in want)
        assert [(p, list(v.items())) for p, v in peers.items()] == \
            [(p, list(v.items())) for p, v in table.items()], trial
