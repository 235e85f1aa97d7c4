"""The agents' view of the simulator package: scenarios, trace splits, simulators, envs.

Everything agents/ and train.py need from ``envs`` goes through these few functions, so
the controllers and the training code depend on one small surface.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.control import ClusterState, Plan


def load_scenario(path: str | Path | None = None, **overrides: Any) -> Any:
    """``envs.Scenario`` from a YAML file (default: envs/configs/default.yaml) plus overrides."""
    from envs.scenario import DEFAULT_CONFIG, Scenario

    p = Path(path) if path else DEFAULT_CONFIG
    if p.is_file() or path:
        return Scenario.from_yaml(p, **overrides)
    return Scenario.from_dict(overrides)


def load_split(scenario: Any, split: str, window_s: float | None = None) -> Any:
    """The scenario's trace split (``train``, ``val``, ``trainval``, ``test``; envs.scenario_trace)
    as the simulator serves it (rate scaled by ``scenario.rate_scale``), optionally only its
    first ``window_s`` seconds."""
    from envs import scenario_trace

    tr = scenario_trace(scenario, split)
    if window_s is not None:
        tr = tr.window(0.0, float(window_s))
    return tr


def make_sim(scenario: Any, trace: Any, fidelity: str = "reference", seed: int = 0) -> Any:
    """``envs.make_simulator`` for ``trace`` (already split and scaled)."""
    from envs import make_simulator

    return make_simulator(scenario, trace, fidelity=fidelity, seed=seed)


def make_env(scenario: Any, split: str = "train", seed: int = 0, fidelity: str = "fast",
             rate_mults: Any = None) -> Any:
    """The Gymnasium env of ``scenario`` on ``split`` with the given simulator fidelity
    (``rate_mults``: per-episode request-rate multipliers, see ``envs.env.OperatorScalingEnv``)."""
    from envs import make_env as _make_env

    return _make_env(scenario, split=split, seed=seed, fidelity=fidelity, rate_mults=rate_mults)


def env_state(env: Any) -> ClusterState:
    """The ClusterState the env's latest observation encodes."""
    return env.unwrapped.state


def env_prev_plan(env: Any) -> Plan:
    """The plan the env decodes the next action against (its target plan)."""
    return env.unwrapped.sim.timeline.target_plan
