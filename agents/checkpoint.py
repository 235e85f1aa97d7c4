"""Checkpoint folders: policy zip, observation-normalisation statistics and metadata.

Layout of a checkpoint folder::

    policy.zip        stable-baselines3 model (PPO or MaskablePPO)
    vecnormalize.pkl  VecNormalize statistics saved beside the policy (may be absent when
                      the policy was trained without normalisation)
    metadata.json     spec version, codec, scenario, algorithm, git revision, ...

Loaders compare ``metadata.json`` with the code they run in and refuse a checkpoint
written for another observation/action spec, another codec, or another scenario with an
error that names the difference.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.codec import SPEC_VERSION, CodecConfig

POLICY_FILE = "policy.zip"
VECNORM_FILE = "vecnormalize.pkl"
METADATA_FILE = "metadata.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing files or was written for another spec."""


def git_revision(repo: Path | None = None) -> str:
    """Short git revision of the working tree (with ``-dirty`` when modified), or ``unknown``."""
    cwd = repo or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class ObsNormaliser:
    """Frozen copy of VecNormalize's observation statistics (no update at inference)."""

    mean: np.ndarray
    var: np.ndarray
    clip: float = 10.0
    epsilon: float = 1e-8

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        out = (np.asarray(obs, dtype=np.float64) - self.mean) / np.sqrt(self.var + self.epsilon)
        return np.clip(out, -self.clip, self.clip).astype(np.float32)


#: environment variables that choose the CPU code paths of torch's kernels (and so the last bits
#: of a training run's floating-point results)
NUMERICS_ENV = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def host_info() -> dict[str, Any]:
    """The machine a checkpoint was trained on, as far as its numbers depend on it: the CPU model,
    the torch version, the instruction set torch's kernels dispatch to, and the numerics settings
    in the environment. A policy trained with the same code and seed on another CPU can differ."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "numerics_env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ}}


def write_metadata(folder: Path, codec: CodecConfig, scenario: Mapping[str, Any], algo: str,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``metadata.json`` into ``folder`` and return what was written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "spec_version": SPEC_VERSION,
        "codec": codec.to_dict(),
        "scenario": dict(scenario),
        "algo": algo,
        "git_rev": git_revision(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": host_info(),
    }
    if extra:
        meta.update(extra)
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return meta


def read_metadata(folder: Path) -> dict[str, Any]:
    """Read and minimally validate ``metadata.json`` of a checkpoint folder."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {METADATA_FILE}; not an opscale checkpoint folder")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    for key in ("spec_version", "codec", "algo"):
        if key not in meta:
            raise CheckpointError(f"{path}: lacks field {key!r}")
    return meta


def check_compatible(meta: Mapping[str, Any], folder: Path, codec: CodecConfig | None = None,
                     scenario: Mapping[str, Any] | None = None) -> None:
    """Raise CheckpointError when ``meta`` does not match this code's spec, ``codec`` or ``scenario``."""
    if meta["spec_version"] != SPEC_VERSION:
        raise CheckpointError(
            f"{folder}: checkpoint was written for observation/action spec {meta['spec_version']!r}, "
            f"this code uses {SPEC_VERSION!r}; retrain with train.py or use a matching opscale version")
    if codec is not None:
        # fields added since the checkpoint was written compare at their defaults
        want, got = codec.to_dict(), {**CodecConfig().to_dict(), **dict(meta["codec"])}
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if diff:
            parts = ", ".join(f"{k}: checkpoint {got.get(k)!r} vs expected {want.get(k)!r}" for k in diff)
            raise CheckpointError(f"{folder}: checkpoint codec differs ({parts})")
    if scenario is not None and "scenario" in meta:
        got_s = dict(meta["scenario"])
        diff = sorted(k for k in scenario if k in got_s and got_s[k] != scenario[k])
        if diff:
            parts = ", ".join(f"{k}: checkpoint {got_s[k]!r} vs expected {scenario[k]!r}" for k in diff)
            raise CheckpointError(f"{folder}: checkpoint was trained for another scenario ({parts})")


def load_normaliser(folder: Path) -> ObsNormaliser | None:
    """Observation statistics from ``vecnormalize.pkl``, or None when the file is absent."""
    path = Path(folder) / VECNORM_FILE
    if not path.is_file():
        return None
    with path.open("rb") as f:
        vn = pickle.load(f)
    if not getattr(vn, "norm_obs", True):
        return None
    rms = vn.obs_rms
    return ObsNormaliser(np.asarray(rms.mean, dtype=np.float64), np.asarray(rms.var, dtype=np.float64),
                         float(vn.clip_obs), float(vn.epsilon))


@dataclass
class Checkpoint:
    """A loaded checkpoint: the SB3 model, its normaliser and its metadata."""

    folder: Path
    model: Any
    normaliser: ObsNormaliser | None
    metadata: dict[str, Any]

    @property
    def codec(self) -> CodecConfig:
        return CodecConfig.from_dict(dict(self.metadata["codec"]))

    @property
    def maskable(self) -> bool:
        return self.metadata["algo"] == "MaskablePPO"


def load_checkpoint(folder: str | Path, codec: CodecConfig | None = None,
                    scenario: Mapping[str, Any] | None = None, device: str = "cpu") -> Checkpoint:
    """Load a checkpoint folder after checking it matches this code (and ``codec``/``scenario``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    meta = read_metadata(folder)
    check_compatible(meta, folder, codec, scenario)
    policy = folder / POLICY_FILE
    if not policy.is_file():
        raise CheckpointError(f"{folder}: no {POLICY_FILE}")
    if meta["algo"] == "MaskablePPO":
        from sb3_contrib import MaskablePPO as Algo
    elif meta["algo"] == "PPO":
        from stable_baselines3 import PPO as Algo
    else:
        raise CheckpointError(f"{folder}: unknown algorithm {meta['algo']!r}; expected PPO or MaskablePPO")
    model = Algo.load(str(policy), device=device)
    return Checkpoint(folder, model, load_normaliser(folder), meta)
