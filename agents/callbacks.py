"""stable-baselines3 callbacks: per-episode serving metrics and hyperparameters in TensorBoard.

The env reports each interval's raw metrics in ``info`` (``slo_attainment``, ``gpus``,
``energy_j``, ``ttft_p99_s``, ``tbt_p99_s``, ``requests_finished``). The callback
accumulates them per env and, when an episode ends, records under ``episode/``:

- ``episode/slo_attainment``: share of the episode's finished requests meeting both SLOs
  (intervals weighted by requests finished; unweighted mean when counts are absent), 0..1
- ``episode/avg_gpus``: mean GPUs allocated over the episode's intervals
- ``episode/energy_kwh``: energy of the episode (kWh)
- ``episode/ttft_p99_s``, ``episode/tbt_p99_s``: mean over intervals of the interval p99 (s)

A ``summary`` dict in the final ``info`` (the simulator's whole-episode summary), when the
env supplies one, overrides the accumulated attainment and percentiles.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HParam

J_PER_KWH = 3.6e6
SCALARS = ("slo_attainment", "avg_gpus", "energy_kwh", "ttft_p99_s", "tbt_p99_s")


class EpisodeAccumulator:
    """Sums one env's per-interval metrics until its episode ends."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.att_w = self.att_sum = self.att_plain = 0.0
        self.gpus = self.energy = self.ttft = self.tbt = 0.0

    def add(self, info: Mapping[str, Any]) -> None:
        self.n += 1
        att = float(info.get("slo_attainment", 1.0))
        w = float(info.get("requests_finished", 0.0) or 0.0)
        self.att_w += w
        self.att_sum += w * att
        self.att_plain += att
        self.gpus += float(info.get("gpus", 0.0))
        self.energy += float(info.get("energy_j", 0.0))
        self.ttft += float(info.get("ttft_p99_s", 0.0))
        self.tbt += float(info.get("tbt_p99_s", 0.0))

    def scalars(self, summary: Mapping[str, Any] | None = None) -> dict[str, float]:
        n = max(self.n, 1)
        att = self.att_sum / self.att_w if self.att_w > 0 else self.att_plain / n
        out = {"slo_attainment": att, "avg_gpus": self.gpus / n, "energy_kwh": self.energy / J_PER_KWH,
               "ttft_p99_s": self.ttft / n, "tbt_p99_s": self.tbt / n}
        if summary:
            for src, dst in (("attainment", "slo_attainment"), ("slo_attainment", "slo_attainment"),
                             ("ttft_p99_s", "ttft_p99_s"), ("tbt_p99_s", "tbt_p99_s")):
                if src in summary and summary[src] is not None:
                    out[dst] = float(summary[src])
        return out


class EpisodeMetricsCallback(BaseCallback):
    """Logs serving metrics of every finished training episode, and the hyperparameters.

    Args:
        hparams: hyperparameters recorded once at the start (TensorBoard HPARAMS tab).
    """

    def __init__(self, hparams: Mapping[str, Any] | None = None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.hparams = dict(hparams or {})
        self.episodes = 0
        self.last: dict[str, float] = {}
        self._acc: dict[int, EpisodeAccumulator] = defaultdict(EpisodeAccumulator)

    def _on_training_start(self) -> None:
        if self.hparams:
            clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.hparams.items()}
            metrics = {f"episode/{k}": 0.0 for k in SCALARS}
            metrics["rollout/ep_rew_mean"] = 0.0
            self.logger.record("hparams", HParam(clean, metrics), exclude=("stdout", "log", "json", "csv"))

    def _on_step(self) -> bool:
        infos = self.locals.get("infos", [])
        dones = self.locals.get("dones", np.zeros(len(infos), dtype=bool))
        for i, (done, info) in enumerate(zip(dones, infos)):
            acc = self._acc[i]
            acc.add(info)
            if not done:
                continue
            self.episodes += 1
            self.last = acc.scalars(info.get("summary"))
            acc.reset()
            for k, v in self.last.items():
                self.logger.record_mean(f"episode/{k}", v)
            self.logger.record("episode/count", self.episodes)
        return True
