"""``opscale/OperatorScaling-v0``: the Gymnasium shell around a simulator.

One step = one control interval. The action is the codec's MultiDiscrete (per group:
replica delta, batch level, placement), decoded against the current target plan; plans
that do not fit are repaired by the simulator (never a crash), and ``action_masks()``
gives sb3-contrib's MaskablePPO the codec's mask. The observation is
``runtime.codec.ObservationEncoder``'s vector of the simulator's ClusterState. Reward:

    slo_weight * (w_slo * attainment - w_miss * max(0, attainment_target - attainment))
    - w_gpu * gpus / max_gpus - w_energy * joules / (max_gpus * peak_w * interval_s)

``slo_weight`` is 1 unless a trainer sets it (``set_slo_weight``): the Lagrange multiplier of
:class:`agents.callbacks.SLOConstraintCallback`, raised after training rollouts that fall short
of an attainment target and lowered after those that exceed it.

Episodes are windows of ``episode_intervals`` intervals drawn uniformly from the chosen
split of the scenario's trace (``train`` for training, ``val`` for checkpoint selection, ``test`` =
held out for evaluation; envs.scenario_trace).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np

from runtime.codec import ActionDecoder, ObservationEncoder, tp_follows_placement
from runtime.control import ClusterState, Plan

from envs.memo import put
from envs.obs import FastActionDecoder, FastObservationEncoder
from envs.scenario import Scenario

#: Every feature of the codec is >= 0 and, for any sane cluster, far below this bound.
OBS_HIGH = 100.0
ENV_KWARGS = ("scenario", "split", "fidelity", "seed", "trace_obj", "sim_kwargs")


def _scenario(scenario: Scenario | Mapping[str, Any] | str | Path | None, overrides: Mapping[str, Any]) -> Scenario:
    if scenario is None:
        return Scenario.from_yaml(**overrides)
    if isinstance(scenario, Scenario):
        return scenario.replace(**overrides) if overrides else scenario
    if isinstance(scenario, (str, Path)):
        return Scenario.from_yaml(scenario, **overrides)
    return Scenario.from_dict({**dict(scenario), **overrides})


class OperatorScalingEnv(gym.Env):
    """Operator-level autoscaling of one serving cluster.

    Args:
        scenario: a Scenario, a mapping of its fields, or a YAML path (default config if None).
        split: part of the trace episodes are drawn from: ``train``, ``val``, ``trainval``, ``test``
                or ``all`` (envs.scenario_trace). A split shorter than an episode is one episode.
        fidelity: ``fast`` (default) or ``reference``.
        seed: seeds the window sampler (reset(seed=...) reseeds).
        trace_obj: a traces.Trace to draw windows from instead of the scenario's trace.
        rate_mults: request-rate multipliers; with more than one, each episode draws one
            uniformly and replays ``episode_s x k`` seconds of the split compressed into
            ``episode_s`` (``Trace.scale_rate``), so a policy sees loads beyond the recorded
            rate. None or one value: that multiplier for every episode (the default keeps the
            recorded rate and draws nothing extra from the seeded generator).
        sim_kwargs: extra arguments for the simulator.
        **overrides: Scenario fields (e.g. ``model``, ``gpu``, ``trace``, ``interval_s``,
            ``slo_ttft_s``, ``slo_tbt_s``, ``w_gpu``, ``w_energy``, ``w_miss``, ``episode_intervals``).
    """

    metadata = {"render_modes": []}

    def __init__(self, scenario: Scenario | Mapping[str, Any] | str | Path | None = None, split: str = "train",
                 fidelity: str = "fast", seed: int | None = None, trace_obj: Any = None,
                 rate_mults: Sequence[float] | None = None,
                 sim_kwargs: Mapping[str, Any] | None = None, **overrides: Any) -> None:
        from envs import default_slo, predictor_for, scenario_trace

        self.scenario = _scenario(scenario, overrides)
        self.split = split
        self.fidelity = fidelity
        self.sim_kwargs = dict(sim_kwargs or {})
        self.trace = trace_obj if trace_obj is not None else scenario_trace(self.scenario, split)
        self.pred = predictor_for(self.scenario.model, self.scenario.gpu)
        self.slo = default_slo(self.scenario, self.pred)
        codec = self.scenario.codec_config
        self.encoder = ObservationEncoder(codec)
        self._fast_encoder = FastObservationEncoder(codec)
        self._fast_decoder = FastActionDecoder(codec)
        self._tp_cache: dict[int, tuple[Plan, Plan, Plan]] = {}
        self._plan_dict_cache: tuple = (None, {})
        self.decoder = ActionDecoder(codec)
        self.observation_space = gym.spaces.Box(low=0.0, high=OBS_HIGH, shape=(self.encoder.size,),
                                                dtype=np.float32)
        self.action_space = gym.spaces.MultiDiscrete(self.decoder.nvec)
        self.episode_s = self.scenario.episode_intervals * self.scenario.interval_s
        self._cache: dict[str, Any] = {}
        self.sim = None
        self.state: ClusterState | None = None
        self.t = 0
        self._seed_rng = np.random.default_rng(seed)
        self.window_start_s = 0.0
        self.rate_mults = tuple(float(k) for k in (rate_mults or (1.0,)))
        #: multiplier of the reward's SLO terms (see the module docstring); 1 = the scenario's weights
        self.slo_weight = 1.0
        if any(not (math.isfinite(k) and k > 0) for k in self.rate_mults):
            raise ValueError(f"rate_mults must be finite numbers > 0, got {rate_mults!r}")
        self.rate_mult = self.rate_mults[0]

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode on a random window of the split.

        options: ``start_s`` (window start, seconds into the split), ``plan`` (initial Plan or
        its dict form; default the scenario's initial plan).
        """
        super().reset(seed=seed)
        if seed is not None:
            self._seed_rng = np.random.default_rng(seed)
        from envs import make_simulator

        options = options or {}
        k = self.rate_mults[0]
        if len(self.rate_mults) > 1:
            k = self.rate_mults[int(self._seed_rng.integers(len(self.rate_mults)))]
        self.rate_mult = k
        dur = float(self.trace.duration_s or 0.0)
        span = max(dur - self.episode_s * k, 0.0)
        start = float(options.get("start_s", self._seed_rng.uniform(0.0, span) if span > 0 else 0.0))
        self.window_start_s = start
        window = self.trace.window(start, start + self.episode_s * k)
        if k != 1.0:
            window = window.scale_rate(k)
        self.sim = make_simulator(self.scenario, window, fidelity=self.fidelity,
                                  seed=int(self._seed_rng.integers(2**31 - 1)), slo=self.slo,
                                  cache=self._cache, **self.sim_kwargs)
        plan = options.get("plan", self.scenario.initial_plan())
        if isinstance(plan, Mapping):
            plan = Plan.from_dict(plan)
        self.state = self.sim.reset(plan)
        self.t = 0
        return self._obs(), self._info(self.state)

    def step(self, action):
        assert self.sim is not None and self.state is not None, "call reset() first"
        prev = self.sim.timeline.target.plan  # (= target_plan)
        decoded = self._fast_decoder.decode(action, prev)  # = self.decoder.decode (memoised)
        hit = self._tp_cache.get(id(decoded))
        if hit is not None and hit[0] is decoded and hit[1] is prev:
            plan = hit[2]
        else:
            plan = self._tp_follows_placement(decoded)
            put(self._tp_cache, id(decoded), (decoded, prev, plan), 256)
        self.state = self.sim.step(plan)
        self.t += 1
        reward = self._reward(self.state)
        terminated = bool(self.sim.done)
        truncated = self.t >= self.scenario.episode_intervals and not terminated
        return self._obs(), reward, terminated, truncated, self._info(self.state)

    def _tp_follows_placement(self, plan: Plan) -> Plan:
        """The codec keeps tp; a moved group takes its new placement's tp (runtime.codec)."""
        return tp_follows_placement(plan, self.sim.timeline.target_plan, self.scenario.model_tp, self.scenario.tp)

    def action_masks(self) -> np.ndarray:
        """Flat boolean mask of allowed sub-actions (sb3-contrib MaskablePPO layout)."""
        plan = self.sim.timeline.target_plan if self.sim is not None else self.scenario.initial_plan()
        return self.decoder.action_mask(plan)

    # ------------------------------------------------------------------ helpers
    def _obs(self) -> np.ndarray:
        # = np.clip(np.nan_to_num(self.encoder.encode(self.state), nan=0.0), 0.0, OBS_HIGH) (tested)
        return self._fast_encoder.encode(self.state, OBS_HIGH)

    def set_slo_weight(self, weight: float) -> None:
        """Scale the reward's SLO terms (attainment and shortfall) by ``weight`` (>= 0) from now on."""
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"slo_weight must be a finite number >= 0, got {weight!r}")
        self.slo_weight = weight

    def _reward(self, s: ClusterState) -> float:
        sc = self.scenario
        gpu_term = s.gpus_in_use / sc.max_gpus
        energy_term = s.energy_j / (sc.max_gpus * self.pred.gpu.peak_w * sc.interval_s)
        shortfall = max(0.0, sc.attainment_target - s.slo_attainment)
        lam = self.slo_weight
        if lam == 1.0:  # (the scenario's reward, summed in the order it always was)
            return float(sc.w_slo * s.slo_attainment - sc.w_gpu * gpu_term - sc.w_energy * energy_term
                         - sc.w_miss * shortfall)
        return float(lam * (sc.w_slo * s.slo_attainment - sc.w_miss * shortfall) - sc.w_gpu * gpu_term
                     - sc.w_energy * energy_term)

    def _plan_dict(self, plan: Plan) -> dict:
        """``plan.to_dict()``, cached while the plan object stays the same (a fresh copy each call)."""
        if self._plan_dict_cache[0] is not plan:
            self._plan_dict_cache = (plan, plan.to_dict())
        return {g: dict(v) for g, v in self._plan_dict_cache[1].items()}

    def _info(self, s: ClusterState) -> dict[str, Any]:
        m = self.sim.last_metrics
        return {
            "slo_attainment": s.slo_attainment, "gpus": s.gpus_in_use, "energy_j": s.energy_j,
            "ttft_p99_s": s.ttft_p99_s, "tbt_p99_s": s.tbt_p99_s, "ttft_p50_s": s.ttft_p50_s,
            "tbt_p50_s": s.tbt_p50_s, "plan": self._plan_dict(s.plan),
            "requests_finished": float(m.finished), "requests_queued": float(m.queued),
            "requests_rejected": float(m.rejected), "requests_running": float(m.running),
            "repairs": list(self.sim.last_repairs), "time_s": s.time_s,
            "window_start_s": self.window_start_s,
            "rate_mult": self.rate_mult,
        }
