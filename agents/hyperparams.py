"""PPO hyperparameters from a YAML file laid out as in RL Baselines3 Zoo.

The file maps env ids to blocks of hyperparameters; :func:`load_hyperparams` returns the
block of one env id as a :class:`PPOHyperparams`, refusing unknown keys by name.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

ENV_ID = "opscale/OperatorScaling-v0"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "ppo.yaml"


@dataclass
class HindsightTeacherConfig:
    """The ``hindsight`` teacher of behaviour cloning (:class:`agents.hindsight.HindsightTeacher`).

    Attributes:
        tau: attainment (0..1) each interval's hindsight plan must hold.
        lookahead: intervals at the largest plan that must hold ``tau`` after it.
        window: intervals whose hindsight plans the teacher's next plan covers.
        attn, proj, mlp: replica counts of the menu's grid (all pack plans of their product).
        attn_batch: the menu's attention batch limit (sequences per replica).
        embed, head: the menu's embedding and LM-head replicas.
    """

    tau: float = 0.999
    lookahead: int = 2
    window: int = 2
    attn: list[int] = field(default_factory=lambda: [8, 10, 12, 16, 20, 24])
    proj: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    mlp: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 8, 10, 12])
    attn_batch: int = 16
    embed: int = 4
    head: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"bc.hindsight.tau must be in [0, 1], got {self.tau}")
        if self.window < 1 or self.lookahead < 0:
            raise ValueError(f"bc.hindsight: window >= 1 and lookahead >= 0, got {self.window} and {self.lookahead}")
        for name in ("attn", "proj", "mlp"):
            v = getattr(self, name)
            if not v or any(int(x) < 1 for x in v):
                raise ValueError(f"bc.hindsight.{name} must list replica counts >= 1, got {v!r}")


@dataclass
class BCConfig:
    """Behaviour cloning before PPO.

    Attributes:
        episodes: teacher episodes to record (0 turns cloning off).
        epochs: passes over the recorded (observation, action) pairs.
        batch_size: pairs per gradient step.
        learning_rate: Adam step size.
        teacher: controller name that provides the actions, or ``hindsight`` (the reactive
            hindsight rule of agents/hindsight.py, which reads the training env's simulator).
        hindsight: settings of the ``hindsight`` teacher.
    """

    episodes: int = 0
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3
    teacher: str = "operator-queueing"
    hindsight: HindsightTeacherConfig = field(default_factory=HindsightTeacherConfig)

    def __post_init__(self) -> None:
        self.hindsight = _nested(HindsightTeacherConfig, self.hindsight, "bc.hindsight")


def _nested(cls: type, value: Any, name: str) -> Any:
    """A nested settings block as ``cls`` (None: the defaults), unknown keys refused by name."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**value)


@dataclass
class SLOConstraintConfig:
    """The Lagrangian SLO constraint of :class:`agents.callbacks.SLOConstraintCallback`.

    Attributes:
        target: attainment (0..1) the training rollouts are held at; None turns it off.
        lr: multiplier change per unit of attainment below / above the target.
        init, min_weight, max_weight: starting value and bounds of the multiplier.
        max_step: largest change of the multiplier per rollout.
        warmup_steps: env steps before the first change (the multiplier stays at ``init``).
    """

    target: float | None = None
    lr: float = 5.0
    init: float = 1.0
    min_weight: float = 1.0
    max_weight: float = 3.0
    max_step: float = 0.25
    warmup_steps: int = 0


@dataclass
class PPOHyperparams:
    """One env's training block (see agents/configs/ppo.yaml for the meaning of each key)."""

    algo: str = "MaskablePPO"
    n_timesteps: int = 200_000
    n_envs: int = 2
    vec_env: str = "dummy"
    policy: str = "MlpPolicy"
    n_steps: int = 512
    batch_size: int = 256
    n_epochs: int = 5
    gamma: float = 0.98
    gae_lambda: float = 0.95
    learning_rate: float = 3e-4
    clip_range: float = 0.2
    ent_coef: float = 0.003
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    normalize: dict[str, Any] = field(default_factory=lambda: {"norm_obs": True, "norm_reward": True})
    bc: BCConfig = field(default_factory=BCConfig)
    slo_constraint: SLOConstraintConfig = field(default_factory=SLOConstraintConfig)
    fidelity: str = "fast"
    initial_plan: dict[str, Any] = field(default_factory=dict)
    freeze_layout: bool = False
    freeze_replicas: list[str] = field(default_factory=list)
    rate_mults: list[float] = field(default_factory=lambda: [1.0])
    eval_freq: int = 20_000
    eval_episodes: int = 2
    checkpoint_freq: int = 50_000
    train_split: str = "train"
    select: str = "best"
    scenario_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algo not in ("PPO", "MaskablePPO"):
            raise ValueError(f"algo must be PPO or MaskablePPO, got {self.algo!r}")
        if self.fidelity not in ("fast", "reference"):
            raise ValueError(f"fidelity must be fast or reference, got {self.fidelity!r}")
        if self.vec_env not in ("dummy", "subproc"):
            raise ValueError(f"vec_env must be dummy or subproc, got {self.vec_env!r}")
        if self.train_split not in ("train", "trainval"):
            raise ValueError(f"train_split must be train or trainval, got {self.train_split!r}")
        if self.select not in ("best", "final"):
            raise ValueError(f"select must be best or final, got {self.select!r}")
        if self.freeze_replicas and not self.freeze_layout:
            raise ValueError(f"freeze_replicas {self.freeze_replicas} needs freeze_layout: true")
        if self.train_split == "trainval" and self.select == "best":
            raise ValueError("train_split trainval trains on the val split, so the best checkpoint on val "
                             "would be chosen on training data: use select: final")
        if not isinstance(self.scenario_overrides, dict):
            raise ValueError(f"scenario_overrides must map scenario fields to values, got {self.scenario_overrides!r}")
        self.bc = _nested(BCConfig, self.bc, "bc")
        self.slo_constraint = _nested(SLOConstraintConfig, self.slo_constraint, "slo_constraint")
        for name in ("n_timesteps", "n_envs", "n_steps", "batch_size", "n_epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def training_world(self, scenario: Any) -> Any:
        """The scenario the run's envs train in: ``scenario`` with ``scenario_overrides`` applied
        (fields of the world's mechanics, e.g. the drain rule; the policy is judged in ``scenario``)."""
        return scenario.replace(**self.scenario_overrides) if self.scenario_overrides else scenario

    def ppo_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the SB3 algorithm constructor."""
        keys = ("n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "learning_rate", "clip_range",
                "ent_coef", "vf_coef", "max_grad_norm", "policy_kwargs")
        return {k: getattr(self, k) for k in keys}

    def flat(self) -> dict[str, Any]:
        """Flat dict for TensorBoard's HPARAMS (nested values joined with '.')."""
        out: dict[str, Any] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
            else:
                out[prefix] = v if isinstance(v, (int, float, str, bool)) else str(v)

        walk("", asdict(self))
        return out


def load_hyperparams(path: str | Path = DEFAULT_CONFIG, env_id: str = ENV_ID) -> PPOHyperparams:
    """Read ``env_id``'s block from the YAML file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hyperparameter file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or env_id not in data:
        have = sorted(data) if isinstance(data, dict) else []
        raise KeyError(f"{path}: no block for env id {env_id!r} (blocks: {have})")
    block = data[env_id] or {}
    known = {f.name for f in fields(PPOHyperparams)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ValueError(f"{path}: unknown hyperparameters {unknown} in block {env_id!r}; known: {sorted(known)}")
    try:
        return PPOHyperparams(**block)
    except ValueError as e:
        raise ValueError(f"{path}: block {env_id!r}: {e}") from None
