"""Matplotlib PNGs of evaluation timelines (GPUs, SLO attainment, per-operator replicas) and of
fixed-budget attainment-vs-rate curves."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from runtime.models import OPERATOR_GROUPS  # noqa: E402


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or y.size < n:
        return y
    k = np.ones(n) / n
    return np.convolve(y, k, mode="same")


def plot_timelines(timelines: Mapping[str, Mapping[str, object]], out_dir: str | Path,
                   attainment_target: float = 0.99) -> list[Path]:
    """Write ``gpus.png``, ``attainment.png`` and ``replicas.png`` into ``out_dir``.

    ``timelines[name]`` holds equal-length lists ``time_s``, ``gpus``, ``attainment`` and
    ``replicas`` (``{group: list}``), one entry per control interval.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, tl in timelines.items():
        ax.plot(np.asarray(tl["time_s"]) / 60.0, tl["gpus"], label=name, lw=1.2)
    ax.set_xlabel("trace time (min)")
    ax.set_ylabel("GPUs allocated")
    ax.set_title("GPUs over the held-out trace")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "gpus.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, tl in timelines.items():
        y = _smooth(np.asarray(tl["attainment"], dtype=float), 5)
        ax.plot(np.asarray(tl["time_s"]) / 60.0, y, label=name, lw=1.2)
    ax.axhline(attainment_target, color="k", ls="--", lw=0.8, label=f"target {attainment_target:.0%}")
    ax.set_xlabel("trace time (min)")
    ax.set_ylabel("SLO attainment per interval (5-interval mean)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title("SLO attainment over the held-out trace")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "attainment.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    n = len(timelines)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.2 * n + 0.6), sharex=True, squeeze=False)
    for ax, (name, tl) in zip(axes[:, 0], timelines.items()):
        reps = tl["replicas"]
        assert isinstance(reps, Mapping)
        for g in OPERATOR_GROUPS:
            ax.step(np.asarray(tl["time_s"]) / 60.0, reps[g], where="post", label=g, lw=1.0)
        ax.set_ylabel("replicas")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(ncol=len(OPERATOR_GROUPS), fontsize=8)
    axes[-1, 0].set_xlabel("trace time (min)")
    fig.tight_layout()
    paths.append(out / "replicas.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_budget_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                       attainment_target: float = 0.99, title: str = "") -> Path:
    """Write one PNG of SLO attainment against the rate multiplier, a line per entry of
    ``curves`` (``{label: [{"k": multiplier, "attainment": share}, ...]}``, the ``tried``
    points of :func:`agents.evaluate.sustained_on_grid`), with the target as a dotted line; curves
    whose label contains "filled" (fixed-budget mode) are dashed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    # up to 20 distinct colours; curves whose label says "filled" are dashed
    colours = plt.get_cmap("tab20").colors if len(curves) > 10 else plt.get_cmap("tab10").colors
    for i, (label, pts) in enumerate(curves.items()):
        pts = sorted(pts, key=lambda p: p["k"])
        ax.plot([p["k"] for p in pts], [p["attainment"] for p in pts], marker="o", ms=3, lw=1.2, label=label,
                color=colours[i % len(colours)], ls="--" if "filled" in label else "-")
    ax.axhline(attainment_target, color="k", ls=":", lw=0.8)
    ax.set_xlabel("request rate (x the recorded rate)")
    ax.set_ylabel("SLO attainment")
    ax.set_title(title or "Attainment against request rate on a fixed GPU budget")
    ax.legend(fontsize=7, loc="lower left", ncol=2 if len(curves) > 8 else 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
