"""Helpers everyone uses: build the env, and run a Controller through a simulator."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from runtime.control import Controller, Plan


def make_env(scenario: Any = None, split: str = "train", seed: int | None = 0, **kwargs: Any):
    """The env for ``scenario`` (Scenario, mapping of fields, YAML path or None for the default).

    Returns the unwrapped :class:`envs.env.OperatorScalingEnv` (so ``action_masks()`` is
    reachable from SB3 vector envs); ``kwargs`` go to its constructor.
    """
    from envs.env import OperatorScalingEnv

    if isinstance(scenario, Mapping) and not kwargs.get("scenario"):
        return OperatorScalingEnv(dict(scenario), split=split, seed=seed, **kwargs)
    return OperatorScalingEnv(scenario, split=split, seed=seed, **kwargs)


def run_controller(sim: Any, controller: Controller, plan0: Plan, max_steps: int | None = None) -> dict[str, Any]:
    """Reset ``sim`` with ``plan0`` and let ``controller`` decide every interval until done.

    Returns ``sim.summary()`` plus ``steps`` (intervals run) and ``controller`` (its name).
    """
    state = sim.reset(plan0)
    controller.reset(state)
    steps = 0
    while not sim.done and (max_steps is None or steps < max_steps):
        state = sim.step(controller.decide(state))
        steps += 1
    out = dict(sim.summary())
    out["steps"] = steps
    out["controller"] = getattr(controller, "name", type(controller).__name__)
    return out
