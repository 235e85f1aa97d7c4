"""The operator-split model against an independent monolithic forward, hand-computed
operator outputs, and the Hugging Face loader on checkpoints the tests write themselves."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from runtime.model import (
    Attention,
    RMSNorm,
    Rotary,
    Sampler,
    build_model,
    generate_monolithic,
    generate_split,
)
from runtime.models import get_model
from runtime.weights import WeightsError, config_from_hf, load_hf_weights, load_model, save_hf_weights

TINY = get_model("tiny")  # 2 layers, d=64, 4 heads, 2 KV heads (GQA), d_ff=172, V=256
MHA = replace(TINY, name="tiny-mha", n_kv_heads=TINY.n_heads)
PROMPT = [3, 17, 200, 5, 99, 42, 7, 128, 1]


def split_prefill_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of every prompt position through the operator modules (no cache)."""
    with torch.no_grad():
        h = model.embed(torch.tensor(ids))
        pos = torch.arange(len(ids))
        for layer in model.layers:
            h, _, _ = layer.prefill(h, pos)
        return model.lm_head(model.final_norm(h))


def split_decode_logits(model, ids: list[int], prefix: int) -> torch.Tensor:
    """Prefill ``ids[:prefix]``, then decode the rest one token at a time; logits [len-prefix, V]."""
    cfg = model.cfg
    n = len(ids)
    kc = [torch.zeros(1, n, cfg.n_kv_heads, cfg.head_dim) for _ in model.layers]
    vc = [torch.zeros_like(k) for k in kc]
    out = []
    with torch.no_grad():
        h = model.embed(torch.tensor(ids[:prefix]))
        for i, layer in enumerate(model.layers):
            h, k, v = layer.prefill(h, torch.arange(prefix))
            kc[i][0, :prefix], vc[i][0, :prefix] = k, v
        for t in range(prefix, n):
            h = model.embed(torch.tensor([ids[t]]))
            for i, layer in enumerate(model.layers):
                q, k, v = layer.qkv(layer.attn_norm(h))
                q, k = layer.rope(q, k, torch.tensor([t]))
                kc[i][0, t], vc[i][0, t] = k[0], v[0]
                h = h + layer.o_proj(layer.attn.decode(q, kc[i], vc[i], torch.tensor([t + 1])))
                h = h + layer.mlp(layer.mlp_norm(h))
            out.append(model.lm_head(model.final_norm(h))[0])
    return torch.stack(out)


# ---------------------------------------------------------------- split == monolithic


