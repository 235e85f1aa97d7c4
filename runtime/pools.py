"""Operator pools: replicas of one operator group, each a worker thread with its own queue.

A :class:`Replica` holds a copy of its group's weights on its own device and runs the
work items the engine submits to it, one at a time, in arrival order (its batching queue).
A :class:`Pool` is the set of replicas of one group and routes work to the least-loaded
ready one. Placement (``model`` / ``dedicated`` / ``pack``) is turned into *slots* by
:func:`assign_slots`; a slot maps to a device (``cpu`` everywhere on a CPU machine,
``cuda:k`` round-robin over visible GPUs on CUDA).
"""
from __future__ import annotations

import copy
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from runtime.control import Plan
from runtime.models import OPERATOR_GROUPS
from runtime.tensor_parallel import tp_devices

LOADING, READY, DRAINING, DEAD = "loading", "ready", "draining", "dead"

log = logging.getLogger("opscale.runtime")


class WorkerDied(RuntimeError):
    """The replica that ran (or held) a work item died before finishing it."""


class PeerDied(WorkerDied):
    """A co-located replica whose weights a fused work item used died; the runner lives on."""


@dataclass
class WorkItem:
    """One batch for one replica.

    Attributes:
        fn: ``fn(replica, *args)`` computing the batch on the replica's device.
        args: its arguments.
        tokens: token-steps in the batch (for queue and rate metrics).
        seqs: sequences in the batch.
        future: resolved with ``fn``'s result, or with WorkerDied.
        enqueued_s: ``time.perf_counter()`` at submission (seconds).
        parts: for a fused item (several groups' operators in one call), what each group
            did: ``{group: [token-steps, sequences, service seconds]}``; ``fn`` fills in the
            seconds. None for an item of one group.
    """

    fn: Callable[..., Any]
    args: tuple
    tokens: int
    seqs: int
    future: Future = field(default_factory=Future)
    enqueued_s: float = field(default_factory=time.perf_counter)
    parts: dict[str, list[float]] | None = None


_replica_ids = itertools.count()


