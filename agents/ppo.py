"""The PPO controller: a trained policy loaded from a checkpoint folder.

It sees only the :class:`ClusterState`, encodes it with the shared
:class:`runtime.codec.ObservationEncoder`, normalises it with the statistics saved at
training time (frozen), picks the deterministic action (masked when the policy was trained
with masks) and decodes it into a Plan with :class:`runtime.codec.ActionDecoder`. The decoder keeps each group's
tensor parallelism; when a group's placement changes, the controller sets it as the
training env did (the checkpoint scenario's ``model_tp`` for ``model``, its per-group
``tp`` otherwise). The same object drives the simulator and the live runtime.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from agents.checkpoint import Checkpoint, load_checkpoint
from agents.wrappers import fixed_counts, frozen_mask
from runtime.codec import ActionDecoder, CodecConfig, ObservationEncoder, tp_follows_placement
from runtime.control import ClusterState, Controller, Plan


class PPOController(Controller):
    """Acts with a trained policy.

    Args:
        checkpoint: checkpoint folder, or an already loaded :class:`Checkpoint`.
        codec: when given, the checkpoint must have been trained with this codec.
        scenario: when given, scenario fields the checkpoint must match.
        deterministic: take the most likely action (True for evaluation and serving).
    """

    name = "ppo"

    def __init__(self, checkpoint: str | Path | Checkpoint, codec: CodecConfig | None = None,
                 scenario: Mapping[str, Any] | None = None, deterministic: bool = True) -> None:
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else \
            load_checkpoint(checkpoint, codec=codec, scenario=scenario)
        self.encoder = ObservationEncoder(self.checkpoint.codec)
        self.decoder = ActionDecoder(self.checkpoint.codec)
        self.deterministic = deterministic
        meta = self.checkpoint.metadata
        #: the plan the policy was trained to start from (None: the scenario's initial plan)
        self.initial_plan: Plan | None = Plan.from_dict(meta["initial_plan"]) if meta.get("initial_plan") else None
        #: batch levels and placements frozen during training (replica counts only)
        self.freeze_layout = bool(meta.get("freeze_layout", False))
        #: replica counts frozen during training, {group: count} (checkpoints before session 14: none)
        self.fixed_replicas = fixed_counts(self.initial_plan, tuple(meta.get("freeze_replicas") or ()))
        sc = dict(meta.get("scenario") or {})
        self.model_tp: int | None = int(sc["model_tp"]) if sc.get("model_tp") else None
        self.group_tp: dict[str, int] = {g: int(t) for g, t in dict(sc.get("tp") or {}).items()}
        space = self.checkpoint.model.observation_space
        if space.shape != (self.encoder.size,):
            raise ValueError(f"{self.checkpoint.folder}: policy expects observations of shape {space.shape}, "
                             f"the codec encodes {self.encoder.size} features")

    def observe(self, state: ClusterState) -> np.ndarray:
        """The policy's input for ``state`` (encoded, then normalised)."""
        obs = self.encoder.encode(state)
        norm = self.checkpoint.normaliser
        return norm(obs) if norm is not None else obs

    def act(self, state: ClusterState) -> np.ndarray:
        """The MultiDiscrete action the policy takes in ``state``."""
        obs = self.observe(state)
        kwargs: dict[str, Any] = {"deterministic": self.deterministic}
        if self.checkpoint.maskable:
            kwargs["action_masks"] = (frozen_mask(self.decoder, state.plan, self.fixed_replicas)
                                       if self.freeze_layout else self.decoder.action_mask(state.plan))
        action, _ = self.checkpoint.model.predict(obs, **kwargs)
        return np.asarray(action)

    def decide(self, state: ClusterState) -> Plan:
        plan = self.decoder.decode(self.act(state), state.plan)
        if self.model_tp is None or not self.group_tp:
            return plan
        return tp_follows_placement(plan, state.plan, self.model_tp, self.group_tp)
