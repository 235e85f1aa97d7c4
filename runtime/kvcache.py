"""Paged KV-cache memory owned by one attention replica.

The cache is a pool of fixed-size blocks per layer, ``[n_blocks, block_tokens, n_kv_heads,
head_dim]`` for K and for V. A sequence holds a table of blocks: reserved for the tokens it
holds at admission and grown (:meth:`PagedKVCache.extend`) as it decodes, or reserved at
once for every token it can ever need; which of the two, and what happens when blocks run
out (preemption), is the engine's policy (``EngineConfig.kv_allocation``, see
:class:`runtime.engine.Engine`).

Sizes: ``block_tokens`` tokens per block; bytes per token are
``2 x n_layers x n_kv_heads x head_dim x element_size`` (K and V over all layers).

Serving reads and writes the cache through one :class:`StepIndex` per iteration
(:meth:`PagedKVCache.index_step`): the flat cache row of every new token
(``block * block_tokens + offset``, written with ``index_copy_``) and the rows of every
decoding sequence's context (read with ``index_select``), built on the host in numpy and
copied to the device once, then used by every layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


class KVCacheError(RuntimeError):
    """A cache operation that cannot be honoured (unknown sequence, not enough blocks)."""


@dataclass(frozen=True)
class KVLayout:
    """Shape of the cache.

    Attributes:
        n_layers: decoder layers.
        n_kv_heads: key/value heads.
        head_dim: elements per head.
        block_tokens: tokens per block.
        dtype: element type of the cache.
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    block_tokens: int = 16
    dtype: torch.dtype = torch.float32

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one cached token holds over all layers (K and V)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * elem

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block over all layers (K and V)."""
        return self.bytes_per_token * self.block_tokens

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold ``tokens`` tokens."""
        return math.ceil(max(tokens, 0) / self.block_tokens)


@dataclass(frozen=True)
class StepIndex:
    """Everything one iteration's attention needs about its rows, on the cache's device.

    Built by :meth:`PagedKVCache.index_step` with one host-to-device copy, then used by every
    layer of the iteration (block tables do not change within an iteration).

    Attributes:
        positions: token position of each row ``[rows]``.
        slot: flat cache row (``block * block_tokens + offset``) each new row is written to ``[rows]``.
        prefills: ``(first_row, n_rows)`` of each sequence starting at position 0 (host ints).
        n_dec: sequences decoding one token (start position > 0).
        dec_rows: row of each decoding sequence ``[n_dec]``; None when every sequence decodes
            (then row ``i`` is sequence ``i``).
        dec_lengths: cached tokens of each decoding sequence after this iteration's write ``[n_dec]``.
        max_len: largest of ``dec_lengths`` (tokens; 0 without decodes).
        gather: flat cache rows of the first ``gather_len`` tokens of each decoding sequence
            ``[n_dec * gather_len]`` (rows past ``max_len`` are padding, masked by the lengths).
        gather_len: tokens gathered (and attended over) per decoding sequence: ``max_len``
            rounded up to a multiple of :attr:`PagedKVCache.gather_unit`, so the attention
            inputs keep one shape for many steps.
    """

    positions: torch.Tensor
    slot: torch.Tensor
    prefills: list[tuple[int, int]]
    n_dec: int
    dec_rows: torch.Tensor | None
    dec_lengths: torch.Tensor | None
    max_len: int
    gather: torch.Tensor | None
    gather_len: int = 0


def gather_unit(device: torch.device | str) -> int:
    """Tokens to which decode attention rounds its context length on ``device``.

    On CUDA, PyTorch's cuDNN attention builds a graph per input shape (~0.1 s each, measured
    on an H200 as a 122 ms decode step against 27 ms once cached). A context that grows by
    one token every step meets a new shape every step; on an H100 (2026-11-26) such a loop
    still spent 1.25 ms of host time per attention call after a warm-up run over the same
    lengths, against 0.12 ms at one shape per 64 tokens (cause not established). With 64 a
    new shape comes once per 64 tokens, at the cost of attending over up to 63 masked
    padding tokens. On CPU 1 (no padding).
    """
    return 64 if torch.device(device).type == "cuda" else 1


