"""Training-time restriction of the env: start every episode from a chosen plan and,
optionally, freeze each group's batch level and placement so the policy learns replica
counts only.

The same restriction is recorded in the checkpoint (``metadata.json``: ``initial_plan``,
``freeze_layout``) and applied by :class:`agents.ppo.PPOController`, so the policy acts
in evaluation and serving exactly as it was trained.
"""
from __future__ import annotations

from typing import Any, Mapping

import gymnasium as gym
import numpy as np

from runtime.codec import ActionDecoder
from runtime.control import PLACEMENTS, Plan
from runtime.models import OPERATOR_GROUPS


def frozen_mask(decoder: ActionDecoder, prev: Plan) -> np.ndarray:
    """The codec's mask with each group's batch level and placement fixed to ``prev``'s."""
    c = decoder.config
    mask = decoder.action_mask(prev).copy()
    levels = np.asarray(c.batch_levels)
    nd, nb, npl = decoder.n_replica_choices, len(c.batch_levels), len(PLACEMENTS)
    per = nd + nb + npl
    for k, g in enumerate(OPERATOR_GROUPS):
        base = k * per
        b_idx = int(np.argmin(np.abs(levels - prev[g].max_batch)))
        mask[base + nd:base + nd + nb] = False
        mask[base + nd + b_idx] = True
        mask[base + nd + nb:base + per] = False
        mask[base + nd + nb + PLACEMENTS.index(prev[g].placement)] = True
    return mask


class PlanRestriction(gym.Wrapper):
    """Starts episodes from ``initial_plan`` and (``freeze_layout``) masks batch and
    placement changes. Exposes ``action_masks()`` for MaskablePPO."""

    def __init__(self, env: gym.Env, initial_plan: Plan | Mapping[str, Any] | None = None,
                 freeze_layout: bool = False) -> None:
        super().__init__(env)
        self.initial_plan = Plan.from_dict(initial_plan) if isinstance(initial_plan, Mapping) else initial_plan
        self.freeze_layout = freeze_layout

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        options = dict(options or {})
        if self.initial_plan is not None:
            options.setdefault("plan", self.initial_plan)
        return self.env.reset(seed=seed, options=options)

    def action_masks(self) -> np.ndarray:
        base = self.env.unwrapped
        if not self.freeze_layout:
            return base.action_masks()
        return frozen_mask(base.decoder, base.sim.timeline.target_plan)
