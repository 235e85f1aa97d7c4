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


def test_shard_group_names_the_problem(model):
    with pytest.raises(ValueError, match=r"unknown operator group 'moe'.*\['embed', 'attn', 'proj', 'mlp', 'head'\]"):
        shard_group(group_modules(model, "mlp"), "moe", ["cpu", "cpu"])
    with pytest.raises(ValueError, match=f"tp=5 is more than the {TINY.n_kv_heads} key/value heads"):
        shard_group(group_modules(model, "attn"), "attn", ["cpu"] * 5)


def test_split_attention_and_cache_compute_what_the_whole_ones_do(model):
    """Two prefills then a decode step through a split and an unsplit replica's attention and cache."""
    from runtime.engine import StepAttention, step_attention
    from runtime.kvcache import KVLayout, PagedKVCache
    from runtime.tensor_parallel import ShardedKVCache, kv_head_split

    lay = KVLayout(TINY.n_layers, TINY.n_kv_heads, TINY.head_dim, 4, torch.float64)
    whole = PagedKVCache(lay, 64 * lay.bytes_per_block)
    split = ShardedKVCache(lay, 64 * lay.bytes_per_block, ["cpu", "cpu"], kv_head_split(TINY.n_kv_heads, 2))
    assert split.n_blocks == whole.n_blocks == 64 and split.memory_bytes == whole.memory_bytes
    full, parts = group_modules(model, "attn"), shard_group(group_modules(model, "attn"), "attn", ["cpu", "cpu"])
    torch.manual_seed(0)
    H, KV, hd = TINY.n_heads, TINY.n_kv_heads, TINY.head_dim
    for seqs in ([(1, 5, 0), (2, 3, 0)], [(1, 1, 5), (2, 1, 3)]):
        if seqs[0][2] == 0:
            for c in (whole, split):
                c.reserve(1, 7)
                c.reserve(2, 7)
        rows = sum(n for _, n, _ in seqs)
        q, k, v = torch.randn(rows, H, hd, dtype=torch.float64), torch.randn(rows, KV, hd, dtype=torch.float64), \
            torch.randn(rows, KV, hd, dtype=torch.float64)
        a, b = StepAttention(whole, seqs), step_attention(split, seqs)
        for layer in range(TINY.n_layers):
            out_w = a(layer, full["rope"][layer], full["attn"][layer], q, k, v)
            out_s = b(layer, parts["rope"][layer], parts["attn"][layer], q, k, v)
            assert torch.allclose(out_w, out_s, rtol=0, atol=1e-12)
    assert split.free_blocks == whole.free_blocks and split.sequences() == whole.sequences()
    ks_w, vs_w = whole.export(1, 6)
    ks_s, vs_s = split.export(1, 6)
    assert all(torch.allclose(x, y, rtol=0, atol=1e-12) for x, y in zip(ks_w + vs_w, ks_s + vs_s))
    other = ShardedKVCache(lay, 64 * lay.bytes_per_block, ["cpu", "cpu"], kv_head_split(KV, 2))
    other.reserve(9, 6)
    other.import_(9, ks_w, vs_w)  # a hand-over from an unsplit replica
    assert all(torch.equal(x, y) for x, y in zip(other.export(9, 6)[0], ks_w))
    split.release(1)
    assert split.free_blocks == whole.free_blocks + 2


def test_tp_devices_off_cuda_repeat_the_device():
    assert tp_devices("cpu", 3) == [torch.device("cpu")] * 3


def _plan(tp: dict[str, int], replicas: int = 2, placement: str = "pack") -> Plan:
    return Plan({g: OperatorPlan(replicas, 3, placement, tp.get(g, 1)) for g in OPERATOR_GROUPS})


def test_engine_runs_split_replicas_and_gives_the_monolithic_tokens(model):
    ps = prompts(10)
    refs = [generate_monolithic(model, p, 6) for p in ps]
    eng = Engine(model, _plan({g: 2 for g in OPERATOR_GROUPS}), EngineConfig()).start()
    try:
        assert all(r.tp == 2 for g in OPERATOR_GROUPS for r in eng.replicas[g])
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
        eng.apply(_plan({"mlp": 2, "proj": 2, "attn": 2}, replicas=1))  # attention hands its sequences over
        for s in seqs:
            assert s.finished.wait(60)
        assert [list(s.generated) for s in seqs] == refs
        eng.wait_ready(30)
        assert [r.tp for g in ("attn", "proj", "mlp") for r in eng.replicas[g]] == [2, 2, 2]
        seqs = [eng.submit(p, 8) for p in ps]
        eng.apply(_plan({}, replicas=1))  # and back
        for s in seqs:
            assert s.finished.wait(60)
        assert [list(s.generated) for s in seqs] == refs
        deadline = time.perf_counter() + 30
        while [r.tp for g in ("attn", "mlp") for r in eng.replicas[g]] != [1, 1]:
            assert time.perf_counter() < deadline
            time.sleep(0.02)
    finally:
        eng.stop()


@pytest.mark.gpu
def test_cuda_split_replicas_span_gpus_and_give_the_greedy_tokens(model):
    """Every group at tp 2 over two GPUs (one visible GPU: tp is clipped to 1, checked as well)."""
    n = torch.cuda.device_count()
    ps = prompts(6)
    refs = [generate_monolithic(model, p, 6) for p in ps]
    eng = Engine(model, _plan({g: 2 for g in OPERATOR_GROUPS}, replicas=1), EngineConfig(device="cuda")).start()
    try:
        want = min(2, n)
        assert all(r.tp == want for g in OPERATOR_GROUPS for r in eng.replicas[g])
        assert {d.index for r in eng.replicas["mlp"] for d in r.devices} == set(range(want))
        seqs = [eng.submit(p, 6) for p in ps]
        for s in seqs:
            assert s.finished.wait(60)
        assert [list(s.generated) for s in seqs] == refs
        assert eng.observe().gpus_in_use == want
    finally:
        eng.stop()
