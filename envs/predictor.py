"""Execution-time predictor: the only module of the simulator that talks to ProfileDB.

Everything the world model needs to know about time, memory and power on a GPU comes
through :class:`ExecutionPredictor`: per-group latency at a token count (ms, all layers of
the group, TP all-reduce included), the calibrated per-iteration overhead (ms), send/recv
of activations between pools (ms), GPU memory (bytes) and the power curve (watts).
Answers are memoised on a quantised grid of (tokens, context) so a discrete-event run or
a training run asks ProfileDB only a few thousand times.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from runtime.models import ModelConfig, get_model


class ProfileSource(Protocol):
    """What the predictor needs from profiles.ProfileDB (see docs/ARCHITECTURE.md)."""

    def group_latency(self, group: str, gpu: str, model: str, tokens: int, context: int = 0,
                      batch: int = 1, tp: int = 1, phase: str = "decode") -> float: ...

    def send_recv_ms(self, gpu: str, nbytes: float) -> float: ...

    def power_w(self, gpu: str, utilisation: float) -> float: ...

    def gpu(self, gpu: str) -> Any: ...


def _quantise(x: float) -> int:
    if x <= 64:
        return max(int(round(x)), 0)
    e = math.floor(math.log2(x)) - 4
    step = 1 << e
    return int(round(x / step)) * step


_Q: dict[int, int] = {}


def power_percent(utilisation: float) -> int:
    """The whole percent (0..100) the power model reads a busy share at, clipped to [0, 1]."""
    return int(round(min(max(utilisation, 0.0), 1.0) * 100))


def quantise(x: float) -> int:
    """Round a token count to a grid: exact up to 64, then 16 steps per power of two."""
    if x <= 64:
        return int(x + 0.5) if x > 0 else 0
    n = int(x + 0.5)
    hit = _Q.get(n)
    if hit is None:
        hit = _Q[n] = _quantise(n) if len(_Q) < 1_000_000 else _quantise(x)
    return hit


@dataclass(frozen=True)
class GPUInfo:
    """The GPU facts the world model uses (bytes, watts)."""

    name: str
    memory_bytes: int
    idle_w: float
    peak_w: float


class ExecutionPredictor:
    """Latency, transfer, memory and power of one model on one GPU type.

    Args:
        db: a ProfileDB (or anything with its interface).
        model: model preset name.
        gpu: GPU name.
    """

    def __init__(self, db: ProfileSource, model: str, gpu: str) -> None:
        self.db = db
        self.model_name = model
        self.cfg: ModelConfig = get_model(model)
        self.gpu_name = gpu
        spec = db.gpu(gpu)
        self.gpu = GPUInfo(gpu, int(spec.memory_bytes), float(spec.idle_w), float(spec.peak_w))
        self._group = lru_cache(maxsize=200_000)(self._group_uncached)
        self._ovp = self._overhead_params()
        self._send = lru_cache(maxsize=20_000)(self._send_uncached)
        self._power = lru_cache(maxsize=2_048)(self._power_uncached)
        self._wb: dict[tuple, float] = {}  # weight bytes per GPU by (group, tp)
        self._ab: dict[tuple, float] = {}  # activation bytes per GPU by (group, tokens, tp)
        self._kvb = int(self.cfg.kv_bytes_per_token)

    # ------------------------------------------------------------------ latency
    def _group_uncached(self, group: str, tokens: int, context: int, batch: int, tp: int, phase: str) -> float:
        if tokens <= 0:
            return 0.0
        with warnings.catch_warnings():  # ProfileDB flags extrapolation; it keeps the count in db.flags
            warnings.simplefilter("ignore")
            return float(self.db.group_latency(group, self.gpu_name, self.model_name, tokens, context=context,
                                               batch=max(batch, 1), tp=tp, phase=phase))

    def group_ms(self, group: str, tokens: float, context: float = 0, batch: float = 1, tp: int = 1,
                 phase: str = "decode") -> float:
        """ms for one call of ``group`` over all its layers at ``tokens`` tokens.

        ``context`` is the KV length (decode) or prompt length (prefill) in tokens and only
        matters for ``attn``; ``batch`` is sequences. Inputs are quantised (see quantise).
        """
        if tokens <= 0:
            return 0.0
        if group == "attn":
            q_ctx = quantise(context)
            return self._group(group, quantise(tokens), q_ctx, quantise(batch), tp, phase)
        return self._group(group, quantise(tokens), 0, 1, tp, "decode")

    def _overhead_params(self) -> tuple[float, float, float, float, float]:
        ov = getattr(self.db, "overhead", None)
        if ov is None:
            return (0.0, 0.0, 0.0, 0.0, 0.0)
        return (float(ov.floor_ms_per_layer) * self.cfg.n_layers, float(ov.base_ms), float(ov.per_seq_ms),
                float(ov.prefill_base_ms), float(ov.prefill_kernel_scale))

    def step_ms(self, kernel_ms: float, decode_seqs: float, prefill_kernel_ms: float = 0.0) -> float:
        """Iteration time (ms) from its kernel time, with the calibrated serving overhead.

        profiles.overhead fits decode steps as max(kernel, floor) + base + per_seq * batch and
        prefill steps as max(kernel, floor) + prefill_base + scale * kernel. A mixed iteration
        (decodes plus a prefill chunk) pays the floor once, the decode terms for its decodes and
        the prefill terms for the share of the kernel time that is prefill.
        """
        if kernel_ms <= 0:
            return 0.0
        floor, base, per_seq, pbase, pscale = self._ovp
        t = max(kernel_ms, floor)
        if decode_seqs > 0:
            t += base + per_seq * decode_seqs
        if prefill_kernel_ms > 0:
            t += pbase + pscale * prefill_kernel_ms
        return t

    def _send_uncached(self, nbytes: int) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(self.db.send_recv_ms(self.gpu_name, nbytes))

    def send_ms(self, tokens: float) -> float:
        """ms to move ``tokens`` hidden states (d_model x dtype bytes each) between GPUs."""
        if tokens <= 0:
            return 0.0
        nbytes = quantise(tokens) * self.cfg.d_model * self.cfg.dtype_bytes
        return self._send(nbytes)

    def kv_send_ms(self, tokens: float, tp: int = 1) -> float:
        """ms to copy ``tokens`` cached tokens of KV between two units of ``tp`` GPUs (each GPU
        sends its 1/tp shard, in parallel)."""
        if tokens <= 0:
            return 0.0
        return self._send(int(quantise(tokens) * self.kv_bytes_per_token // max(tp, 1)))

    # ------------------------------------------------------------------ whole-model helpers
    def mono_iteration_ms(self, tp: int, decode_seqs: float, decode_context: float, prefill_tokens: float = 0.0,
                          prefill_context: float = 0.0, prefill_seqs: float = 0.0) -> float:
        """One iteration of a monolithic ``tp`` instance: decodes plus a prefill chunk (ms).

        Non-attention groups run once at the iteration's token count (decodes + prefill
        tokens; the LM head only on decodes and the last token of each prefill); attention
        runs its decode kernel over the decodes and its prefill kernel over the chunk; the
        calibrated per-iteration overhead is added once (see :meth:`step_ms`).
        """
        tokens = decode_seqs + prefill_tokens
        if tokens <= 0:
            return 0.0
        shared = (self.group_ms("embed", tokens, tp=tp) + self.group_ms("proj", tokens, tp=tp)
                  + self.group_ms("mlp", tokens, tp=tp) + self.group_ms("head", decode_seqs + prefill_seqs, tp=tp))
        dec = self.group_ms("attn", decode_seqs, decode_context, decode_seqs, tp, "decode") if decode_seqs > 0 else 0.0
        pre = self.group_ms("attn", prefill_tokens, prefill_context, max(prefill_seqs, 1), tp, "prefill") \
            if prefill_tokens > 0 else 0.0
        kernel = shared + dec + pre
        pre_share = pre + shared * prefill_tokens / tokens
        return self.step_ms(kernel, decode_seqs, pre_share)

    def prefill_ms(self, tp: int, batch: int, prompt_tokens: int) -> float:
        """Prefill ``batch`` prompts of ``prompt_tokens`` each in one iteration (ms)."""
        return self.mono_iteration_ms(tp, 0, 0, batch * prompt_tokens, prompt_tokens, batch)

    def chunked_prefill_ms(self, tp: int, prompt_tokens: int, chunk_tokens: int) -> float:
        """Unloaded time to first token of one prompt prefilled in chunks of ``chunk_tokens`` (ms):
        one iteration per chunk, each chunk attending over the prompt so far."""
        t, done = 0.0, 0
        while done < prompt_tokens:
            c = min(chunk_tokens, prompt_tokens - done)
            done += c
            t += self.mono_iteration_ms(tp, 0, 0, c, done, 1)
        return t

    def decode_ms(self, tp: int, batch: int, context_tokens: int) -> float:
        """One decode iteration of ``batch`` sequences at ``context_tokens`` KV each (ms)."""
        return self.mono_iteration_ms(tp, batch, context_tokens)

    # ------------------------------------------------------------------ power and memory
    def _power_uncached(self, u_pct: int) -> float:
        return float(self.db.power_w(self.gpu_name, u_pct / 100.0))

    def power_w(self, utilisation: float) -> float:
        """Power of one allocated GPU at busy share ``utilisation`` (watts)."""
        return self._power(power_percent(utilisation))

    def power_by_percent(self) -> tuple[float, ...]:
        """Power of one allocated GPU at 0, 1, .., 100 % busy (watts): ``power_w(u)`` is entry
        ``power_percent(u)``, for callers that look it up many times."""
        return tuple(self._power(i) for i in range(101))

    def weight_bytes_per_gpu(self, group: str, tp: int) -> float:
        """Weight bytes one GPU of a ``tp`` replica of ``group`` holds (memoised)."""
        key = (group, tp)
        hit = self._wb.get(key)
        if hit is None:
            hit = self._wb[key] = self.cfg.group_weight_bytes(group) / tp
        return hit

    def activation_bytes_per_gpu(self, group: str, tokens: int, tp: int) -> float:
        """Activation workspace of one GPU of a replica running ``tokens``-token iterations.

        The widest intermediate of the group (d_ff/tp for mlp, qkv width/tp for proj,
        vocabulary/tp logits for head, d_model otherwise) times tokens, double-buffered.
        """
        key = (group, tokens, tp)
        hit = self._ab.get(key)
        if hit is None:
            c = self.cfg
            width = {"mlp": 2 * c.d_ff / tp, "proj": c.qkv_out / tp, "head": c.vocab_size / tp}.get(group, c.d_model)
            hit = 2.0 * tokens * max(width, c.d_model) * c.dtype_bytes
            if len(self._ab) > 100_000:
                self._ab.clear()
            self._ab[key] = hit
        return hit

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per cached token over all layers (unsharded)."""
        return self._kvb
