"""Build controllers by name for a scenario: the one place that knows every controller.

``make_controller(name, scenario, ...)`` returns the controller and the plan the run
starts from. Settings of the non-learned controllers come from
``agents/configs/controllers.yaml`` (or a mapping passed in).
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from agents.baselines import ModelLevelConfig, ModelLevelController, StaticController
from agents.context import ControllerContext, ProfileLatency
from agents.operator_queueing import OperatorQueueingConfig, OperatorQueueingController
from runtime.control import SLO, Controller, Plan
from runtime.models import get_model

CONTROLLER_NAMES = ("static", "model-level", "model-level-ongoing", "operator-queueing", "ppo")
CONTROLLERS_CONFIG = Path(__file__).resolve().parent / "configs" / "controllers.yaml"
_DB: Any = None


def profile_db() -> Any:
    """The shipped ProfileDB, loaded once per process."""
    global _DB
    if _DB is None:
        from profiles import ProfileDB

        _DB = ProfileDB.load()
    return _DB


def load_controller_settings(path: str | Path = CONTROLLERS_CONFIG) -> dict[str, dict[str, Any]]:
    """Per-controller settings from YAML; unknown controller names are refused."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(data) - set(CONTROLLER_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown controllers {unknown}; known: {CONTROLLER_NAMES}")
    return {k: dict(v or {}) for k, v in data.items()}


