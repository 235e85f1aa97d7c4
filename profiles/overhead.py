"""Per-iteration serving overhead on top of the kernel sum (ms), fitted on measured A100 serving.

Model (a CPU-side floor plus fixed and per-sequence costs)::

    decode:  step_ms = max(kernel_ms, floor_ms_per_layer * layers) + base_ms + per_seq_ms * batch
    prefill: step_ms = max(kernel_ms, floor_ms_per_layer * layers) + prefill_base_ms
                       + prefill_kernel_scale * kernel_ms
    overhead_ms = step_ms - kernel_ms

``kernel_ms`` is the sum of the operator profiles and all-reduces for the iteration
(:meth:`profiles.ProfileDB.model_step_latency`). The floor is the time the host needs to
issue one iteration's kernels layer by layer (Python + launches, no CUDA graphs): when the
GPU finishes its kernels sooner, the iteration still takes the floor. In the calibration
data decode steps of Llama-2-70B take ~45 ms at TP4 and TP8 although the kernel sum
differs by almost 2x between them; only a floor explains equal times.
``base_ms`` is scheduling / sampling / detokenisation per iteration, ``per_seq_ms`` the
per-sequence bookkeeping. Prefill in the measured stack runs slower than the profiled
kernels by a share of the kernel time (``prefill_kernel_scale``); being relative it carries
to other GPUs and models. None of the parameters is per GPU: on a faster GPU the kernel sum
shrinks and the floor takes over, which is how the fit carries to H100 and H200.

The constants below are the output of ``python -m profiles.calibrate`` (least squares on
the 57 Llama-2-70B configurations x 2 phases of profiles/data/calibration); the fit and its
per-configuration errors are in docs/PROFILES.md. tests/test_profiles_calibration.py re-runs
the fit and checks these numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OverheadModel:
    """Parameters of the overhead model (module docstring); all in ms."""

    floor_ms_per_layer: float = 0.0
    base_ms: float = 0.0
    per_seq_ms: float = 0.0
    prefill_base_ms: float = 0.0
    prefill_kernel_scale: float = 0.0

    def step_ms(self, kernel_ms, layers: int, tp: int, batch, tokens, phase: str):
        """Predicted iteration time (ms) from the kernel sum."""
        kernel_ms = np.asarray(kernel_ms, dtype=np.float64)
        floor = np.maximum(kernel_ms, self.floor_ms_per_layer * layers)
        if phase == "prefill":
            return floor + self.prefill_base_ms + self.prefill_kernel_scale * kernel_ms
        return floor + self.base_ms + self.per_seq_ms * np.asarray(batch, dtype=np.float64)

    def overhead_ms(self, kernel_ms, layers: int, tp: int, batch, tokens, phase: str):
        """``step_ms - kernel_ms`` (ms, >= 0 whenever the parameters are)."""
        return self.step_ms(kernel_ms, layers, tp, batch, tokens, phase) - np.asarray(kernel_ms, dtype=np.float64)


#: Fitted on A100 Llama-2-70B serving (python -m profiles.calibrate).
OVERHEAD = OverheadModel(floor_ms_per_layer=0.538, base_ms=1.92, per_seq_ms=0.287, prefill_base_ms=0.0,
                         prefill_kernel_scale=0.1927)
