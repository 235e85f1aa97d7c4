"""Tensor parallelism inside a replica of a stateless group: its weights split over ``tp`` devices.

A replica of ``embed``, ``proj``, ``mlp`` or ``head`` with ``tp > 1`` holds one shard of each
weight on each of its devices (Megatron-style splits; ``torch.tensor_split``, so a dimension need
not divide by ``tp``) and answers each call on its first device, as an unsplit replica does:

- ``proj``: the fused QKV projection column-parallel by head (shard ``i``: its share of the
  query heads and of the key/value heads), outputs gathered by head; the O projection
  column-parallel by output feature, outputs concatenated.
- ``mlp``: gate and up projections column-parallel over ``d_ff`` (shard ``i``: the same slice
  of gate rows and of up rows), the activation on each shard, the down projection row-parallel
  over ``d_ff``: the shards' partial sums are added on the first device (the all-reduce). The
  norm runs on the first device.
- ``embed``: column-parallel over ``d_model``, outputs concatenated.
- ``head``: the final norm and the sampler on the first device, the LM head vocabulary-parallel
  (each shard the logits of its slice of the vocabulary), logits concatenated.
- ``attn``: split by key/value head, each shard with the query heads that read them (grouped
  query attention stays inside a shard); each shard holds the KV cache of its heads
  (:class:`ShardedKVCache`: one block table for all shards, so admission and preemption see one
  cache) and rotates, writes and attends on its own device (:class:`ShardedStepAttention`);
  outputs gathered by head. Its norm runs on the first device.

Every output element of QKV, O, embedding, LM head and attention is computed as it is unsplit;
only the MLP adds ``tp`` partial products (last-bit differences). The shards' kernels run one
after another from the caller's thread; on CUDA they are asynchronous, so shards on different
devices overlap.

Units: bytes, devices as ``torch.device``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.kvcache import KVCacheError, KVLayout, PagedKVCache
from runtime.model import Attention, RMSNorm, Rotary

#: groups whose replicas may be split over devices
TP_GROUPS = ("embed", "attn", "proj", "mlp", "head")


def _parts(n: int, tp: int) -> list[torch.Tensor]:
    """Index ranges of ``n`` items cut into ``tp`` contiguous parts of near-equal size."""
    return list(torch.tensor_split(torch.arange(n), tp))


def _put(t: torch.Tensor, device: torch.device) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous().to(device), requires_grad=False)


class Gathered(nn.Module):
    """One weight split along ``dim`` over devices; ``forward(x)`` applies ``op(x, shard)`` on each
    shard's device and concatenates the outputs' last axis on ``devices[0]``.

    ``op = F.linear`` with ``dim = 0`` is a column-parallel linear layer (output features split);
    ``op = F.embedding`` with ``dim = 1`` an embedding table split by ``d_model`` columns.
    """

    def __init__(self, weight: torch.Tensor, dim: int, op, devices: Sequence[torch.device]) -> None:  # noqa: ANN001
        super().__init__()
        self.devices = list(devices)
        self.op = op
        parts = _parts(weight.shape[dim], len(devices))
        self.shards = nn.ParameterList(_put(weight.index_select(dim, idx), d) for idx, d in zip(parts, self.devices))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d0 = self.devices[0]
        return torch.cat([self.op(x.to(d), w).to(d0) for w, d in zip(self.shards, self.devices)], dim=-1)


class ShardedQKV(nn.Module):
    """The fused QKV projection split by head; ``forward(x[T, d]) -> (q[T, H, hd], k[T, KV, hd], v[T, KV, hd])``."""

    def __init__(self, qkv: nn.Module, devices: Sequence[torch.device]) -> None:
        super().__init__()
        self.devices = list(devices)
        H, KV, hd = qkv.n_heads, qkv.n_kv_heads, qkv.head_dim
        if len(devices) > KV:
            raise ValueError(f"tp={len(devices)} is more than the {KV} key/value heads a QKV projection can be "
                             f"split by")
        w = qkv.weight.detach()
        q, k, v = w[:H * hd].view(H, hd, -1), w[H * hd:(H + KV) * hd].view(KV, hd, -1), w[(H + KV) * hd:].view(KV, hd, -1)
        self.heads: list[tuple[int, int]] = []
        shards = []
        for hq, hk, d in zip(_parts(H, len(devices)), _parts(KV, len(devices)), self.devices):
            self.heads.append((len(hq), len(hk)))
            shards.append(_put(torch.cat([q[hq].flatten(0, 1), k[hk].flatten(0, 1), v[hk].flatten(0, 1)]), d))
        self.shards = nn.ParameterList(shards)
        self.head_dim = hd

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d0, hd, T = self.devices[0], self.head_dim, x.shape[0]
        qs, ks, vs = [], [], []
        for w, d, (nq, nk) in zip(self.shards, self.devices, self.heads):
            out = F.linear(x.to(d), w)
            q, k, v = out.split([nq * hd, nk * hd, nk * hd], dim=-1)
            qs.append(q.reshape(T, nq, hd).to(d0))
            ks.append(k.reshape(T, nk, hd).to(d0))
            vs.append(v.reshape(T, nk, hd).to(d0))
        return torch.cat(qs, dim=1), torch.cat(ks, dim=1), torch.cat(vs, dim=1)


class ShardedMLP(nn.Module):
    """Gated (or plain) MLP split over ``d_ff``; ``forward(x[T, d]) -> [T, d]`` (partial sums added on ``devices[0]``)."""

    def __init__(self, mlp: nn.Module, devices: Sequence[torch.device]) -> None:
        super().__init__()
        self.devices = list(devices)
        self.gated = mlp.gated
        ff = mlp.d_ff
        gu, down = mlp.gate_up.weight.detach(), mlp.down.weight.detach()
        up_shards, down_shards, self.widths = [], [], []
        for idx, d in zip(_parts(ff, len(devices)), self.devices):
            rows = torch.cat([gu[idx], gu[ff + idx]]) if self.gated else gu[idx]
            up_shards.append(_put(rows, d))
            down_shards.append(_put(down[:, idx], d))
            self.widths.append(len(idx))
        self.up = nn.ParameterList(up_shards)
        self.down = nn.ParameterList(down_shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d0 = self.devices[0]
        out = None
        for wu, wd, d, n in zip(self.up, self.down, self.devices, self.widths):
            gu = F.linear(x.to(d), wu)
            if self.gated:
                gate, up = gu.split(n, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.gelu(gu, approximate="tanh")
            part = F.linear(h, wd).to(d0)
            out = part if out is None else out + part
        return out


def kv_head_split(n_kv_heads: int, tp: int) -> list[int]:
    """Key/value heads of each shard of an attention replica at ``tp`` (ValueError past one head each)."""
    if tp > n_kv_heads:
        raise ValueError(f"tp={tp} is more than the {n_kv_heads} key/value heads attention can be split by")
    return [len(p) for p in _parts(n_kv_heads, tp)]


class ShardedAttention(nn.Module):
    """One layer's rotary embedding and attention, one per shard (each shard's heads, on its device).

    Called by :class:`ShardedStepAttention`, not directly: ``parts[i] = (rope, attention)`` of shard ``i``.
    """

    def __init__(self, rope: Rotary, attn: Attention, kv_heads: list[int], devices: Sequence[torch.device]) -> None:
        super().__init__()
        self.devices = list(devices)
        self.kv_heads = list(kv_heads)
        self.q_heads = [h * attn.groups for h in kv_heads]
        n = rope.cos_cached.shape[0]
        self.ropes = nn.ModuleList(Rotary(rope.head_dim, rope.theta, n, device=d) for d in self.devices)
        self.attns = nn.ModuleList(Attention(q, k, attn.head_dim) for q, k in zip(self.q_heads, self.kv_heads))


class _Shards(nn.Module):
    """Placeholder for the ``rope`` entry of a split attention replica: the rotary embeddings live
    in :class:`ShardedAttention` (one per shard); ``forward`` is never called."""

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        raise RuntimeError("a split attention replica rotates inside ShardedStepAttention")


class ShardedKVCache:
    """An attention replica's KV cache split by key/value head over its devices.

    Every shard is a :class:`runtime.kvcache.PagedKVCache` of the same number of blocks holding
    its heads; reservations, growth and releases go to all of them in the same order, so their
    block tables stay identical and the engine's admission and preemption read one cache (shard
    0's counts). ``capacity_bytes`` is the whole replica's, as for an unsplit cache: the same
    tokens fit, spread over the devices. ``export`` / ``import_`` move every head (gathered on
    the first device), so sequences hand over between split and unsplit replicas.
    """

    def __init__(self, layout: KVLayout, capacity_bytes: int, devices: Sequence[torch.device | str],
                 kv_heads: list[int]) -> None:
        n_blocks = int(capacity_bytes // layout.bytes_per_block)
        if n_blocks < 1:
            raise KVCacheError(
                f"KV capacity {capacity_bytes} bytes is less than one block ({layout.bytes_per_block} bytes)")
        self.layout = layout
        self.devices = [torch.device(d) for d in devices]
        self.device = self.devices[0]
        self.kv_heads = list(kv_heads)
        self.n_blocks = n_blocks
        self.shards = []
        for h, d in zip(self.kv_heads, self.devices):
            lay = replace(layout, n_kv_heads=h)
            self.shards.append(PagedKVCache(lay, n_blocks * lay.bytes_per_block, d))

    # accounting: shard 0 answers for all (their tables are identical)
    @property
    def capacity_tokens(self) -> int:
        return self.shards[0].capacity_tokens

    @property
    def free_blocks(self) -> int:
        return self.shards[0].free_blocks

    @property
    def used_frac(self) -> float:
        return self.shards[0].used_frac

    @property
    def memory_bytes(self) -> int:
        """Bytes the block pools occupy over all devices."""
        return sum(c.memory_bytes for c in self.shards)

    def sequences(self) -> list[int]:
        return self.shards[0].sequences()

    def can_reserve(self, tokens: int) -> bool:
        return self.shards[0].can_reserve(tokens)

    def blocks_to_extend(self, seq_id: int, tokens: int) -> int:
        return self.shards[0].blocks_to_extend(seq_id, tokens)

    def reserved_tokens(self, seq_id: int) -> int:
        return self.shards[0].reserved_tokens(seq_id)

    # changes: every shard, in the same order
    def reserve(self, seq_id: int, tokens: int) -> None:
        self.shards[0].reserve(seq_id, tokens)  # raises before any shard changes
        for c in self.shards[1:]:
            c.reserve(seq_id, tokens)

    def extend(self, seq_id: int, tokens: int) -> None:
        self.shards[0].extend(seq_id, tokens)
        for c in self.shards[1:]:
            c.extend(seq_id, tokens)

    def release(self, seq_id: int) -> None:
        for c in self.shards:
            c.release(seq_id)

    def export(self, seq_id: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every head's K and V of the first ``length`` tokens, per layer, on the first device."""
        parts = [c.export(seq_id, length) for c in self.shards]
        d0 = self.device
        ks = [torch.cat([p[0][i].to(d0) for p in parts], dim=1) for i in range(self.layout.n_layers)]
        vs = [torch.cat([p[1][i].to(d0) for p in parts], dim=1) for i in range(self.layout.n_layers)]
        return ks, vs

    def import_(self, seq_id: int, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        """Write exported K/V (every head) into the shards, each its heads."""
        for c, lo, hi in self._bounds():
            c.import_(seq_id, [k[:, lo:hi] for k in ks], [v[:, lo:hi] for v in vs])

    def _bounds(self) -> list[tuple[PagedKVCache, int, int]]:
        out, lo = [], 0
        for c, h in zip(self.shards, self.kv_heads):
            out.append((c, lo, lo + h))
            lo += h
        return out


class ShardedStepAttention:
    """:class:`runtime.engine.StepAttention` of a split attention replica: one per shard, each
    rotating, writing and attending its heads on its device; outputs gathered by head."""

    def __init__(self, kv: ShardedKVCache, seqs: list[tuple[int, int, int]], step_cls: type) -> None:
        self.kv = kv
        self.key = tuple(seqs)
        self.steps = [step_cls(c, seqs) for c in kv.shards]
        self.all_decode = self.steps[0].all_decode

    def __call__(self, layer: int, rope: nn.Module, attn: ShardedAttention, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """``q[rows,H,hd], k, v[rows,KV,hd]`` on the first device -> attention output ``[rows, H*hd]`` there."""
        d0 = self.kv.device
        outs, qlo, klo = [], 0, 0
        for step, d, r, a, nq, nk in zip(self.steps, attn.devices, attn.ropes, attn.attns, attn.q_heads,
                                         attn.kv_heads):
            outs.append(step(layer, r, a, q[:, qlo:qlo + nq].to(d), k[:, klo:klo + nk].to(d),
                             v[:, klo:klo + nk].to(d)).to(d0))
            qlo += nq
            klo += nk
        return torch.cat(outs, dim=-1)


def _norm_on(norm: RMSNorm, device: torch.device) -> RMSNorm:
    new = RMSNorm(norm.weight.shape[0], norm.eps, device=device, dtype=norm.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(norm.weight)
    new.weight.requires_grad_(False)
    return new


def shard_group(master: nn.ModuleDict, group: str, devices: Sequence[torch.device | str]) -> nn.ModuleDict:
    """A copy of ``group``'s master modules (:func:`runtime.engine.group_modules`) split over ``devices``.

    Same keys and call signatures as the unsplit modules, so the engine's operator functions and
    fused lanes run it unchanged; results arrive on ``devices[0]``. Raises ValueError for a group
    that cannot be split (attention) or more devices than a dimension has parts.
    """
    devs = [torch.device(d) for d in devices]
    if group not in TP_GROUPS:
        raise ValueError(f"unknown operator group {group!r}; tensor parallelism covers {list(TP_GROUPS)}")
    if not devs:
        raise ValueError("shard_group needs at least one device")
    with torch.no_grad():
        if group == "attn":
            heads = kv_head_split(master["attn"][0].n_kv_heads, len(devs))
            return nn.ModuleDict({"norm": nn.ModuleList(_norm_on(n, devs[0]) for n in master["norm"]),
                                  "rope": nn.ModuleList(_Shards() for _ in master["rope"]),
                                  "attn": nn.ModuleList(ShardedAttention(r, a, heads, devs)
                                                        for r, a in zip(master["rope"], master["attn"]))})
        if group == "embed":
            return nn.ModuleDict({"embed": Gathered(master["embed"].weight, 1, F.embedding, devs)})
        if group == "proj":
            return nn.ModuleDict({"qkv": nn.ModuleList(ShardedQKV(m, devs) for m in master["qkv"]),
                                  "o": nn.ModuleList(Gathered(m.weight, 0, F.linear, devs) for m in master["o"])})
        if group == "mlp":
            return nn.ModuleDict({"norm": nn.ModuleList(_norm_on(n, devs[0]) for n in master["norm"]),
                                  "mlp": nn.ModuleList(ShardedMLP(m, devs) for m in master["mlp"])})
        return nn.ModuleDict({"norm": _norm_on(master["norm"], devs[0]),
                              "lm_head": Gathered(master["lm_head"].weight, 0, F.linear, devs),
                              "sampler": master["sampler"]})


def tp_devices(first: str | torch.device, tp: int) -> list[torch.device]:
    """The devices of a replica at ``tp`` whose first device is ``first``: on CUDA the next ``tp``
    visible GPUs round-robin from it (all on one GPU when there is one), elsewhere ``first`` each time."""
    first = torch.device(first)
    if first.type != "cuda":
        return [first] * tp
    n = max(torch.cuda.device_count(), 1)
    i0 = first.index or 0
    return [torch.device("cuda", (i0 + j) % n) for j in range(tp)]
