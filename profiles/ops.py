"""Operator names, the operator-group table and per-operator shapes (weights, FLOPs, bytes).

Everything here is arithmetic on :class:`runtime.models.ModelConfig`; no measurements.
Per-layer quantities are for one layer on one GPU of a ``tp``-way tensor-parallel replica.
"""
from __future__ import annotations

from runtime.models import OPERATOR_GROUPS, ModelConfig

#: Operators timed by the shipped Vidur profiles (per layer, except ``emb``: once per step).
VIDUR_OPS: tuple[str, ...] = (
    "emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
    "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add",
)
#: Operators with no shipped measurement: attention kernels (roofline), LM head (derived from
#: the measured GEMM curve) and sampling (roofline floor).
MODELLED_OPS: tuple[str, ...] = ("attn_prefill", "attn_decode", "lm_head", "sampling")
#: Every operator ProfileDB answers for.
ALL_OPS: tuple[str, ...] = VIDUR_OPS + MODELLED_OPS
#: Operators whose latency depends on context and batch, not only on tokens.
ATTENTION_OPS: tuple[str, ...] = ("attn_prefill", "attn_decode")
#: Models whose blocks have no separate post-attention norm (parallel attention + MLP).
PARALLEL_BLOCK_MODELS: frozenset[str] = frozenset({"phi-2"})

#: Operators of each group as (op, calls per layer). ``{attn}`` is attn_prefill or attn_decode
#: by phase. embed and head run once per step, the others once per layer.
GROUP_OPS: dict[str, tuple[tuple[str, int], ...]] = {
    "embed": (("emb", 1),),
    "attn": (("input_layernorm", 1), ("attn_rope", 1), ("{attn}", 1)),
    "proj": (("attn_pre_proj", 1), ("attn_post_proj", 1)),
    "mlp": (("post_attention_layernorm", 1), ("mlp_up_proj", 1), ("mlp_act", 1), ("mlp_down_proj", 1),
            ("add", 2)),
    # The final RMSNorm has the shape of a layer's input norm, so it is timed by that curve.
    "head": (("input_layernorm", 1), ("lm_head", 1), ("sampling", 1)),
}
#: Groups that run once per step rather than once per layer.
ONCE_PER_STEP: frozenset[str] = frozenset({"embed", "head"})
#: Groups that pay one all-reduce per layer under tensor parallelism (after O proj, after MLP down).
ALL_REDUCE_GROUPS: frozenset[str] = frozenset({"proj", "mlp"})
PHASES: tuple[str, ...] = ("decode", "prefill")

assert set(GROUP_OPS) == set(OPERATOR_GROUPS)


def group_ops(group: str, model: ModelConfig, phase: str) -> list[tuple[str, int]]:
    """(op, calls) of ``group`` for one layer (or one step for embed/head) in ``phase``."""
    out = []
    for op, n in GROUP_OPS[group]:
        if op == "{attn}":
            op = "attn_prefill" if phase == "prefill" else "attn_decode"
        if op == "post_attention_layernorm" and model.name in PARALLEL_BLOCK_MODELS:
            continue
        out.append((op, n))
    return out


def op_params(op: str, m: ModelConfig, tp: int = 1) -> float:
    """Weight elements one GPU holds for ``op`` (one layer; embed/LM head: the whole table)."""
    d = m.d_model
    if op in ("emb", "lm_head"):
        return m.vocab_size * d / tp
    if op in ("input_layernorm", "post_attention_layernorm"):
        return float(d)
    if op == "attn_pre_proj":
        return d * m.qkv_out / tp
    if op == "attn_post_proj":
        return m.n_heads * m.head_dim * d / tp
    if op == "mlp_up_proj":
        return (2 if m.gated_mlp else 1) * d * m.d_ff / tp
    if op == "mlp_down_proj":
        return m.d_ff * d / tp
    return 0.0


def gemm_flops(op: str, m: ModelConfig, tokens: float, tp: int = 1) -> float:
    """Matmul FLOPs of one call of a GEMM op over ``tokens`` tokens on one GPU (2 per MAC)."""
    if op == "emb":
        return 0.0
    return 2.0 * tokens * op_params(op, m, tp)


def activation_bytes(op: str, m: ModelConfig, tokens: float, tp: int = 1) -> float:
    """Largest activation tensor ``op`` writes for ``tokens`` tokens on one GPU (bytes)."""
    b, d = m.dtype_bytes, m.d_model
    if op == "attn_pre_proj":
        return tokens * m.qkv_out / tp * b
    if op in ("mlp_up_proj",):
        return tokens * (2 if m.gated_mlp else 1) * m.d_ff / tp * b
    if op in ("mlp_act",):
        return tokens * m.d_ff / tp * b
    if op in ("lm_head", "sampling"):
        return tokens * m.vocab_size / tp * 4  # fp32 logits
    return tokens * d * b
