"""Who shares a GPU with whom: the co-residence table behind contention and power.

A placed plan is a set of GPUs, each holding replica shards of processes (a process is an
operator group, or ``model`` for whole-model instances). Both the simulator's placer
(envs/world.py) and the operator-queueing controller's planning model
(agents/operator_queueing.py) describe their GPUs as ``(count, {process: shards on each GPU})``
and derive from it:

* ``co_residence``: for each process, how many *other* replica shards a shard of it shares its
  GPU with, per process, averaged over the process's shards. Shards of the same process count
  too: three attention replicas packed onto one GPU each have two co-residents, exactly as an
  attention replica beside two MLP shards has. The contention model slows a shard by
  ``1 + contention * sum(co-residents x their busy share)``.
* ``gpu_busy``: the summed busy share of every shard on one GPU (the power model's load, capped
  by the caller).

Until session 9 both counted each *process* on a GPU once, so packed replicas of one group
neither slowed each other nor added to the GPU's power (docs/SIMULATOR.md, "Placement").
"""
from __future__ import annotations

from typing import Iterable, Mapping


def co_residence(gpus: Iterable[tuple[int, Mapping[str, int]]]) -> dict[str, dict[str, float]]:
    """Per process, the mean number of other shards of each process on its GPUs.

    Args:
        gpus: ``(count, {process: shards on each of these GPUs})`` per class of identical GPUs.

    Returns:
        ``{process: {other process: co-resident shards per shard}}``; a process's own entry
        counts its other shards on the same GPU. Zero entries are left out, so a process
        alone on its GPUs maps to ``{}``.
    """
    gpus = list(gpus)
    shards: dict[str, float] = {}
    for count, procs in gpus:
        for proc, k in procs.items():
            shards[proc] = shards.get(proc, 0.0) + count * k
    out: dict[str, dict[str, float]] = {}
    for proc, total in shards.items():
        share: dict[str, float] = {}
        for count, procs in gpus:
            k = procs.get(proc, 0)
            if not k:
                continue
            for other, j in procs.items():
                n = j - 1 if other == proc else j
                if n > 0:
                    share[other] = share.get(other, 0.0) + count * k * n / total
        out[proc] = share
    return out


def gpu_busy(procs: Mapping[str, int], util: Mapping[str, float]) -> float:
    """Summed busy share (0..) of the shards on one GPU: each shard of a process is busy for
    ``util[process]`` of the time (the busy share of one of its replicas). Not capped."""
    return sum([k * util.get(proc, 0.0) for proc, k in procs.items()])  # (a list: cheaper than a generator)