def _dataclass_from(cls: type, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    bad = sorted(set(values) - known)
    if bad:
        raise ValueError(f"{where}: unknown settings {bad}; known: {sorted(known)}")
    return cls(**values)


def _attainment(scenario: Any, trace: Any, fidelity: str, seed: int, plan: Plan) -> tuple[float, Any]:
    from agents.envtools import make_sim
    from agents.evaluate import run_timeline

    sim = make_sim(scenario, trace, fidelity, seed)
    summary, tl = run_timeline(sim, StaticController(plan), plan)
    return float(summary["slo_attainment"]), tl


_CALIBRATION: dict[str, dict[str, float]] = {}


def calibrate_instance(scenario: Any, max_batch: int, fidelity: str = "reference", seed: int = 0) -> dict[str, float]:
    """What one whole-model instance sustains at the SLO, measured in the simulator on the
    ``trainval`` split, all data before the held-out one (the way DynamoLLM-style autoscalers
    are profiled offline).

    The fewest fixed instances meeting the attainment target on that split is
    found by bisection; per instance the capacity is then the split's peak 60 s arrival
    rate / instances (req/s), and the ongoing requests are the 95th percentile of
    running + queued per instance. Cached per scenario and fidelity.
    """
    import json

    from agents.baselines import peak_rate
    from agents.envtools import load_split

    key = json.dumps([scenario.to_dict(), max_batch, fidelity, seed], sort_keys=True, default=str)
    if key in _CALIBRATION:
        return _CALIBRATION[key]
    trace = load_split(scenario, "trainval")
    tp = int(scenario.model_tp)
    runs: dict[int, float] = {}
    st = StaticController.search(lambda p: runs.setdefault(p["attn"].replicas,
                                                            _attainment(scenario, trace, fidelity, seed, p)[0]),
                                 tp, max_batch, scenario.attainment_target, max(1, scenario.max_gpus // tp))
    n = st.plan["attn"].replicas
    out = {"instances": float(n), "rate_per_instance": peak_rate(trace.arrival_s, 60.0) / n,
           "runs": float(len(runs))}
    _CALIBRATION[key] = out
    return out


def controller_context(scenario: Any, slo: SLO, db: Any = None) -> ControllerContext:
    """What the non-learned controllers know about ``scenario`` (profiles, shapes, limits)."""
    db = db or profile_db()
    return ControllerContext(
        model=get_model(scenario.model), slo=slo, latency=ProfileLatency(db, scenario.gpu, scenario.model),
        gpu_memory_bytes=int(db.gpu(scenario.gpu).memory_bytes), tp=int(scenario.model_tp),
        group_tp=dict(scenario.tp), interval_s=float(scenario.interval_s), codec=scenario.codec_config,
        memory_util=float(scenario.gpu_mem_util), kv_reserve_tokens=int(scenario.kv_reserve_tokens),
        prefill_chunk_tokens=int(scenario.prefill_chunk_tokens))


def make_controller(name: str, scenario: Any, *, slo: SLO | None = None, trace: Any = None, checkpoint: str | Path | None = None,
                    settings: Mapping[str, Mapping[str, Any]] | None = None, budget_gpus: int | None = None,
                    db: Any = None, fidelity: str = "reference", seed: int = 0) -> tuple[Controller, Plan]:
    """The controller called ``name`` and its starting plan.

    Args:
        scenario: an ``envs.Scenario``.
        slo: the targets in force (default: the scenario's, ``envs.default_slo``).
        trace: the trace the run serves, as the simulator sees it (static sizes for its peak).
        checkpoint: checkpoint folder (``ppo`` only).
        settings: per-controller settings; default ``agents/configs/controllers.yaml``.
        budget_gpus: cap on GPUs (fixed-budget runs): whole-model controllers never ask for
            more than ``budget_gpus // model_tp`` instances; operator-queueing plans within it.
        fidelity, seed: the simulator that sizes ``static`` (search on ``trace``) and
            calibrates ``model-level`` (on the ``trainval`` split).
    """
    if name not in CONTROLLER_NAMES:
        raise ValueError(f"unknown controller {name!r}; choose from {', '.join(CONTROLLER_NAMES)}")
    settings = settings if settings is not None else load_controller_settings()
    own = dict(settings.get(name, {}))
    codec = scenario.codec_config
    max_instances = codec.max_replicas
    if budget_gpus is not None:
        max_instances = max(1, min(max_instances, int(budget_gpus) // int(scenario.model_tp)))
    if name == "ppo":
        from agents.ppo import PPOController

        if checkpoint is None:
            raise ValueError("the ppo controller needs --checkpoint DIR (a folder written by train.py)")
        ctl = PPOController(checkpoint, codec=codec, scenario={"model": scenario.model, "gpu": scenario.gpu})
        plan0 = ctl.initial_plan or scenario.initial_plan()
        bad = sorted(set(own) - {"downscale_window_s"})
        if bad:
            raise ValueError(f"controllers: ppo: unknown settings {bad}; known: ['downscale_window_s']")
        window = float(own.get("downscale_window_s", 0.0))
        if window > 0:
            from agents.stabilize import DownscaleStabilizer

            return DownscaleStabilizer(ctl, window, float(scenario.interval_s)), plan0
        return ctl, plan0
    if slo is None:
        from envs import default_slo

        slo = default_slo(scenario)
    ctx = controller_context(scenario, slo, db)
    mb = int(own.pop("max_batch", 256))
    own.pop("sizing", None) if name != "static" else None
    if name == "static":
        if trace is None:
            raise ValueError("the static controller needs the trace it serves (to size for its peak)")
        sizing = own.get("sizing", "search")
        if sizing == "search":
            # Peak provisioning at the SLO: the fewest fixed instances that meet it on this trace.
            st = StaticController.search(lambda p: _attainment(scenario, trace, fidelity, seed, p)[0],
                                         int(scenario.model_tp), mb, scenario.attainment_target, max_instances)
        else:
            st = StaticController.for_trace(ctx, trace.arrival_s, trace.prompt_tokens, trace.output_tokens,
                                            window_s=float(own.get("window_s", 60.0)),
                                            target_utilisation=float(own.get("target_utilisation", 0.8)),
                                            max_replicas=max_instances)
        return st, st.plan
    if name in ("model-level", "model-level-ongoing"):
        calibrate = bool(own.pop("calibrate", True))
        cfg = _dataclass_from(ModelLevelConfig, {"max_replicas": max_instances, **own}, f"controllers: {name}")
        cfg.max_replicas = min(cfg.max_replicas, max_instances)
        if calibrate and cfg.capacity_rps <= 0:
            cal = calibrate_instance(scenario, mb, fidelity, seed)
            cfg.capacity_rps = cal["rate_per_instance"]
        ml = ModelLevelController(ctx, cfg)
        ml.name = name
        return ml, scenario.initial_plan()
    own.pop("max_batch", None)
    # the planning model mirrors the scenario's step model unless the settings say otherwise
    for key in ("micro_batches", "micro_batching", "micro_batch_slack", "pool_dispatch", "contention"):
        own.setdefault(key, getattr(scenario, key))
    cfg_q = _dataclass_from(OperatorQueueingConfig, own, f"controllers: {name}")
    if budget_gpus is not None:  # plan within a fixed budget instead of being cut to it
        cfg_q.max_gpus = int(budget_gpus) if cfg_q.max_gpus is None else min(cfg_q.max_gpus, int(budget_gpus))
    oq = OperatorQueueingController(ctx, cfg_q)
    return oq, scenario.initial_plan()
