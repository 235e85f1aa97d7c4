"""Tensor parallelism inside a runtime replica (runtime/tensor_parallel.py and the engine's use of it)."""
from __future__ import annotations

import time

import pytest
import torch

from runtime.control import OperatorPlan, Plan
from runtime.engine import Engine, EngineConfig, group_modules
from runtime.model import build_model, generate_monolithic
from runtime.models import OPERATOR_GROUPS, get_model
from runtime.tensor_parallel import shard_group, tp_devices

TINY = get_model("tiny")


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, dtype=torch.float64, seed=1)


def prompts(n: int) -> list[list[int]]:
    return [[(13 * i + 7 * j + 3) % TINY.vocab_size for j in range(3 + (i % 9))] for i in range(n)]


@pytest.mark.parametrize("tp", [2, 3])
def test_sharded_groups_compute_what_the_unsplit_ones_do(model, tp):
    torch.manual_seed(0)
    x = torch.randn(5, TINY.d_model, dtype=torch.float64)
    ids = torch.tensor([0, 3, TINY.vocab_size - 1, 7])
    if tp > TINY.n_kv_heads:
        with pytest.raises(ValueError, match="key/value heads"):
            shard_group(group_modules(model, "proj"), "proj", ["cpu"] * tp)
    else:
        full, split = group_modules(model, "proj"), shard_group(group_modules(model, "proj"), "proj", ["cpu"] * tp)
        for a, b in zip(full["qkv"][0](x), split["qkv"][0](x)):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12)
        att = torch.randn(5, TINY.n_heads * TINY.head_dim, dtype=torch.float64)
        assert torch.allclose(full["o"][1](att), split["o"][1](att), rtol=0, atol=1e-12)
    full, split = group_modules(model, "mlp"), shard_group(group_modules(model, "mlp"), "mlp", ["cpu"] * tp)
    assert torch.allclose(full["mlp"][0](full["norm"][0](x)), split["mlp"][0](split["norm"][0](x)), rtol=0, atol=1e-12)
    full, split = group_modules(model, "embed"), shard_group(group_modules(model, "embed"), "embed", ["cpu"] * tp)
    assert torch.equal(full["embed"](ids), split["embed"](ids))
    full, split = group_modules(model, "head"), shard_group(group_modules(model, "head"), "head", ["cpu"] * tp)
    assert torch.allclose(full["lm_head"](full["norm"](x)), split["lm_head"](split["norm"](x)), rtol=0, atol=1e-12)
    # a split replica holds the same weights, no more
    for g in ("mlp", "embed", "head"):
        n_full = sum(p.numel() for p in group_modules(model, g).parameters())
        assert sum(p.numel() for p in shard_group(group_modules(model, g), g, ["cpu"] * tp).parameters()) == n_full


def test_shard_group_refuses_attention_and_names_the_groups(model):
    with pytest.raises(ValueError, match=r"'attn' cannot be split.*\['embed', 'proj', 'mlp', 'head'\]"):
        shard_group(group_modules(model, "attn"), "attn", ["cpu", "cpu"])


def test_tp_devices_off_cuda_repeat_the_device():
    assert tp_devices("cpu", 3) == [torch.device("cpu")] * 3


def _plan(tp: dict[str, int], replicas: int = 2, placement: str = "pack") -> Plan:
    return Plan({g: OperatorPlan(replicas, 3, placement, tp.get(g, 1)) for g in OPERATOR_GROUPS})


def test_engine_runs_split_replicas_and_gives_the_monolithic_tokens(model):
    ps = prompts(10)
    refs = [generate_monolithic(model, p, 6) for p in ps]
    eng = Engine(model, _plan({"embed": 2, "proj": 2, "mlp": 2, "head": 2, "attn": 2}), EngineConfig()).start()
    try:
        assert eng.plan["attn"].tp == 1 and eng.plan["mlp"].tp == 2  # attention keeps its KV whole
        assert all(r.tp == 2 for g in ("embed", "proj", "mlp", "head") for r in eng.replicas[g])
        seqs = [eng.submit(p, 6) for p in ps]
        for s in seqs:
            assert s.finished.wait(60)
        assert [list(s.generated) for s in seqs] == refs
        st = eng.observe()
        assert st.operators["mlp"].tp == 2
        # two replicas' worth of MLP weights, whatever the split
        mlp_bytes = sum(p.numel() * 8 for p in group_modules(model, "mlp").parameters())
        assert st.operators["mlp"].memory_bytes == pytest.approx(2 * mlp_bytes)
        # on CPU a slot stands for a GPU: two pack slots whose replicas span two GPUs each
        assert st.gpus_in_use == 4
    finally:
        eng.stop()


def test_engine_changes_tp_while_serving_and_loses_nothing(model):
    ps = prompts(12)
    refs = [generate_monolithic(model, p, 8) for p in ps]
    eng = Engine(model, _plan({}, replicas=1), EngineConfig(fuse_colocated=False)).start()
    try:
        seqs = [eng.submit(p, 8) for p in ps]
        eng.apply(_plan({"mlp": 2, "proj": 2}, replicas=1))
        for s in seqs:
            assert s.finished.wait(60)
        assert [list(s.generated) for s in seqs] == refs
        eng.wait_ready(30)
        assert [r.tp for r in eng.replicas["mlp"]] == [2] and [r.tp for r in eng.replicas["proj"]] == [2]
        seqs = [eng.submit(p, 8) for p in ps]
        eng.apply(_plan({}, replicas=1))  # and back
        for s in seqs:
            assert s.finished.wait(60)
        assert [list(s.generated) for s in seqs] == refs
        deadline = time.perf_counter() + 30
        while [r.tp for r in eng.replicas["mlp"]] != [1]:
            assert time.perf_counter() < deadline
            time.sleep(0.02)
    finally:
        eng.stop()
