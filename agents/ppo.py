"""The PPO controller: a trained policy loaded from a checkpoint folder.

It sees only the :class:`ClusterState`, encodes it with the shared
:class:`runtime.codec.ObservationEncoder`, normalises it with the statistics saved at
training time (frozen), picks the deterministic action (masked when the policy was trained
with masks) and decodes it into a Plan with :class:`runtime.codec.ActionDecoder`. The same
object drives the simulator and the live runtime.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from agents.checkpoint import Checkpoint, load_checkpoint
from runtime.codec import ActionDecoder, CodecConfig, ObservationEncoder
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
            kwargs["action_masks"] = self.decoder.action_mask(state.plan)
        action, _ = self.checkpoint.model.predict(obs, **kwargs)
        return np.asarray(action)

    def decide(self, state: ClusterState) -> Plan:
        return self.decoder.decode(self.act(state), state.plan)