class PagedKVCache:
    """Block pool plus per-sequence block tables for one attention replica.

    Args:
        layout: cache shape.
        capacity_bytes: KV memory this replica may hold (bytes); rounded down to blocks.
        device: where the blocks live (``cpu``, ``cuda:0``, ...).
    """

    def __init__(self, layout: KVLayout, capacity_bytes: int, device: str | torch.device = "cpu") -> None:
        n_blocks = int(capacity_bytes // layout.bytes_per_block)
        if n_blocks < 1:
            raise KVCacheError(
                f"KV capacity {capacity_bytes} bytes is less than one block ({layout.bytes_per_block} bytes)")
        self.layout = layout
        self.device = torch.device(device)
        self.n_blocks = n_blocks
        shape = (n_blocks, layout.block_tokens, layout.n_kv_heads, layout.head_dim)
        self.k = [torch.zeros(shape, dtype=layout.dtype, device=self.device) for _ in range(layout.n_layers)]
        self.v = [torch.zeros(shape, dtype=layout.dtype, device=self.device) for _ in range(layout.n_layers)]
        # the same memory as [n_blocks * block_tokens, n_kv_heads, head_dim]: one row per token slot
        flat = (n_blocks * layout.block_tokens, layout.n_kv_heads, layout.head_dim)
        self._kf = [k.view(flat) for k in self.k]
        self._vf = [v.view(flat) for v in self.v]
        #: Decode attention reads the longest context rounded up to a multiple of this many
        #: tokens (the rest masked); see :func:`gather_unit`.
        self.gather_unit = gather_unit(self.device)
        self._free: list[int] = list(range(n_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    # ---- accounting -------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool can hold."""
        return self.n_blocks * self.layout.block_tokens

    @property
    def free_blocks(self) -> int:
        """Blocks not reserved by any sequence."""
        return len(self._free)

    @property
    def used_frac(self) -> float:
        """Share of blocks reserved (0..1)."""
        return 1.0 - len(self._free) / self.n_blocks

    @property
    def memory_bytes(self) -> int:
        """Bytes the block pool occupies."""
        return self.n_blocks * self.layout.bytes_per_block

    def sequences(self) -> list[int]:
        """Ids of sequences holding blocks here."""
        return list(self._tables)

    def can_reserve(self, tokens: int) -> bool:
        """Whether ``tokens`` tokens' worth of blocks are free now."""
        return self.layout.blocks_for(tokens) <= len(self._free)

    def reserve(self, seq_id: int, tokens: int) -> None:
        """Reserve blocks for ``tokens`` tokens of sequence ``seq_id``; raises KVCacheError if short."""
        if seq_id in self._tables:
            raise KVCacheError(f"sequence {seq_id} already holds blocks")
        need = self.layout.blocks_for(tokens)
        if need > len(self._free):
            raise KVCacheError(f"sequence {seq_id} needs {need} blocks, {len(self._free)} free")
        self._tables[seq_id] = [self._free.pop() for _ in range(need)]

    def blocks_to_extend(self, seq_id: int, tokens: int) -> int:
        """Blocks sequence ``seq_id`` still needs to hold ``tokens`` tokens (0 if it has them)."""
        return max(self.layout.blocks_for(tokens) - len(self._table(seq_id)), 0)

    def extend(self, seq_id: int, tokens: int) -> None:
        """Grow the reservation of ``seq_id`` to hold ``tokens`` tokens; raises KVCacheError if short."""
        need = self.blocks_to_extend(seq_id, tokens)
        if need > len(self._free):
            raise KVCacheError(f"sequence {seq_id} needs {need} more blocks, {len(self._free)} free")
        self._tables[seq_id].extend(self._free.pop() for _ in range(need))

    def release(self, seq_id: int) -> None:
        """Return a sequence's blocks to the pool (no-op for unknown ids)."""
        blocks = self._tables.pop(seq_id, None)
        if blocks:
            self._free.extend(reversed(blocks))

    def reserved_tokens(self, seq_id: int) -> int:
        """Tokens the sequence's reservation can hold."""
        return len(self._table(seq_id)) * self.layout.block_tokens

    def _table(self, seq_id: int) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KVCacheError(f"sequence {seq_id} holds no blocks on this replica") from None

    # ---- data -------------------------------------------------------------------------
    def _slots(self, seq_id: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._table(seq_id)
        bt = self.layout.block_tokens
        pos = positions.to("cpu", torch.long)
        if int(pos.max()) >= len(table) * bt:
            raise KVCacheError(f"sequence {seq_id}: position {int(pos.max())} beyond its reservation "
                               f"of {len(table) * bt} tokens")
        blocks = torch.tensor(table, dtype=torch.long)[pos // bt]
        return blocks.to(self.device), (pos % bt).to(self.device)

    def write(self, layer: int, seq_id: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V ``[T, n_kv_heads, head_dim]`` of ``seq_id`` at token ``positions`` ``[T]``."""
        blk, off = self._slots(seq_id, positions)
        self.k[layer][blk, off] = k.to(self.device, self.layout.dtype)
        self.v[layer][blk, off] = v.to(self.device, self.layout.dtype)

    def gather(self, layer: int, seq_ids: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``seq_ids`` as ``[B, max_len, n_kv_heads, head_dim]`` (padding beyond each length)."""
        bt = self.layout.block_tokens
        nblk = self.layout.blocks_for(max_len)
        idx = torch.zeros((len(seq_ids), nblk), dtype=torch.long)
        for i, s in enumerate(seq_ids):
            t = self._table(s)[:nblk]
            idx[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        idx = idx.to(self.device)
        shape = (len(seq_ids), nblk * bt, self.layout.n_kv_heads, self.layout.head_dim)
        k = self.k[layer][idx].reshape(shape)[:, :max_len]
        v = self.v[layer][idx].reshape(shape)[:, :max_len]
        return k, v

    def index_step(self, seqs: list[tuple[int, int, int]]) -> StepIndex:
        """The :class:`StepIndex` of ``seqs`` = ``(seq_id, n_new, start_pos)`` in row order.

        A sequence with ``start_pos > 0`` must be a decode step (``n_new == 1``). Raises
        KVCacheError naming the sequence when a row falls beyond its reservation.
        """
        bt = self.layout.block_tokens
        tables = [self._table(sid) for sid, _, _ in seqs]
        mat = np.zeros((len(seqs), max(len(t) for t in tables)), dtype=np.int64)
        for i, t in enumerate(tables):
            mat[i, :len(t)] = t
        n_new = np.array([n for _, n, _ in seqs], dtype=np.int64)
        starts = np.array([p for _, _, p in seqs], dtype=np.int64)
        seq_of_row = np.repeat(np.arange(len(seqs)), n_new)
        first_row = np.cumsum(n_new) - n_new
        pos = starts[seq_of_row] + np.arange(int(n_new.sum())) - first_row[seq_of_row]
        limit = np.array([len(t) * bt for t in tables], dtype=np.int64)[seq_of_row]
        over = np.flatnonzero(pos >= limit)
        if over.size:
            r = int(over[0])
            raise KVCacheError(f"sequence {seqs[int(seq_of_row[r])][0]}: position {int(pos[r])} beyond its "
                               f"reservation of {int(limit[r])} tokens")
        slot = mat[seq_of_row, pos // bt] * bt + pos % bt
        dec = np.flatnonzero(starts > 0)
        if np.any(n_new[dec] != 1):
            raise KVCacheError(f"sequence {seqs[int(dec[np.argmax(n_new[dec] != 1)])][0]} has a cache and "
                               "more than one new token; only single-token decode steps are batched")
        dec_lengths = starts[dec] + 1
        max_len = int(dec_lengths.max()) if dec.size else 0
        unit = self.gather_unit
        gather_len = -(-max_len // unit) * unit
        t = np.arange(gather_len)
        gather = (mat[dec][:, np.minimum(t // bt, mat.shape[1] - 1)] * bt + t % bt).reshape(-1)
        all_decode = dec.size == len(seqs)
        pieces = [pos, slot, dec_lengths, gather] + ([] if all_decode else [first_row[dec]])
        packed = torch.from_numpy(np.concatenate(pieces))
        if self.device.type == "cuda":
            packed = packed.pin_memory()
        parts = packed.to(self.device, non_blocking=True).split([len(x) for x in pieces])
        prefills = [(int(first_row[i]), int(n_new[i])) for i in np.flatnonzero(starts == 0)]
        return StepIndex(parts[0], parts[1], prefills, int(dec.size), None if all_decode else parts[4],
                         parts[2] if dec.size else None, max_len, parts[3] if dec.size else None, gather_len)

    def write_slots(self, layer: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V ``[rows, n_kv_heads, head_dim]`` (cache dtype, cache device) at flat cache rows ``slot``."""
        self._kf[layer].index_copy_(0, slot, k)
        self._vf[layer].index_copy_(0, slot, v)

    def gather_tokens(self, layer: int, rows: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[batch, len(rows) // batch, KV, hd]`` of ``layer`` at flat cache rows (``StepIndex.gather``)."""
        shape = (batch, rows.shape[0] // batch, self.layout.n_kv_heads, self.layout.head_dim)
        return self._kf[layer].index_select(0, rows).view(shape), self._vf[layer].index_select(0, rows).view(shape)

    def export(self, seq_id: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the first ``length`` cached tokens of a sequence, per layer (for migration)."""
        ks, vs = [], []
        for layer in range(self.layout.n_layers):
            k, v = self.gather(layer, [seq_id], length)
            ks.append(k[0].clone())
            vs.append(v[0].clone())
        return ks, vs

    def import_(self, seq_id: int, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        """Write exported K/V (from :meth:`export`) into this cache; blocks must be reserved."""
        length = ks[0].shape[0]
        if length == 0:
            return
        pos = torch.arange(length)
        for layer in range(self.layout.n_layers):
            self.write(layer, seq_id, pos, ks[layer], vs[layer])