@pytest.mark.parametrize("cfg", [TINY, MHA], ids=["gqa", "mha"])
def test_split_prefill_and_decode_logits_equal_monolithic(cfg):
    model = build_model(cfg, seed=3)
    ref = model.forward_monolithic(torch.tensor([PROMPT]))[0]
    assert ref.shape == (len(PROMPT), cfg.vocab_size)
    torch.testing.assert_close(split_prefill_logits(model, PROMPT), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(split_decode_logits(model, PROMPT, prefix=3), ref[3:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_greedy_generate_split_equals_monolithic(name):
    model = build_model(get_model(name), seed=0)
    split = generate_split(model, PROMPT, 16)
    mono = generate_monolithic(model, PROMPT, 16)
    assert len(split) == 16
    assert split == mono
    assert all(0 <= t < model.cfg.vocab_size for t in split)


def test_monolithic_is_causal_and_batched():
    model = build_model(TINY, seed=1)
    a = model.forward_monolithic(torch.tensor([PROMPT]))[0]
    # changing the last token must not change earlier positions' logits
    b = model.forward_monolithic(torch.tensor([PROMPT[:-1] + [250]]))[0]
    torch.testing.assert_close(a[:-1], b[:-1])
    assert not torch.allclose(a[-1], b[-1])
    both = model.forward_monolithic(torch.tensor([PROMPT, PROMPT[:-1] + [250]]))
    torch.testing.assert_close(both[0], a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both[1], b, atol=1e-6, rtol=1e-5)


def test_bfloat16_split_close_to_float32():
    m32 = build_model(TINY, seed=2)
    m16 = build_model(TINY, dtype=torch.bfloat16, seed=2)
    with torch.no_grad():
        for p16, p32 in zip(m16.parameters(), m32.parameters()):
            p16.copy_(p32.to(torch.bfloat16))
            p32.copy_(p16.float())  # same rounded weights on both sides
    lo = split_prefill_logits(m16, PROMPT).float()
    hi = m32.forward_monolithic(torch.tensor([PROMPT]))[0]
    assert (lo - hi).abs().max() < 0.05 * hi.abs().max()


# ---------------------------------------------------------------- operators by hand


def test_rmsnorm_hand_computed():
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    y = norm(torch.tensor([[3.0, 4.0]]))  # rms = sqrt((9+16)/2) = 3.5355
    torch.testing.assert_close(y, torch.tensor([[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)]]))


def test_rotary_uses_rotate_half_pairs():
    # head_dim 4, theta 100: element i pairs with i+2; frequencies 1 and 100^-0.5 = 0.1
    rope = Rotary(4, theta=100.0, max_positions=8)
    q = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # [T=1, H=1, hd=4]
    k = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    p = 3
    qr, kr = rope(q, k, torch.tensor([p]))
    c0, s0, c1, s1 = math.cos(p), math.sin(p), math.cos(0.1 * p), math.sin(0.1 * p)
    expect_q = [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1]
    torch.testing.assert_close(qr[0, 0], torch.tensor(expect_q))
    torch.testing.assert_close(kr[0, 0], torch.tensor([c0, 0.0, s0, 0.0]))
    # position 0 is the identity; positions beyond the cache grow it
    torch.testing.assert_close(rope(q, k, torch.tensor([0]))[0], q)
    far, _ = rope(q, k, torch.tensor([20]))
    torch.testing.assert_close(far[0, 0, 0], torch.tensor(1 * math.cos(20) - 3 * math.sin(20)))


def test_attention_gqa_head_mapping_and_padded_decode():
    torch.manual_seed(0)
    attn = Attention(n_heads=4, n_kv_heads=2, head_dim=8)
    T = 5
    q, k, v = torch.randn(T, 4, 8), torch.randn(T, 2, 8), torch.randn(T, 2, 8)
    out = attn.prefill(q, k, v).view(T, 4, 8)
    # query head 3 reads KV head 1 (3 // 2); check the last position by hand
    scores = (k[:, 1] @ q[-1, 3]) / math.sqrt(8)
    torch.testing.assert_close(out[-1, 3], torch.softmax(scores, 0) @ v[:, 1])
    # first position attends only to itself
    torch.testing.assert_close(out[0, 0], v[0, 0])

    # decode over a padded batch: garbage beyond each length must not leak in
    lengths = torch.tensor([5, 2, 3])
    kc, vc = torch.randn(3, 7, 2, 8) * 50, torch.randn(3, 7, 2, 8) * 50
    kc[0, :5], vc[0, :5] = k, v
    qd = torch.randn(3, 4, 8)
    got = attn.decode(qd, kc, vc, lengths).view(3, 4, 8)
    for b, n in enumerate(lengths.tolist()):
        for hh in range(4):
            kv = hh // 2
            w = torch.softmax((kc[b, :n, kv] @ qd[b, hh]) / math.sqrt(8), 0)
            torch.testing.assert_close(got[b, hh], w @ vc[b, :n, kv], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(attn.decode(qd, kc, vc, lengths, max_length=5), got.view(3, 32))
    with pytest.raises(ValueError, match="seq_lens sum to 4"):
        attn.prefill_packed(q, k, v, [2, 2])
    packed = attn.prefill_packed(q, k, v, [2, 3])
    torch.testing.assert_close(packed[2:], attn.prefill(q[2:], k[2:], v[2:]))


def test_sampler_greedy_per_row_temperature_and_errors():
    s = Sampler()
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert s(logits).tolist() == [1, 0, 0]
    g = torch.Generator().manual_seed(0)
    flat = torch.zeros(400, 3)
    draws = s(flat, 1.0, generator=g)
    counts = torch.bincount(draws, minlength=3)
    assert counts.min() > 90  # uniform over 3 tokens: ~133 each
    # per-row temperature: row 0 greedy, row 1 sampled
    temp = torch.tensor([0.0, 1.0])
    rows = torch.stack([torch.tensor([0.0, 9.0, 0.0]), torch.zeros(3)])
    seen = {int(s(rows, temp, generator=g)[1]) for _ in range(60)}
    assert all(int(s(rows, temp, generator=g)[0]) == 1 for _ in range(20))
    assert seen == {0, 1, 2}
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        s(logits, -1.0)
    with pytest.raises(ValueError, match="2 entries for 3 rows"):
        s(logits, torch.tensor([1.0, 1.0]))


def test_build_model_seeded_and_shapes():
    a, b, c = build_model(TINY, seed=0), build_model(TINY, seed=0), build_model(TINY, seed=1)
    assert torch.equal(a.layers[1].qkv.weight, b.layers[1].qkv.weight)
    assert not torch.equal(a.layers[1].qkv.weight, c.layers[1].qkv.weight)
    assert a.layers[0].qkv.weight.shape == (TINY.qkv_out, TINY.d_model)
    assert a.layers[0].mlp.gate_up.weight.shape == (2 * TINY.d_ff, TINY.d_model)
    n_params = sum(p.numel() for p in a.parameters())
    assert n_params == sum(TINY.group_params(g) for g in ("embed", "attn", "proj", "mlp", "head"))
    assert torch.all(a.layers[0].attn_norm.weight == 1)
    assert abs(float(a.lm_head.weight.std()) - 0.02) < 0.002


def test_generate_rejects_bad_requests():
    model = build_model(TINY)
    with pytest.raises(ValueError, match="exceeds tiny's max_seq_len 512"):
        generate_split(model, [1] * 500, 13)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate_monolithic(model, [], 2)
    with pytest.raises(ValueError, match=r"out of range \[0, 256\): \[256\]"):
        generate_split(model, [1, 256], 2)
    assert generate_split(model, [1, 2], 0) == []


# ---------------------------------------------------------------- Hugging Face loader


def write_hf_checkpoint(model, path, shards: int = 1, tie: bool = False, config_overrides=None):
    """Write ``model`` the way transformers' LlamaForCausalLM.save_pretrained names tensors."""
    cfg = model.cfg
    hd = cfg.head_dim
    t = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.final_norm.weight}
    if not tie:
        t["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        w = layer.qkv.weight
        t[p + "self_attn.q_proj.weight"] = w[: cfg.n_heads * hd]
        t[p + "self_attn.k_proj.weight"] = w[cfg.n_heads * hd: (cfg.n_heads + cfg.n_kv_heads) * hd]
        t[p + "self_attn.v_proj.weight"] = w[(cfg.n_heads + cfg.n_kv_heads) * hd:]
        t[p + "self_attn.o_proj.weight"] = layer.o_proj.weight
        t[p + "mlp.gate_proj.weight"] = layer.mlp.gate_up.weight[: cfg.d_ff]
        t[p + "mlp.up_proj.weight"] = layer.mlp.gate_up.weight[cfg.d_ff:]
        t[p + "mlp.down_proj.weight"] = layer.mlp.down.weight
        t[p + "input_layernorm.weight"] = layer.attn_norm.weight
        t[p + "post_attention_layernorm.weight"] = layer.mlp_norm.weight
        t[p + "self_attn.rotary_emb.inv_freq"] = torch.zeros(hd // 2)  # old checkpoints carry this
    t = {k: v.detach().clone().contiguous() for k, v in t.items()}
    names = sorted(t)
    for s in range(shards):
        part = {k: t[k] for k in names[s::shards]}
        save_file(part, str(path / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.d_ff,
        "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu", "torch_dtype": "float32",
        "tie_word_embeddings": tie,
    }
    config.update(config_overrides or {})
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("shards", [1, 3])
def test_loader_reproduces_source_model(tmp_path, shards):
    src = build_model(TINY, seed=7)
    write_hf_checkpoint(src, tmp_path, shards=shards)
    loaded = build_model(TINY, weights_dir=str(tmp_path))
    for (n, a), (_, b) in zip(src.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
    assert generate_split(loaded, PROMPT, 8) == generate_split(src, PROMPT, 8)
    rand = build_model(TINY, seed=0)
    assert not torch.equal(rand.embed.weight, loaded.embed.weight)


def test_loader_reads_config_and_ties_embeddings(tmp_path):
    src = build_model(TINY, seed=5)
    write_hf_checkpoint(src, tmp_path, tie=True, config_overrides={"_name_or_path": "me/tiny-llama"})
    cfg = config_from_hf(tmp_path)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (2, 64, 4, 2, 172, 256)
    assert (cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps, cfg.dtype_bytes) == (512, 10000.0, 1e-5, 4)
    assert cfg.hf_name == "me/tiny-llama"
    model = load_model(tmp_path)
    assert torch.equal(model.lm_head.weight, src.embed.weight)


def test_save_hf_weights_round_trip(tmp_path):
    src = build_model(TINY, seed=11)
    save_hf_weights(src, tmp_path)
    back = load_model(tmp_path)
    torch.testing.assert_close(back.forward_monolithic(torch.tensor([PROMPT])),
                               src.forward_monolithic(torch.tensor([PROMPT])))


def test_loader_errors_name_the_problem(tmp_path):
    model = build_model(TINY)
    with pytest.raises(WeightsError, match="does not exist"):
        load_hf_weights(model, tmp_path / "nope")
    with pytest.raises(WeightsError, match="config.json is missing"):
        load_hf_weights(model, tmp_path)

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    write_hf_checkpoint(build_model(TINY, seed=2), ckpt)
    # config disagreeing with the model
    with pytest.raises(WeightsError, match="n_kv_heads: model 4, config.json 2"):
        load_hf_weights(build_model(MHA), ckpt)

    # a missing tensor
    from safetensors.torch import load_file

    f = next(ckpt.glob("*.safetensors"))
    tensors = load_file(str(f))
    down = tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, str(f))
    with pytest.raises(WeightsError, match=r"'model.layers.1.mlp.down_proj.weight' is missing"):
        load_hf_weights(model, ckpt)

    # a wrong shape
    tensors["model.layers.1.mlp.down_proj.weight"] = down[:, :100].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(WeightsError, match=r"down_proj.weight' has shape \(64, 100\), expected \(64, 172\)"):
        load_hf_weights(model, ckpt)

    tensors["model.layers.1.mlp.down_proj.weight"] = down
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:8].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(WeightsError, match=r"k_proj.weight' has shape \(8, 64\), expected \(32, 64\)"):
        load_hf_weights(model, ckpt)

    cfg_path = ckpt / "config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    with pytest.raises(WeightsError, match="rope_scaling"):
        config_from_hf(ckpt)
    del raw["vocab_size"]
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=r"lacks required keys \['vocab_size'\]"):
        config_from_hf(ckpt)


def test_matches_transformers_llama_when_installed(tmp_path):
    """Against Hugging Face's own LlamaForCausalLM (GQA, rotate_half rotary); skipped without transformers."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, torch_dtype="float32", initializer_range=0.2,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_model(tmp_path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf(ids).logits[0]
    torch.testing.assert_close(ours.forward_monolithic(ids)[0], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(split_prefill_logits(ours, PROMPT), ref, atol=1e-4, rtol=1e-4)


def test_rotary_reserve_matches_on_demand_growth():
    from runtime.model import Rotary

    grown, reserved = Rotary(8, max_positions=4), Rotary(8, max_positions=4)
    reserved.reserve(20)
    assert reserved.cos_cached.shape[0] == 20
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    pos = torch.tensor([0, 7, 19])
    for a, b in zip(grown(q, k, pos), reserved(q, k, pos)):  # grown: CPU path grows on demand
        assert torch.allclose(a, b)
    reserved.reserve(5)  # never shrinks
    assert reserved.cos_cached.shape[0] == 20
