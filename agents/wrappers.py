"""Training-time restriction of the env: start every episode from a chosen plan and,
optionally, freeze each group's batch level and placement so the policy learns replica
counts only, and freeze some groups' replica counts too.

The same restriction is recorded in the checkpoint (``metadata.json``: ``initial_plan``,
``freeze_layout``, ``freeze_replicas``) and applied by :class:`agents.ppo.PPOController`, so
the policy acts in evaluation and serving exactly as it was trained.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np

from runtime.codec import ActionDecoder
from runtime.control import Plan
from runtime.models import OPERATOR_GROUPS


def frozen_mask(decoder: ActionDecoder, prev: Plan, fixed_replicas: Mapping[str, int] | None = None) -> np.ndarray:
    """The codec's mask with each group's batch level and placement fixed to ``prev``'s
    (:meth:`runtime.codec.ActionDecoder.action_mask` with ``freeze_layout``), and, for each group
    of ``fixed_replicas``, only the replica choices that land nearest its fixed count (from
    ``prev``'s count, so a plan changed from outside, e.g. topped up to a budget, returns to it)."""
    mask = decoder.action_mask(prev, freeze_layout=True)
    if fixed_replicas:
        nd = decoder.n_replica_choices
        nvec = decoder.nvec
        offset = 0
        for k, g in enumerate(OPERATOR_GROUPS):
            if g in fixed_replicas:
                mask[offset:offset + nd] &= decoder.nearest_replica_choices(prev[g].replicas, fixed_replicas[g])
            offset += int(nvec[3 * k] + nvec[3 * k + 1] + nvec[3 * k + 2])
    return mask


def fixed_counts(initial_plan: Plan | None, freeze_replicas: Sequence[str]) -> dict[str, int]:
    """{group: the initial plan's replica count} for the groups in ``freeze_replicas``."""
    if not freeze_replicas:
        return {}
    if initial_plan is None:
        raise ValueError(f"freeze_replicas {list(freeze_replicas)} needs an initial_plan (it holds the frozen counts)")
    return {g: int(initial_plan[g].replicas) for g in freeze_replicas}


class PlanRestriction(gym.Wrapper):
    """Starts episodes from ``initial_plan`` and (``freeze_layout``) masks batch and
    placement changes, and replica changes of the groups in ``freeze_replicas``, which keep the
    initial plan's counts (needs ``freeze_layout`` and ``initial_plan``). Exposes
    ``action_masks()`` for MaskablePPO."""

    def __init__(self, env: gym.Env, initial_plan: Plan | Mapping[str, Any] | None = None,
                 freeze_layout: bool = False, freeze_replicas: Sequence[str] = ()) -> None:
        unknown = sorted(set(freeze_replicas) - set(OPERATOR_GROUPS))
        if unknown:
            raise ValueError(f"freeze_replicas: unknown operator groups {unknown}; expected some of {OPERATOR_GROUPS}")
        if freeze_replicas and not freeze_layout:
            raise ValueError("freeze_replicas needs freeze_layout (the frozen mask carries it)")
        plan = Plan.from_dict(initial_plan) if isinstance(initial_plan, Mapping) else initial_plan
        self.fixed_replicas = fixed_counts(plan, freeze_replicas)   # raises without an initial plan
        super().__init__(env)
        self.initial_plan = plan
        self.freeze_layout = freeze_layout
        #: frozen masks by what they depend on (each group's replicas, batch limit and placement):
        #: MaskablePPO asks at every step, and a mask took several numpy calls to build
        self._masks: dict[tuple, np.ndarray] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        options = dict(options or {})
        if self.initial_plan is not None:
            options.setdefault("plan", self.initial_plan)
        return self.env.reset(seed=seed, options=options)

    def action_masks(self) -> np.ndarray:
        base = self.env.unwrapped
        if not self.freeze_layout:
            return base.action_masks()
        prev = base.sim.timeline.target_plan
        ops = prev.ops
        key = tuple([(ops[g].replicas, ops[g].max_batch, ops[g].placement) for g in OPERATOR_GROUPS])
        hit = self._masks.get(key)
        if hit is None:
            if len(self._masks) >= 4096:
                self._masks.clear()
            hit = self._masks[key] = frozen_mask(base.decoder, prev, self.fixed_replicas)
            hit.flags.writeable = False
        return hit.copy()  # (a fresh array each call, as frozen_mask returns)
