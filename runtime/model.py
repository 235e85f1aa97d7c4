"""A Llama-architecture decoder written as operator modules the runtime can place apart.

Each operator is its own ``nn.Module`` with a forward over a flat batch of tokens
(``T`` tokens, no batch/sequence axes), so the serving runtime can run the operator
groups of :data:`runtime.models.OPERATOR_GROUPS` on different workers and batch tokens
from many sequences through one call:

====================  =============================  ===================================
group                 modules                        shapes
====================  =============================  ===================================
embed                 :class:`Embedding`             ids[T] -> x[T, d]
attn                  :class:`RMSNorm` (input),      x[T, d] -> x[T, d];
                      :class:`Rotary`,               q[T,H,hd], k[T,KV,hd] -> rotated;
                      :class:`Attention`             prefill / decode over a KV cache
proj                  :class:`QKVProj`,              x[T, d] -> q, k, v;
                      :class:`OProj`                 a[T, H*hd] -> [T, d]
mlp                   :class:`RMSNorm` (post-attn),  x[T, d] -> [T, d]
                      :class:`GatedMLP`
head                  :class:`RMSNorm` (final),      x[T, d] -> logits[T, V] -> ids[T]
                      :class:`LMHead`, :class:`Sampler`
====================  =============================  ===================================

Residual adds are the caller's: ``h = h + o_proj(attn(...))``; ``h = h + mlp(mlp_norm(h))``.

Conventions follow Hugging Face ``LlamaForCausalLM`` so a real checkpoint loaded with
:mod:`runtime.weights` gives real outputs: RMSNorm computed in float32, rotary embedding
with ``rotate_half`` over the two halves of each head, grouped-query attention where query
head ``i`` reads key/value head ``i // (H // KV)``. The QKV weights are stored fused
(``[q; k; v]`` rows) and so are the MLP gate and up weights (``[gate; up]`` rows), which
is how the shipped Vidur profiles time them (``attn_pre_proj``, ``mlp_up_proj``).

:meth:`LlamaModel.forward_monolithic` is a second, independent implementation of the same
network (explicit softmax attention, no operator modules) used as the test reference.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models import ModelConfig

__all__ = [
    "Embedding",
    "RMSNorm",
    "QKVProj",
    "Rotary",
    "Attention",
    "OProj",
    "GatedMLP",
    "LMHead",
    "Sampler",
    "DecoderLayer",
    "LlamaModel",
    "build_model",
    "init_weights",
    "generate_split",
    "generate_monolithic",
]

#: Standard deviation of the random normal initialisation (Hugging Face ``initializer_range``).
INIT_STD = 0.02


def _empty(shape: tuple[int, ...], device: torch.device | str | None, dtype: torch.dtype | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


class Embedding(nn.Module):
    """Token embedding table ``weight[V, d]``; ``forward(ids[T]) -> x[T, d]``."""

    def __init__(self, vocab_size: int, d_model: int, device=None, dtype=None) -> None:
        super().__init__()
        self.vocab_size, self.d_model = vocab_size, d_model
        self.weight = _empty((vocab_size, d_model), device, dtype)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, computed in float32 then cast back.

    ``y = weight * (x / sqrt(mean(x^2) + eps))``; ``forward(x[..., d]) -> [..., d]``.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class QKVProj(nn.Module):
    """Fused Q, K and V projection (one GEMM), no bias.

    ``weight`` has ``(H + 2*KV) * hd`` rows: the q_proj rows, then k_proj, then v_proj.
    ``forward(x[T, d]) -> (q[T, H, hd], k[T, KV, hd], v[T, KV, hd])``.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.weight = _empty(((n_heads + 2 * n_kv_heads) * head_dim, d_model), device, dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = F.linear(x, self.weight)
        hd = self.head_dim
        q, k, v = qkv.split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        T = x.shape[0]
        return q.view(T, self.n_heads, hd), k.view(T, self.n_kv_heads, hd), v.view(T, self.n_kv_heads, hd)


class Rotary(nn.Module):
    """Rotary position embedding (Hugging Face ``rotate_half`` convention).

    Frequencies ``theta^(-2i/hd)`` for ``i < hd/2``; cos/sin are cached for
    ``max_positions`` positions (on CPU the cache grows on demand; on CUDA call :meth:`reserve`). Computed in float32.
    ``forward(q[T,H,hd], k[T,KV,hd], positions[T]) -> (q, k)`` rotated, same dtypes.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, max_positions: int = 4096, device=None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._build_cache(max_positions)

    def _build_cache(self, n: int) -> None:
        pos = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
        ang = torch.outer(pos, self.inv_freq)  # [n, hd/2]
        ang = torch.cat([ang, ang], dim=-1)  # [n, hd]
        self.register_buffer("cos_cached", ang.cos(), persistent=False)
        self.register_buffer("sin_cached", ang.sin(), persistent=False)

    def reserve(self, n: int) -> None:
        """Make the cos/sin cache hold positions ``0 .. n-1``.

        CPU calls grow the cache on demand; CUDA calls do not (checking the largest
        position would synchronise the device on every call), so callers that go past
        ``max_positions`` on a GPU reserve first.
        """
        if n > self.cos_cached.shape[0]:
            self._build_cache(n)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= self.cos_cached.shape[0]:
            self._build_cache(2 * int(positions.max()) + 1)
        cos = self.cos_cached[positions].unsqueeze(1)  # [T, 1, hd]
        sin = self.sin_cached[positions].unsqueeze(1)
        q32, k32 = q.float(), k.float()
        q_out = q32 * cos + self._rotate_half(q32) * sin
        k_out = k32 * cos + self._rotate_half(k32) * sin
        return q_out.to(q.dtype), k_out.to(k.dtype)


class Attention(nn.Module):
    """Scaled dot-product attention with grouped-query heads; holds no weights.

    Scale ``1/sqrt(hd)``. Query head ``i`` uses key/value head ``i // (H // KV)``.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.groups = n_heads // n_kv_heads

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over ONE sequence of ``T`` tokens.

        Args:
            q: ``[T, H, hd]``; k, v: ``[T, KV, hd]`` (already rotated).
        Returns:
            ``[T, H*hd]``.
        """
        T = q.shape[0]
        # 4-D [1, H, T, hd] so the fused (flash / memory-efficient) kernels are eligible on CUDA
        qh = q.transpose(0, 1).unsqueeze(0)
        kh = k.transpose(0, 1).repeat_interleave(self.groups, dim=0).unsqueeze(0)
        vh = v.transpose(0, 1).repeat_interleave(self.groups, dim=0).unsqueeze(0)
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)[0]  # [H, T, hd]
        return out.transpose(0, 1).reshape(T, self.n_heads * self.head_dim)

    def prefill_packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: Sequence[int]) -> torch.Tensor:
        """Causal attention over several sequences packed back to back along ``T``.

        ``seq_lens`` are the token counts of the sequences in order; they must sum to ``T``.
        Each sequence attends only to itself. Returns ``[T, H*hd]``.
        """
        if sum(seq_lens) != q.shape[0]:
            raise ValueError(f"seq_lens sum to {sum(seq_lens)} but q holds {q.shape[0]} tokens")
        outs, start = [], 0
        for n in seq_lens:
            outs.append(self.prefill(q[start:start + n], k[start:start + n], v[start:start + n]))
            start += n
        return torch.cat(outs, dim=0)

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        lengths: torch.Tensor,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """One new query token per sequence attending to its cached keys/values.

        Args:
            q: ``[B, H, hd]`` (already rotated).
            k_cache, v_cache: ``[B, Tmax, KV, hd]``; the new token's k, v already written.
            lengths: ``[B]`` valid cached positions per sequence (>= 1); positions at or
                beyond ``lengths[b]`` are padding and are masked out.
            max_length: optional bound on ``lengths`` (tokens); when given only the first
                ``max_length`` cache positions are read (saves work on long padded caches
                without a device sync).
        Returns:
            ``[B, H*hd]``.
        """
        B = q.shape[0]
        if max_length is not None:
            k_cache, v_cache = k_cache[:, :max_length], v_cache[:, :max_length]
        Tmax = k_cache.shape[1]
        # GQA without copying K/V: the G query heads sharing a KV head act as G queries.
        qg = q.view(B, self.n_kv_heads, self.groups, self.head_dim)  # [B, KV, G, hd]
        kh = k_cache.transpose(1, 2)  # [B, KV, Tmax, hd]
        vh = v_cache.transpose(1, 2)
        valid = torch.arange(Tmax, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # [B, Tmax]
        out = F.scaled_dot_product_attention(qg, kh, vh, attn_mask=valid[:, None, None, :])  # [B, KV, G, hd]
        return out.reshape(B, self.n_heads * self.head_dim)


class OProj(nn.Module):
    """Attention output projection ``weight[d, H*hd]``; ``forward(x[T, H*hd]) -> [T, d]``."""

    def __init__(self, n_heads: int, head_dim: int, d_model: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = _empty((d_model, n_heads * head_dim), device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class GatedMLP(nn.Module):
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))`` with gate and up fused in one GEMM.

    ``gate_up.weight`` is ``[2*d_ff, d]`` (gate rows then up rows), ``down.weight`` is
    ``[d, d_ff]``. With ``gated=False`` it is a plain ``down(gelu(up(x)))`` MLP and
    ``gate_up.weight`` holds only the ``d_ff`` up rows. The three stages are exposed
    separately (``up_proj``, ``act``, ``down_proj``) so the profiler can time them as
    ``mlp_up_proj``, ``mlp_act`` and ``mlp_down_proj``.
    """

    def __init__(self, d_model: int, d_ff: int, gated: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.d_ff, self.gated = d_ff, gated
        self.gate_up = nn.Module()
        self.gate_up.weight = _empty(((2 if gated else 1) * d_ff, d_model), device, dtype)
        self.down = nn.Module()
        self.down.weight = _empty((d_model, d_ff), device, dtype)

    def up_proj(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, d] -> [T, 2*d_ff]`` (gate and up) or ``[T, d_ff]`` when not gated."""
        return F.linear(x, self.gate_up.weight)

    def act(self, gu: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` -> ``[T, d_ff]`` (``gelu(up)`` when not gated)."""
        if not self.gated:
            return F.gelu(gu, approximate="tanh")
        gate, up = gu.split(self.d_ff, dim=-1)
        return F.silu(gate) * up

    def down_proj(self, h: torch.Tensor) -> torch.Tensor:
        """``[T, d_ff] -> [T, d]``."""
        return F.linear(h, self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class LMHead(nn.Module):
    """Output projection to the vocabulary ``weight[V, d]``; ``forward(x[T, d]) -> logits[T, V]``."""

    def __init__(self, d_model: int, vocab_size: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = _empty((vocab_size, d_model), device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Sampler(nn.Module):
    """Pick one token per row of logits.

    ``forward(logits[T, V], temperature=0.0, generator=None) -> ids[T]``. A temperature
    of 0 (per row when a ``[T]`` tensor is given) is greedy argmax; a positive
    temperature samples from ``softmax(logits / temperature)`` using ``generator``.
    """

    def forward(
        self,
        logits: torch.Tensor,
        temperature: float | torch.Tensor = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        if not torch.is_tensor(temperature):
            if temperature < 0:
                raise ValueError(f"temperature must be >= 0, got {temperature}")
            if temperature == 0:
                return greedy
            temperature = torch.full((logits.shape[0],), float(temperature), device=logits.device)
        temp = temperature.to(device=logits.device, dtype=torch.float32).reshape(-1)
        if temp.shape[0] != logits.shape[0]:
            raise ValueError(f"temperature has {temp.shape[0]} entries for {logits.shape[0]} rows of logits")
        probs = torch.softmax(logits.float() / temp.clamp_min(1e-6)[:, None], dim=-1)
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return torch.where(temp > 0, sampled, greedy)


class DecoderLayer(nn.Module):
    """One decoder block as separate operators; the caller does the residual adds.

    ``h = h + o_proj(attn(rope(qkv(attn_norm(h)))))``; ``h = h + mlp(mlp_norm(h))``.
    Can be built on its own (the profiler builds a single layer of a big model).
    """

    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, device, dtype)
        self.qkv = QKVProj(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, hd, device, dtype)
        self.rope = Rotary(hd, cfg.rope_theta, cfg.max_seq_len, device)
        self.attn = Attention(cfg.n_heads, cfg.n_kv_heads, hd)
        self.o_proj = OProj(cfg.n_heads, hd, cfg.d_model, device, dtype)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, device, dtype)
        self.mlp = GatedMLP(cfg.d_model, cfg.d_ff, cfg.gated_mlp, device, dtype)

    def prefill(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run one sequence ``h[T, d]`` at ``positions[T]`` through the layer.

        Returns ``(h_out[T, d], k[T, KV, hd], v[T, KV, hd])`` with k rotated, for the cache.
        """
        q, k, v = self.qkv(self.attn_norm(h))
        q, k = self.rope(q, k, positions)
        h = h + self.o_proj(self.attn.prefill(q, k, v))
        h = h + self.mlp(self.mlp_norm(h))
        return h, k, v


class LlamaModel(nn.Module):
    """The whole decoder: embed, layers, final norm, LM head and sampler."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, device, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, device, dtype) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, device, dtype)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, device, dtype)
        self.sampler = Sampler()

    @torch.no_grad()
    def forward_monolithic(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Plain causal forward over ``token_ids[B, S]`` -> logits ``[B, S, V]``.

        Written without the operator modules' forward methods (explicit softmax attention,
        grouped heads by reshaping, inline norms and rotary) but with the same weight
        tensors, so tests can check the operator-split path against it.
        """
        cfg = self.cfg
        B, S = token_ids.shape
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G = H // KV
        dev = self.embed.weight.device

        def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            var = (x.float() ** 2).mean(dim=-1, keepdim=True)
            return w * (x.float() / torch.sqrt(var + cfg.norm_eps)).to(x.dtype)

        exps = torch.arange(hd // 2, device=dev, dtype=torch.float64) * 2.0 / hd
        freqs = torch.pow(torch.tensor(cfg.rope_theta, dtype=torch.float64, device=dev), -exps)
        angles = torch.arange(S, device=dev, dtype=torch.float64)[:, None] * freqs[None, :]  # [S, hd/2]
        c = angles.cos().float()[None, :, None, :]
        s = angles.sin().float()[None, :, None, :]

        def rotate(x: torch.Tensor) -> torch.Tensor:  # x [B, S, n, hd]
            x1, x2 = x.float()[..., : hd // 2], x.float()[..., hd // 2:]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        h = self.embed.weight[token_ids]  # [B, S, d]
        for layer in self.layers:
            x = rms(h, layer.attn_norm.weight)
            wq, wk, wv = layer.qkv.weight.split([H * hd, KV * hd, KV * hd], dim=0)
            q = rotate((x @ wq.T).view(B, S, H, hd)).view(B, S, KV, G, hd)
            k = rotate((x @ wk.T).view(B, S, KV, hd))
            v = (x @ wv.T).view(B, S, KV, hd)
            scores = torch.einsum("bskgd,btkd->bkgst", q.float(), k.float()) / math.sqrt(hd)
            scores = scores.masked_fill(~causal, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            attn = torch.einsum("bkgst,btkd->bskgd", probs, v.float()).to(h.dtype).reshape(B, S, H * hd)
            h = h + attn @ layer.o_proj.weight.T
            x = rms(h, layer.mlp_norm.weight)
            w = layer.mlp.gate_up.weight
            if cfg.gated_mlp:
                wg, wu = w.split(cfg.d_ff, dim=0)
                inner = F.silu(x @ wg.T) * (x @ wu.T)
            else:
                inner = F.gelu(x @ w.T, approximate="tanh")
            h = h + inner @ layer.mlp.down.weight.T
        return rms(h, self.final_norm.weight) @ self.lm_head.weight.T

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`forward_monolithic` (``[B, S] -> [B, S, V]``)."""
        return self.forward_monolithic(token_ids)


@torch.no_grad()
def init_weights(module: nn.Module, seed: int = 0, std: float = INIT_STD) -> None:
    """Random-initialise every matrix of ``module`` from ``N(0, std^2)``; norm weights to 1.

    Deterministic for a given ``seed``, device and parameter order (a generator on the
    parameters' device is used, so CPU and CUDA give different draws).
    """
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in module.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
            continue
        gen = gens.get(p.device)
        if gen is None:
            gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        if p.dtype in (torch.float32, torch.float64):
            p.normal_(0.0, std, generator=gen)
        else:  # draw in float32 for the same statistics at low precision
            p.copy_(torch.empty(p.shape, device=p.device, dtype=torch.float32).normal_(0.0, std, generator=gen))


def build_model(
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | None = None,
    seed: int = 0,
) -> LlamaModel:
    """Build the operator-split model of shape ``cfg`` in eval mode, gradients off.

    Weights are random (``N(0, 0.02^2)``, norms 1, seeded by ``seed``) unless
    ``weights_dir`` names a local Hugging Face-format directory (``config.json`` +
    ``*.safetensors``), whose shapes must match ``cfg`` (see :mod:`runtime.weights`).
    """
    model = LlamaModel(cfg, device=device, dtype=dtype)
    if weights_dir is None:
        init_weights(model, seed)
    else:
        from runtime.weights import load_hf_weights

        load_hf_weights(model, weights_dir)
    return model.eval().requires_grad_(False)


def _check_length(model: LlamaModel, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty; at least one prompt token is needed")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = len(prompt_ids) + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds "
            f"{model.cfg.name}'s max_seq_len {model.cfg.max_seq_len}"
        )
    bad = [t for t in prompt_ids if not 0 <= int(t) < model.cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {model.cfg.vocab_size}): {bad[:5]}")


@torch.no_grad()
def generate_split(model: LlamaModel, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding operator by operator with a per-sequence KV cache.

    Prefill runs the whole prompt through each layer (:meth:`Attention.prefill`), then each
    new token is decoded with :meth:`Attention.decode` over the cache. Returns only the
    ``max_new_tokens`` generated ids (not the prompt). The reference path for the
    serving runtime's tests.
    """
    _check_length(model, prompt_ids, max_new_tokens)
    if max_new_tokens == 0:
        return []
    cfg = model.cfg
    dev = model.embed.weight.device
    dtype = model.embed.weight.dtype
    P = len(prompt_ids)
    tmax = P + max_new_tokens
    k_cache = [torch.zeros(1, tmax, cfg.n_kv_heads, cfg.head_dim, device=dev, dtype=dtype) for _ in model.layers]
    v_cache = [torch.zeros_like(k) for k in k_cache]

    ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=dev)
    h = model.embed(ids)
    pos = torch.arange(P, device=dev)
    for i, layer in enumerate(model.layers):
        h, k, v = layer.prefill(h, pos)
        k_cache[i][0, :P], v_cache[i][0, :P] = k, v
    out: list[int] = []
    token = model.sampler(model.lm_head(model.final_norm(h[-1:])))
    out.append(int(token[0]))
    for step in range(1, max_new_tokens):
        n = P + step  # cache length after writing the new token
        h = model.embed(token)
        pos = torch.tensor([n - 1], device=dev)
        lengths = torch.tensor([n], device=dev)
        for i, layer in enumerate(model.layers):
            q, k, v = layer.qkv(layer.attn_norm(h))
            q, k = layer.rope(q, k, pos)
            k_cache[i][0, n - 1], v_cache[i][0, n - 1] = k[0], v[0]
            a = layer.attn.decode(q, k_cache[i], v_cache[i], lengths)
            h = h + layer.o_proj(a)
            h = h + layer.mlp(layer.mlp_norm(h))
        token = model.sampler(model.lm_head(model.final_norm(h)))
        out.append(int(token[0]))
    return out


@torch.no_grad()
def generate_monolithic(model: LlamaModel, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding via :meth:`LlamaModel.forward_monolithic`, recomputing the prefix each step.

    Returns only the generated ids.
    """
    _check_length(model, prompt_ids, max_new_tokens)
    dev = model.embed.weight.device
    seq = list(int(t) for t in prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.forward_monolithic(torch.tensor([seq], dtype=torch.long, device=dev))
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
    return out