class Replica:
    """A worker thread holding one copy of an operator group.

    Args:
        group: operator group name.
        slot: placement slot it occupies (see :func:`assign_slots`).
        device: torch device of its weights and activations.
        load: ``load(device) -> modules`` building its weights (called on a loader thread).
        on_done: ``on_done(replica, item, start_s, end_s)`` metrics hook after each item.
        tp: tensor parallelism: the weights ``load`` builds are split over ``tp`` devices
            starting at ``device`` (runtime/tensor_parallel.py); results arrive on ``device``.
    """

    #: runs in this process (a :class:`runtime.rayserve.RemoteReplica` says True)
    remote = False

    def __init__(self, group: str, slot: str, device: str, load: Callable[[torch.device], Any],
                 on_done: Callable[["Replica", WorkItem, float, float], None] | None = None, tp: int = 1) -> None:
        self.id = next(_replica_ids)
        self.group = group
        self.slot = slot
        self.device = torch.device(device)
        self.tp = int(tp)
        #: every device holding a shard of its weights (``device`` first)
        self.devices = tp_devices(self.device, self.tp)
        self.state = LOADING
        self.modules: Any = None
        self.kv: Any = None  # PagedKVCache on attention replicas
        self.load_s = 0.0
        self.items_done = 0
        self.load_error: BaseException | None = None
        self._load = load
        self._on_done = on_done
        self._q: queue.Queue[WorkItem | None] = queue.Queue()
        self._kill_next = threading.Event()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{group}-{self.id}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Replica({self.group}#{self.id} {self.state} slot={self.slot} device={self.device})"

    # ---- lifecycle --------------------------------------------------------------------
    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.modules = self._load(self.device)
            for d in dict.fromkeys(self.devices):
                if d.type == "cuda":
                    torch.cuda.synchronize(d)
        except BaseException as e:  # a replica that cannot load never serves
            log.warning("%r failed to load: %s: %s", self, type(e).__name__, e)
            # the traceback's frames hold whatever the load had copied so far (device
            # memory, for a partial CUDA copy): keep the error, not the frames
            self.load_error = e.with_traceback(None)
            self.state = DEAD
            self._fail_queue()
            return
        self.load_s = time.perf_counter() - t0
        if self.state == LOADING:
            self.state = READY
        while True:
            item = self._q.get()
            if item is None:
                break
            if not self._execute(item):
                return
        self.state = DEAD

    def _execute(self, item: WorkItem) -> bool:
        """Run one item and resolve its future; False when the replica died doing it."""
        self._busy.set()
        start = time.perf_counter()
        try:
            result = item.fn(self, *item.args)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if self._kill_next.is_set():
                raise WorkerDied(f"replica {self.group}#{self.id} was killed mid-batch")
        except PeerDied as e:  # another replica died; this one keeps serving
            item.future.set_exception(e)
        except WorkerDied as e:
            self.state = DEAD
            item.future.set_exception(e)
            self._busy.clear()
            self._fail_queue()
            return False
        except BaseException as e:
            item.future.set_exception(e)
        else:
            end = time.perf_counter()
            self.items_done += 1
            if self._on_done is not None:
                self._on_done(self, item, start, end)
            item.future.set_result(result)
        self._busy.clear()
        return True

    def run_inline(self, item: WorkItem) -> Future:
        """Run ``item`` on the calling thread, with the worker's bookkeeping (kill, metrics, items_done).

        Saves the two thread hand-offs of :meth:`submit` when the caller would only wait for
        the result. Only an idle serving replica with an empty queue runs inline; otherwise
        the item is queued as by :meth:`submit`. The caller must not submit to this replica
        while the item runs.
        """
        if self.state not in (READY, DRAINING) or self.load or not self._thread.is_alive():
            return self.submit(item)
        if not self._execute(item):
            self._q.put(None)  # died inline: let the idle worker thread exit
        return item.future

    def _fail_queue(self) -> None:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.future.set_exception(WorkerDied(f"replica {self.group}#{self.id} died with work queued"))

    @property
    def ready(self) -> bool:
        """Loaded and accepting work."""
        return self.state == READY

    @property
    def alive(self) -> bool:
        """Not dead (loading, ready or draining)."""
        return self.state != DEAD and self._thread.is_alive()

    @property
    def load(self) -> int:
        """Items queued or running (routing key)."""
        return self._q.qsize() + (1 if self._busy.is_set() else 0)

    def queued_tokens(self) -> int:
        """Token-steps of items waiting in the queue (not the running one)."""
        with self._q.mutex:
            return sum(it.tokens for it in self._q.queue if it is not None)

    def weight_bytes(self) -> int:
        """Bytes of the weights this replica holds (0 before it has loaded)."""
        mods = self.modules
        if not isinstance(mods, torch.nn.Module):
            return 0
        return sum(p.numel() * p.element_size() for p in mods.parameters())

    def submit(self, item: WorkItem) -> Future:
        """Queue a work item; fails it at once if the replica is dead."""
        if self.state == DEAD:
            item.future.set_exception(WorkerDied(f"replica {self.group}#{self.id} is dead"))
        else:
            self._q.put(item)
        return item.future

    def kill(self) -> None:
        """Fault injection: the replica dies at the end of its next item, failing it and its queue.

        "Its next item" includes a fused item run by a co-located replica with this
        replica's weights (see :meth:`check_peer`).
        """
        self._kill_next.set()

    def check_peer(self) -> None:
        """Called by a fused item after using this replica's weights from another thread.

        If the replica was killed it dies now (its queue fails, its thread exits) and
        :class:`PeerDied` is raised, so the fused item fails without killing its runner.
        """
        if not self._kill_next.is_set():
            return
        self.state = DEAD
        self._fail_queue()
        self._q.put(None)
        raise PeerDied(f"replica {self.group}#{self.id} was killed mid-batch")

    def stop(self) -> None:
        """Let the worker finish its queue and exit."""
        if self.state != DEAD:
            self.state = DRAINING
        self._q.put(None)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker thread to exit."""
        self._thread.join(timeout)

    @property
    def exited(self) -> bool:
        """The worker thread has ended (nothing runs on this replica's thread any more)."""
        return not self._thread.is_alive()

    def release(self) -> None:
        """Drop the replica's weights and KV cache (call once nothing will run on it again).

        Their device memory goes back to the allocator now, not whenever the garbage
        collector breaks the engine's reference cycles.
        """
        self.modules = None
        self.kv = None


def assign_slots(plan: Plan) -> dict[str, list[str]]:
    """Placement slots for every replica of every group.

    - ``model``: replica ``i`` of every ``model`` group sits in whole-model instance slot ``m{i}``.
    - ``dedicated``: each replica gets a slot of its own, ``d:{group}:{i}``.
    - ``pack``: replicas fill the non-dedicated slots already open (``m*`` first, in order,
      round-robin), and open ``p{i}`` slots only where none is open.

    On a CPU machine a slot stands for one GPU's worth of placement (``gpus_in_use`` counts
    distinct slots); on CUDA slots map round-robin to devices (see :func:`slot_devices`).
    """
    slots: dict[str, list[str]] = {}
    shared: list[str] = []
    for g in OPERATOR_GROUPS:
        op = plan[g]
        if op.placement == "model":
            slots[g] = [f"m{i}" for i in range(op.replicas)]
            shared.extend(s for s in slots[g] if s not in shared)
        elif op.placement == "dedicated":
            slots[g] = [f"d:{g}:{i}" for i in range(op.replicas)]
    packed = [g for g in OPERATOR_GROUPS if plan[g].placement == "pack"]
    if packed and not shared:
        shared = [f"p{i}" for i in range(max(plan[g].replicas for g in packed))]
    for g in packed:
        slots[g] = [shared[i % len(shared)] for i in range(plan[g].replicas)]
    return slots


def slot_devices(slots: dict[str, list[str]], device: str) -> dict[str, str]:
    """Map every slot to a torch device: all to ``device`` unless it is ``cuda`` (then round-robin)."""
    names = sorted({s for ss in slots.values() for s in ss})
    if device != "cuda":
        return {s: device for s in names}
    n = max(torch.cuda.device_count(), 1)
    return {s: f"cuda:{i % n}" for i, s in enumerate(names)}


def clone_to(modules: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A copy of ``modules`` on ``device`` (this is what "loading weights" costs).

    Each parameter and buffer is copied once, straight from where it lives to ``device``
    (host-to-device for a CPU master); the module structure is deep-copied around the new
    tensors, so the host never holds a second copy of the weights. Parameters shared
    between modules stay shared in the copy. Copies from pinned host memory to a CUDA
    device are issued asynchronously (``non_blocking``) and the device is synchronised once
    at the end, so they run at DMA speed and overlap each other.
    """
    if not isinstance(modules, torch.nn.Module):
        return copy.deepcopy(modules)
    device = torch.device(device)
    memo: dict[int, Any] = {}
    async_copies = False
    for t in list(modules.parameters()) + list(modules.buffers()):
        if id(t) in memo:
            continue
        nb = device.type == "cuda" and t.device.type == "cpu" and t.is_pinned()
        async_copies |= nb
        data = t.detach().to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None,
                             non_blocking=nb)
        memo[id(t)] = torch.nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else data
    if async_copies:
        torch.cuda.synchronize(device)
    return copy.deepcopy(modules, memo)


def pin_host(modules: torch.nn.Module) -> int:
    """Move the CPU parameters and buffers of ``modules`` into pinned (page-locked) memory, in place.

    Only meaningful when replicas load onto CUDA devices: a host-to-device copy from pinned
    memory runs at PCIe/NVLink DMA speed, from pageable memory through a staging buffer.
    Tensors already pinned or not on the CPU are left alone; without CUDA nothing is done.
    Returns the bytes newly pinned.
    """
    if not torch.cuda.is_available():
        return 0
    pinned = 0
    seen: set[int] = set()
    for t in list(modules.parameters()) + list(modules.buffers()):
        if id(t) in seen or t.device.type != "cpu" or t.is_pinned():
            continue
        seen.add(id(t))
        t.data = t.data.pin_memory()
        pinned += t.numel() * t.element_size()
    return pinned
