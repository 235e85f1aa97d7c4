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

Every output element of QKV, O, embedding and LM head is the dot product it is unsplit; only the
MLP adds ``tp`` partial products (last-bit differences). Attention keeps ``tp = 1`` in the
runtime: its KV cache would have to be split by head as well (see docs/RUNTIME.md, Limits).
The shards' kernels run one after another from the caller's thread; on CUDA they are
asynchronous, so shards on different devices overlap.

Units: bytes, devices as ``torch.device``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.model import RMSNorm

#: groups whose replicas may be split (attention keeps its KV cache whole)
TP_GROUPS = ("embed", "proj", "mlp", "head")


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
        raise ValueError(f"group {group!r} cannot be split over devices; tensor parallelism covers {list(TP_GROUPS)}")
    if not devs:
        raise ValueError("shard_group needs at least one device")
    with torch.no_grad():
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
