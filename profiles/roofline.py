"""Roofline models for what the shipped data does not measure (all times in ms).

* Decode attention (``attn_decode``), per layer and GPU: reads the KV cache of ``batch``
  sequences at KV length ``context``:
  ``bytes = batch * context * 2 * (n_kv_heads / tp) * head_dim * dtype_bytes`` and does
  ``flops = 4 * (n_heads / tp) * head_dim * batch * context``; time =
  ``max(bytes / hbm_bw, flops / matmul_flops) + launch_floor``.
* Prefill attention (``attn_prefill``): ``batch`` prompts of ``context`` tokens each,
  causal, so ``flops = 2 * (n_heads / tp) * head_dim * batch * context * (context + 1)``
  (QK^T and PV over the lower triangle; 4*h*d per query-key pair, half the pairs); bytes
  = Q, K, V read + O written once; time = ``max(flops / matmul_flops, bytes / hbm_bw) +
  launch_floor``. Using the measured dense-matmul rate makes this optimistic for kernels
  below matmul efficiency (FlashAttention-2 reaches well under it); measured attention
  rows from the opscale profiler replace it (see :mod:`profiles.db`).
* Sampling: softmax and top-k/top-p over fp32 logits of ``batch`` sequences, modelled as
  three passes over ``batch * vocab * 4`` bytes plus four kernel launches.
* ``launch_floor`` per GPU: the smallest measured kernel time on that GPU, read from the
  shipped profiles (the median over models and TP degrees of ``attn_rope`` at 1 token).

All functions broadcast over numpy arrays.
"""
from __future__ import annotations

import numpy as np

from profiles.gpus import GPUSpec
from runtime.models import ModelConfig

#: Launch count of a sampling step (softmax, top-k/top-p filter, multinomial draw, gather).
SAMPLING_KERNELS = 4
#: Passes over the fp32 logits a sampling step makes (read for softmax, write probs, read to draw).
SAMPLING_PASSES = 3


def attn_decode_ms(m: ModelConfig, g: GPUSpec, batch, context, tp: int, floor_ms: float):
    """Decode attention time of one layer (ms) for ``batch`` sequences at KV length ``context``."""
    batch = np.asarray(batch, dtype=np.float64)
    context = np.asarray(context, dtype=np.float64)
    kv = batch * context * 2.0 * (m.n_kv_heads / tp) * m.head_dim * m.dtype_bytes
    flops = 4.0 * (m.n_heads / tp) * m.head_dim * batch * context
    t = np.maximum(kv / g.hbm_bw_bytes_per_s, flops / g.matmul_flops) * 1e3 + floor_ms
    return np.where(batch > 0, t, 0.0)


def attn_prefill_ms(m: ModelConfig, g: GPUSpec, batch, context, tp: int, floor_ms: float):
    """Causal prefill attention time of one layer (ms): ``batch`` prompts of ``context`` tokens."""
    batch = np.asarray(batch, dtype=np.float64)
    context = np.asarray(context, dtype=np.float64)
    hd = m.head_dim
    flops = 2.0 * (m.n_heads / tp) * hd * batch * context * (context + 1.0)
    tokens = batch * context
    nbytes = tokens * ((2 * m.n_heads + 2 * m.n_kv_heads) / tp) * hd * m.dtype_bytes
    t = np.maximum(flops / g.matmul_flops, nbytes / g.hbm_bw_bytes_per_s) * 1e3 + floor_ms
    return np.where(tokens > 0, t, 0.0)


def sampling_ms(m: ModelConfig, g: GPUSpec, batch, floor_ms: float):
    """Sampling time of one step (ms) for ``batch`` sequences."""
    batch = np.asarray(batch, dtype=np.float64)
    nbytes = SAMPLING_PASSES * batch * m.vocab_size * 4.0
    t = nbytes / g.hbm_bw_bytes_per_s * 1e3 + SAMPLING_KERNELS * floor_ms
    return np.where(batch > 0, t, 0.0)


def gemm_roofline_ms(flops, weight_bytes, act_bytes, g: GPUSpec, floor_ms: float):
    """max(compute, memory) time of a GEMM plus the launch floor (ms)."""
    flops = np.asarray(flops, dtype=np.float64)
    mem = (np.asarray(weight_bytes, dtype=np.float64) + np.asarray(act_bytes, dtype=np.float64))
    return np.maximum(flops / g.matmul_flops, mem / g.hbm_bw_bytes_per_s) * 1e3 + floor_ms
