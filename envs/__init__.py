"""opscale cluster simulator and Gymnasium environment.

>>> from envs import Scenario, make_simulator, make_env
>>> sim = make_simulator(Scenario(), fidelity="fast")
>>> state = sim.reset(Scenario().initial_plan())

The env id ``opscale/OperatorScaling-v0`` is registered on import.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from runtime.control import SLO

from envs.predictor import ExecutionPredictor
from envs.scenario import Scenario, ScenarioError

FIDELITIES = ("fast", "reference")
ENV_ID = "opscale/OperatorScaling-v0"


@lru_cache(maxsize=4)
def _db(extra: tuple[str, ...] = ()):
    from profiles import ProfileDB

    return ProfileDB.load(list(extra))


@lru_cache(maxsize=16)
def predictor_for(model: str, gpu: str) -> ExecutionPredictor:
    """The shared (memoised) predictor for a model on a GPU, backed by the shipped ProfileDB."""
    return ExecutionPredictor(_db(), model, gpu)


def default_slo(scenario: Scenario, pred: ExecutionPredictor | None = None) -> SLO:
    """The scenario's SLO: explicit seconds if given, else multiples of unloaded latency.

    Unloaded latency = one ``model_tp`` whole-model instance, batch 1: chunked prefill of a
    ``slo_ref_prompt_tokens`` prompt (TTFT) and one decode iteration at that context (TBT).
    """
    pred = pred or predictor_for(scenario.model, scenario.gpu)
    ttft = scenario.slo_ttft_s
    tbt = scenario.slo_tbt_s
    if ttft is None:
        ttft = scenario.slo_ttft_scale * pred.chunked_prefill_ms(
            scenario.model_tp, scenario.slo_ref_prompt_tokens, scenario.prefill_chunk_tokens) / 1e3
    if tbt is None:
        tbt = scenario.slo_tbt_scale * pred.decode_ms(scenario.model_tp, 1, scenario.slo_ref_prompt_tokens) / 1e3
    return SLO(float(ttft), float(tbt), 99.0, scenario.attainment_target)


@lru_cache(maxsize=8)
def _base_trace(name: str, rate_scale: float):
    from traces import load_trace

    tr = load_trace(name)
    return tr.scale_rate(rate_scale) if rate_scale != 1.0 else tr


#: the trace splits by time (``scenario_trace`` also takes ``all``, the whole trace)
SPLITS = ("train", "val", "trainval", "test")


def scenario_trace(scenario: Scenario, split: str = "all"):
    """The scenario's trace at its rate scale, whole (``all``) or one split by time.

    ``train`` (PPO's episodes), ``val`` (checkpoint selection and recipe choices), ``trainval``
    (both: what the non-learned controllers are calibrated and tuned on) and ``test`` (held
    out, only reported on); boundaries in ``Scenario`` (``train_frac``, ``val_frac``).
    """
    if split != "all" and split not in SPLITS:
        raise ValueError(f"split must be one of all, {', '.join(SPLITS)}, got {split!r}")
    tr = _base_trace(scenario.trace, float(scenario.rate_scale))
    if split == "all":
        return tr
    trainval, test = tr.split(scenario.train_frac)
    if split == "test":
        return test
    if split == "trainval":
        return trainval
    train, val = trainval.split(1.0 - scenario.val_frac / scenario.train_frac)
    return train if split == "train" else val


def make_simulator(scenario: Scenario | None = None, trace: Any = None, fidelity: str = "fast", seed: int = 0,
                   slo: SLO | None = None, pred: ExecutionPredictor | None = None, **kwargs: Any):
    """Build a simulator of ``scenario`` over ``trace`` (default: the scenario's whole trace).

    Args:
        scenario: the scenario (default: envs/configs/default.yaml).
        trace: a traces.Trace; None loads the scenario's trace at its rate scale.
        fidelity: ``fast`` (fluid, for training) or ``reference`` (discrete-event).
        seed: seed for the reference's tie-breaking.
        slo: override the scenario's SLO.
        pred: an execution-time predictor over another ProfileDB (default: the shipped one).
        kwargs: passed to the simulator class (e.g. ``sub_steps`` for fast).
    """
    scenario = scenario or Scenario.from_yaml()
    pred = pred or predictor_for(scenario.model, scenario.gpu)
    trace = scenario_trace(scenario) if trace is None else trace
    slo = slo or default_slo(scenario, pred)
    if fidelity == "fast":
        from envs.fast import FastSimulator

        return FastSimulator(scenario, trace, pred, slo, seed, **kwargs)
    if fidelity == "reference":
        from envs.reference import ReferenceSimulator

        return ReferenceSimulator(scenario, trace, pred, slo, seed, **kwargs)
    raise ValueError(f"fidelity must be one of {FIDELITIES}, got {fidelity!r}")


def _register() -> None:
    import gymnasium

    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="envs.env:OperatorScalingEnv")


_register()

from envs.runner import make_env, run_controller  # noqa: E402

__all__ = ["Scenario", "ScenarioError", "make_simulator", "make_env", "run_controller", "default_slo",
           "predictor_for", "scenario_trace", "SPLITS", "ENV_ID", "FIDELITIES"]
