"""Model shapes: one place that says how big each operator group of a model is.

Every number here is a property of the architecture (read from the model's published
config.json), not a measurement. Sizes are in bytes, counts in elements; ``dtype_bytes``
is 2 for fp16/bf16 serving.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

#: The operator groups opscale scales independently, in the order a token meets them.
#: embed: token embedding; attn: attention kernel with its KV cache (+ RoPE, input norm);
#: proj: QKV and O projections; mlp: gated MLP (+ post-attention norm, residual adds);
#: head: final norm, LM head and sampling.
OPERATOR_GROUPS: tuple[str, ...] = ("embed", "attn", "proj", "mlp", "head")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-architecture decoder.

    Attributes:
        name: opscale's short name (``llama-2-70b``).
        hf_name: Hugging Face organisation/model, also the folder of its shipped profile.
        n_layers: decoder layers.
        d_model: hidden size (elements).
        n_heads: query heads.
        n_kv_heads: key/value heads (grouped-query attention when < n_heads).
        d_ff: MLP intermediate size (elements).
        vocab_size: tokens in the vocabulary.
        max_seq_len: longest context the model supports (tokens).
        rope_theta: rotary embedding base.
        norm_eps: RMSNorm epsilon.
        gated_mlp: SwiGLU (gate, up, down) when True, else a plain up/GELU/down MLP.
        dtype_bytes: bytes per weight / activation element when served (2 = fp16/bf16).
    """

    name: str
    hf_name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    gated_mlp: bool = True
    dtype_bytes: int = 2
    notes: str = field(default="", compare=False)

    @property
    def head_dim(self) -> int:
        """Elements per attention head."""
        return self.d_model // self.n_heads

    @property
    def qkv_out(self) -> int:
        """Output width of the fused QKV projection (elements)."""
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token holds across all layers (K and V)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes

    def group_params(self, group: str) -> int:
        """Parameters (elements) of one operator group, summed over all layers."""
        d, L = self.d_model, self.n_layers
        if group == "embed":
            return self.vocab_size * d
        if group == "attn":
            return L * d  # input RMSNorm weights; the kernel itself has none
        if group == "proj":
            return L * (d * self.qkv_out + self.n_heads * self.head_dim * d)
        if group == "mlp":
            mats = 3 if self.gated_mlp else 2
            return L * (mats * d * self.d_ff + d)
        if group == "head":
            return self.vocab_size * d + d
        raise KeyError(f"unknown operator group {group!r}; expected one of {OPERATOR_GROUPS}")

    def group_weight_bytes(self, group: str) -> int:
        """Weight bytes of one operator group over all layers, unsharded."""
        return self.group_params(group) * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        """Weight bytes of the whole model, unsharded."""
        return sum(self.group_weight_bytes(g) for g in OPERATOR_GROUPS)

    def group_flops_per_token(self, group: str) -> float:
        """Matmul FLOPs per token of one group over all layers, excluding attention scores."""
        if group == "attn":
            return 0.0
        return 2.0 * self.group_params(group)

    def attention_flops(self, q_tokens: int, context: int) -> float:
        """FLOPs of QK^T and PV for ``q_tokens`` queries over ``context`` keys, all layers."""
        return 4.0 * self.n_layers * self.n_heads * self.head_dim * q_tokens * context


MODELS: dict[str, ModelConfig] = {
    m.name: m
    for m in [
        ModelConfig("llama-2-7b", "meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 32000, 4096),
        ModelConfig("llama-2-70b", "meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 28672, 32000, 4096),
        ModelConfig("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, 8192,
                    rope_theta=500000.0),
        ModelConfig("llama-3-70b", "meta-llama/Meta-Llama-3-70B", 80, 8192, 64, 8, 28672, 128256, 8192,
                    rope_theta=500000.0),
        ModelConfig("codellama-34b", "codellama/CodeLlama-34b-Instruct-hf", 48, 8192, 64, 8, 22016, 32000,
                    16384, rope_theta=1000000.0),
        ModelConfig("qwen-72b", "Qwen/Qwen-72B", 80, 8192, 64, 64, 24576, 152064, 32768,
                    rope_theta=1000000.0, norm_eps=1e-6,
                    notes="QKV bias of the original is not modelled (under 0.01% of weights)."),
        ModelConfig("internlm-20b", "internlm/internlm-20b", 60, 5120, 40, 40, 13824, 103168, 4096,
                    norm_eps=1e-6),
        ModelConfig("phi-2", "microsoft/phi-2", 32, 2560, 32, 32, 10240, 51200, 2048, gated_mlp=False,
                    notes="Shape only: phi-2 uses LayerNorm and parallel attention, not Llama blocks."),
        # Small shapes for CPU tests and the CPU fidelity runs; not real models.
        ModelConfig("tiny", "opscale/tiny", 2, 64, 4, 2, 172, 256, 512, dtype_bytes=4),
        ModelConfig("small", "opscale/small", 4, 256, 8, 4, 688, 1024, 1024, dtype_bytes=4),
    ]
}


def get_model(name: str) -> ModelConfig:
    """Return the preset called ``name`` (case-insensitive); raises KeyError naming the choices."""
    key = name.lower()
    if key not in MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[key]


def with_dtype(cfg: ModelConfig, dtype_bytes: int) -> ModelConfig:
    """Same shape served at another precision."""
    return replace(cfg, dtype_bytes=dtype_bytes)
