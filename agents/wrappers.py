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
from runtime.control import Plan


def frozen_mask(decoder: ActionDecoder, prev: Plan) -> np.ndarray:
    """The codec's mask with each group's batch level and placement fixed to ``prev``'s
    (:meth:`runtime.codec.ActionDecoder.action_mask` with ``freeze_layout``)."""
    return decoder.action_mask(prev, freeze_layout=True)


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
