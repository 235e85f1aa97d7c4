"""The :class:`Scenario`: every knob of a simulated serving cluster in one dataclass.

A scenario names the model, GPU and trace, the control interval, the SLO (as multiples of
the unloaded latency unless given in seconds), the cost weights of the reward and the
physical constants of the world model (weight-load bandwidth, KV reservation, prefill
chunk, micro-batches, contention). ``Scenario.from_yaml(path, **overrides)`` reads
``envs/configs/*.yaml``; every field has a default, so ``Scenario()`` is the default
production-scale scenario documented in docs/SIMULATOR.md.

Units: seconds, tokens, bytes, bytes per second, watts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from runtime.codec import CodecConfig
from runtime.control import OperatorPlan, Plan
from runtime.models import OPERATOR_GROUPS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ScenarioError(ValueError):
    """A scenario file or override that names an unknown field or holds a bad value."""


def _read_yaml(p: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """The fields of scenario file ``p`` with its ``extends`` chain resolved (``seen``: the
    files that extend it, to refuse cycles)."""
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        where = f" (extended by {seen[-1]})" if seen else ""
        raise ScenarioError(f"{p}: no such scenario file{where}") from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{p}: a scenario file must be a mapping of field: value")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ScenarioError(f"{p}: 'extends' must name another scenario file, got {base!r}")
    parent = (p.parent / base).resolve()
    if parent in seen or parent == p.resolve():
        raise ScenarioError(f"{p}: 'extends: {base}' makes a cycle of scenario files")
    merged = _read_yaml(parent, seen + (p.resolve(),))
    codec = {**dict(merged.get("codec") or {}), **dict(data.get("codec") or {})}
    merged.update(data)
    if codec:
        merged["codec"] = codec
    return merged


@dataclass(frozen=True)
class Scenario:
    """A simulated cluster and its workload.

    Attributes:
        model: model preset name (runtime.models.MODELS).
        gpu: GPU name known to ProfileDB (``h100``, ``a100``, ...).
        trace: trace name or CSV path for traces.load_trace.
        rate_scale: arrival-rate multiplier applied to the trace (2 = twice the rate).
        train_frac: share of the trace (by time) before the held-out ``test`` split; the rest
            (the end of the trace) is held out and only reported on.
        val_frac: share of the trace (by time) at the end of those ``train_frac``, kept out of
            training for validation (checkpoint selection and recipe choices). Splits of a
            trace of duration D: ``train`` [0, (train_frac - val_frac) D), ``val``
            [(train_frac - val_frac) D, train_frac D), ``trainval`` = both, ``test`` the rest.
        interval_s: control interval (seconds of trace time per env step).
        episode_intervals: env steps per episode (episode = a window of this many intervals).
        max_gpus: GPUs the cluster may use; plans needing more are repaired.
        tp: tensor-parallel degree per operator group for non-``model`` placements.
        model_tp: tensor-parallel degree of a whole-model instance.
        initial_replicas: whole-model instances of the initial plan (placement ``model``).
        initial_max_batch: batch limit of the initial plan (sequences per iteration).
        slo_ttft_scale: TTFT p99 target as a multiple of the unloaded prefill time of a
            ``slo_ref_prompt_tokens`` prompt on one ``model_tp`` instance.
        slo_tbt_scale: TBT p99 target as a multiple of the unloaded decode iteration (batch 1,
            context ``slo_ref_prompt_tokens``) on one ``model_tp`` instance.
        slo_ttft_s, slo_tbt_s: explicit targets (seconds); override the scales when set.
        slo_ref_prompt_tokens: prompt length the unloaded latency is measured at (tokens).
        attainment_target: share of requests that must meet both targets.
        w_slo, w_gpu, w_energy, w_miss: reward = w_slo * attainment - w_gpu * GPUs / max_gpus
            - w_energy * energy / (max_gpus * peak power * interval)
            - w_miss * max(0, attainment_target - attainment) (the interval's shortfall below
            the target; 0 turns the term off).
        prefill_chunk_tokens: most prompt tokens one iteration prefills (chunked prefill).
        micro_batches: micro-batches that ping-pong between disaggregated pools (the most,
            with ``micro_batching: adaptive``).
        micro_batching: ``adaptive`` (each iteration runs as the number of micro-batches in
            1..micro_batches that finishes it soonest, ties to fewer: a decode-only iteration
            of memory-bound GEMMs runs whole, a prefill chunk is split to overlap the pools)
            or ``fixed`` (always ``micro_batches``).
        micro_batch_slack: with ``adaptive``, an iteration runs as the fewest micro-batches
            whose time is within ``1 + micro_batch_slack`` of the fastest count's (0 = the
            fastest): each extra micro-batch re-reads every weight of the memory-bound GEMMs,
            so a split that saves little time costs busy GPU time, hence energy.
        pool_dispatch: how a stateless remote pool (projections, MLP) shares a merged call among
            its replicas. ``spread``: every replica takes an equal part of every call.
            ``fill``: a call of decode tokens only (one token per sequence) goes to the fewest
            replicas that take it in parts of at most the pool's ``max_batch`` sequences, as the
            runtime's engine cuts it; calls carrying prompt tokens are spread. In the
            memory-bound range a GEMM takes about as long for 30 tokens as for 200 and reads its
            weights once per call, so spreading decodes costs busy time (energy) for little speed.
        kv_reserve_tokens: KV tokens per batch slot a ``pack`` attention replica reserves.
        gpu_mem_util: share of GPU memory the server may use (vLLM gpu_memory_utilization).
        load_bw_bytes_per_s: weight-load bandwidth per GPU when a replica starts (bytes/s).
        replica_start_s: fixed start-up time of a new replica (process, CUDA graphs), seconds.
        contention: slowdown per unit of co-located busy share (see docs/SIMULATOR.md).
        max_queue_wait_s: a request still waiting for admission after this long is rejected.
        drain_residual: fast model only: a removed attention unit keeps its GPUs for this share
            of the recent p99 output length in decode iterations (1.0 until session 13, the
            whole length; the reference drains each unit until its last sequence finishes).
        kv_migration: a removed attention unit first hands its sequences (their KV, copied at the
            measured send/recv time) to the serving units with a free batch slot and KV room, as
            the runtime's engine does (``runtime/engine.py`` ``_retire``); only what does not fit
            drains on the removed unit. False = every sequence drains where it is (sessions 1-15).
        max_request_tokens: prompt + output limit (tokens); longer trace requests are clipped
            (output to half of it, then the prompt to the rest), as Vidur clips to its max
            tokens. None = the model's context length (4096 for Llama-2).
        history_len: request-rate history length in ClusterState (intervals).
        codec: CodecConfig fields that fix the observation/action layout.
    """

    model: str = "llama-2-70b"
    gpu: str = "h100"
    trace: str = "azure"
    rate_scale: float = 1.0
    train_frac: float = 0.7
    val_frac: float = 0.15
    interval_s: float = 5.0
    episode_intervals: int = 120
    max_gpus: int = 64
    tp: Mapping[str, int] = field(default_factory=lambda: {"embed": 1, "attn": 1, "proj": 1, "mlp": 2,
                                                           "head": 1})
    model_tp: int = 4
    initial_replicas: int = 8
    initial_max_batch: int = 64
    slo_ttft_scale: float = 3.0
    slo_tbt_scale: float = 5.0
    slo_ttft_s: float | None = None
    slo_tbt_s: float | None = None
    slo_ref_prompt_tokens: int = 4096
    attainment_target: float = 0.99
    w_slo: float = 1.0
    w_gpu: float = 0.5
    w_energy: float = 0.1
    w_miss: float = 0.0
    prefill_chunk_tokens: int = 1024
    micro_batches: int = 2
    micro_batching: str = "adaptive"
    micro_batch_slack: float = 0.0
    pool_dispatch: str = "spread"
    kv_reserve_tokens: int = 2048
    gpu_mem_util: float = 0.9
    load_bw_bytes_per_s: float = 3.0e9
    replica_start_s: float = 1.0
    contention: float = 0.5
    max_queue_wait_s: float = 120.0
    drain_residual: float = 1.0
    kv_migration: bool = False
    max_request_tokens: int | None = None
    history_len: int = 8
    codec: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("rate_scale", "interval_s", "load_bw_bytes_per_s", "gpu_mem_util"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ScenarioError(f"scenario field {name!r} must be > 0, got {v!r}")
        if not isinstance(self.kv_migration, bool):
            raise ScenarioError(f"scenario field 'kv_migration' must be true or false, got {self.kv_migration!r}")
        if not (isinstance(self.drain_residual, (int, float)) and 0.0 < self.drain_residual <= 1.0):
            raise ScenarioError(f"scenario field 'drain_residual' must be in (0, 1], got {self.drain_residual!r}")
        if not 0.0 < self.train_frac < 1.0:
            raise ScenarioError(f"scenario field 'train_frac' must be in (0, 1), got {self.train_frac!r}")
        if not 0.0 < self.val_frac < self.train_frac:
            raise ScenarioError(f"scenario field 'val_frac' must be in (0, train_frac={self.train_frac!r}), "
                                f"got {self.val_frac!r}")
        for name in ("episode_intervals", "max_gpus", "prefill_chunk_tokens", "micro_batches",
                     "kv_reserve_tokens", "initial_replicas", "initial_max_batch"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ScenarioError(f"scenario field {name!r} must be an integer >= 1, got {v!r}")
        if self.micro_batching not in ("adaptive", "fixed"):
            raise ScenarioError(f"scenario field 'micro_batching' must be 'adaptive' or 'fixed', "
                                f"got {self.micro_batching!r}")
        if not (isinstance(self.micro_batch_slack, (int, float)) and 0.0 <= self.micro_batch_slack <= 1.0):
            raise ScenarioError(f"scenario field 'micro_batch_slack' must be in [0, 1], got {self.micro_batch_slack!r}")
        if self.pool_dispatch not in ("spread", "fill"):
            raise ScenarioError(f"scenario field 'pool_dispatch' must be 'spread' or 'fill', got {self.pool_dispatch!r}")
        missing = set(OPERATOR_GROUPS) - set(self.tp)
        if missing or set(self.tp) - set(OPERATOR_GROUPS):
            raise ScenarioError(f"scenario field 'tp' must give each of {OPERATOR_GROUPS}, got {dict(self.tp)}")
        for g, t in list(self.tp.items()) + [("model_tp", self.model_tp)]:
            if t not in (1, 2, 4, 8):
                raise ScenarioError(f"scenario tensor parallelism for {g!r} must be 1, 2, 4 or 8, got {t!r}")
        try:
            CodecConfig.from_dict(dict(self.codec))
        except TypeError as e:
            raise ScenarioError(f"scenario field 'codec': {e}") from None

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_yaml(path: str | Path = DEFAULT_CONFIG, **overrides: Any) -> "Scenario":
        """Read a scenario YAML (a mapping of field: value), then apply ``overrides``.

        A file may start from another one with ``extends: OTHER.yaml`` (a path relative to the
        file): OTHER's fields first, then this file's (a ``codec`` mapping is merged key by key).
        """
        p = Path(path)
        return Scenario.from_dict({**_read_yaml(p, ()), **overrides}, source=str(p))

    @staticmethod
    def from_dict(data: Mapping[str, Any], source: str = "scenario") -> "Scenario":
        """Build from a mapping; unknown keys raise ScenarioError naming them and ``source``."""
        known = {f.name for f in fields(Scenario)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScenarioError(f"{source}: unknown scenario fields {unknown}; known: {sorted(known)}")
        kw = dict(data)
        floats = {f.name for f in fields(Scenario) if f.type in ("float", "float | None")}
        for k in floats & set(kw):
            if isinstance(kw[k], str):  # YAML 1.1 reads "3e9" as a string
                try:
                    kw[k] = float(kw[k])
                except ValueError:
                    raise ScenarioError(f"{source}: field {k!r} must be a number, got {kw[k]!r}") from None
        if "tp" in kw and kw["tp"] is not None:
            kw["tp"] = {**Scenario().tp, **dict(kw["tp"])}
        try:
            return Scenario(**kw)
        except TypeError as e:
            raise ScenarioError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> "Scenario":
        """A copy with fields changed (validated)."""
        return Scenario.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready form."""
        d = dataclasses.asdict(self)
        d["tp"] = dict(self.tp)
        d["codec"] = dict(self.codec)
        return d

    # ------------------------------------------------------------------ derived
    @property
    def codec_config(self) -> CodecConfig:
        """The codec limits of this scenario (max_gpus and history follow the scenario)."""
        base = {"max_gpus": self.max_gpus, "history_len": self.history_len}
        return CodecConfig.from_dict({**base, **dict(self.codec)})

    def initial_plan(self) -> Plan:
        """``initial_replicas`` whole-model instances of ``model_tp`` GPUs."""
        return Plan.model_level(self.initial_replicas, self.initial_max_batch, self.model_tp)

    def disaggregated_plan(self, replicas: Mapping[str, int], max_batch: int = 64,
                           placement: str = "dedicated") -> Plan:
        """A plan with every group on its own pool at the scenario's per-group tp."""
        return Plan({g: OperatorPlan(int(replicas[g]), max_batch, placement, int(self.tp[g]))
                     for g in OPERATOR_GROUPS})
