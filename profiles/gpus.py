"""GPU specifications for the roofline and power models, each constant with its source.

Units: bytes, bytes per second, FLOP per second (bf16 dense matmul), watts.

How the numbers were chosen (details and references in docs/PROFILES.md):

* H100 and H200 bandwidth and matmul rate were *measured* with PyTorch (2026-11, recorded in
  the README of the shipped profiles): H100 device-to-device copy about 3.0 TB/s counting
  read + write bytes, bf16 8192^3 matmul about 798 TFLOP/s; H200 about 4.3 TB/s and
  769-798 TFLOP/s (we take the low end, 769). A copy moves as many bytes in as out, so
  3.0 TB/s of counted traffic is what a read-dominated kernel (decode attention reading the
  KV cache) can expect; we use it unchanged as the effective read bandwidth. That is the
  conservative reading (a pure read stream is usually a few percent faster than a copy).
* A100 and A40 were not measured by us. Their datasheet peaks are scaled by the fraction of
  datasheet peak the H100 achieved in our measurement: bandwidth 3.0 / 3.35 = 0.896,
  matmul 798 / 989 = 0.807 (H100 SXM datasheet: 3.35 TB/s, 989 TFLOP/s dense bf16).
* Memory capacity is the datasheet's decimal GB (80 GB = 80e9 bytes): slightly below what
  the driver reports, so plans that fit here fit on the device.
* Power: ``tdp_w`` is the board power limit from the datasheet. ``idle_w`` and ``peak_w``
  (mean power when serving kernels run all the time) come from the linear fit to measured
  A100 serving power in profiles/data/calibration (``python -m profiles.calibrate``):
  idle 73.8 W = 0.184 x 400 W, fully busy 308.6 W = 0.771 x 400 W (4.9% mean abs error
  over 30 configurations). The fractions of TDP are applied to every GPU. For the H100
  that gives 129 W idle, above the 60-90 W often quoted for a bare idle board; a process
  holding a CUDA context adds 26-50 W on HBM GPUs (arXiv:2605.23918), which is the state
  of a serving replica. Where we profile with NVML, measured power replaces this model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: Share of datasheet HBM bandwidth our H100 measurement achieved (3.0 TB/s / 3.35 TB/s).
BW_ACHIEVED_FRACTION = 3.0e12 / 3.35e12
#: Share of datasheet dense bf16 matmul rate our H100 measurement achieved (798 / 989 TFLOP/s).
MATMUL_ACHIEVED_FRACTION = 798e12 / 989e12

#: Idle and fully-busy serving power as shares of the board power limit, from the linear
#: A100 power fit (profiles/calibrate.py, reported in docs/PROFILES.md):
#: P(u) = idle + (peak - idle) * u.
IDLE_FRACTION_OF_TDP = 0.184
BUSY_FRACTION_OF_TDP = 0.771


@dataclass(frozen=True)
class GPUSpec:
    """One GPU type as the roofline and power models see it.

    Attributes:
        name: opscale's short name (``h100``).
        memory_bytes: device memory (bytes, datasheet decimal GB).
        hbm_bw_bytes_per_s: achievable memory bandwidth for reads (bytes/s).
        matmul_flops: achievable dense bf16 matmul rate (FLOP/s).
        idle_w: power with a CUDA context open and no kernels running (watts).
        peak_w: mean power while serving kernels run 100% of the time (watts; below TDP,
            which only compute-bound bursts reach).
        tdp_w: board power limit from the datasheet (watts).
        nvlink_bytes_per_s: NVLink bandwidth per GPU, all links, one direction (bytes/s);
            informational, transfers use the measured network profiles.
        network_profile: name of the shipped Vidur network profile used for collectives.
        sources: where each constant comes from, keyed by attribute name.
    """

    name: str
    memory_bytes: int
    hbm_bw_bytes_per_s: float
    matmul_flops: float
    idle_w: float
    peak_w: float
    tdp_w: float
    nvlink_bytes_per_s: float
    network_profile: str
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def hbm_bw(self) -> float:
        """Alias of :attr:`hbm_bw_bytes_per_s` (bytes/s), the name docs/ARCHITECTURE.md uses."""
        return self.hbm_bw_bytes_per_s


def _spec(name: str, mem_gb: float, bw: float, flops: float, tdp: float, nvlink: float, net: str,
          sources: dict[str, str]) -> GPUSpec:
    return GPUSpec(name=name, memory_bytes=int(mem_gb * 1e9), hbm_bw_bytes_per_s=bw, matmul_flops=flops,
                   idle_w=IDLE_FRACTION_OF_TDP * tdp, peak_w=BUSY_FRACTION_OF_TDP * tdp, tdp_w=tdp,
                   nvlink_bytes_per_s=nvlink,
                   network_profile=net, sources=sources)


_IDLE_SRC = ("IDLE_FRACTION_OF_TDP x TDP; the fraction is fitted on measured A100 serving power "
             "(profiles/data/calibration, python -m profiles.calibrate)")
_PEAK_SRC = ("BUSY_FRACTION_OF_TDP x TDP; the fraction is fitted on measured A100 serving power "
             "(profiles/data/calibration, python -m profiles.calibrate)")

GPUS: dict[str, GPUSpec] = {
    "h100": _spec("h100", 80, 3.0e12, 798e12, 700.0, 450e9, "h100_dgx", {
        "memory_bytes": "NVIDIA H100 SXM datasheet: 80 GB HBM3",
        "hbm_bw_bytes_per_s": "measured: PyTorch device-to-device copy ~3.0 TB/s (read+write counted), "
                              "shared/profiles/README.md, 2026-11",
        "matmul_flops": "measured: PyTorch bf16 8192^3 matmul ~798 TFLOP/s, shared/profiles/README.md",
        "tdp_w": "NVIDIA H100 SXM datasheet: max TDP 700 W",
        "peak_w": _PEAK_SRC,
        "idle_w": _IDLE_SRC,
        "nvlink_bytes_per_s": "NVIDIA H100 SXM datasheet: NVLink 900 GB/s bidirectional",
    }),
    "h200": _spec("h200", 141, 4.3e12, 769e12, 700.0, 450e9, "h100_dgx", {
        "memory_bytes": "NVIDIA H200 SXM datasheet: 141 GB HBM3e",
        "hbm_bw_bytes_per_s": "measured: PyTorch copy ~4.3 TB/s, shared/profiles/README.md, 2026-11",
        "matmul_flops": "measured: PyTorch bf16 matmul 769-798 TFLOP/s (low end taken), "
                        "shared/profiles/README.md",
        "tdp_w": "NVIDIA H200 SXM datasheet: max TDP 700 W",
        "peak_w": _PEAK_SRC,
        "idle_w": _IDLE_SRC,
        "nvlink_bytes_per_s": "NVIDIA H200 SXM datasheet: NVLink 900 GB/s bidirectional "
                              "(collectives use the H100 DGX profile: same NVLink 4 / NVSwitch)",
    }),
    "a100": _spec("a100", 80, 2.039e12 * BW_ACHIEVED_FRACTION, 312e12 * MATMUL_ACHIEVED_FRACTION, 400.0,
                  300e9, "a100_dgx", {
        "memory_bytes": "NVIDIA A100 80GB SXM datasheet: 80 GB HBM2e",
        "hbm_bw_bytes_per_s": "NVIDIA A100 80GB SXM datasheet 2,039 GB/s x 0.896 (H100 measured/datasheet)",
        "matmul_flops": "NVIDIA A100 datasheet 312 TFLOP/s dense bf16 x 0.807 (H100 measured/datasheet)",
        "tdp_w": "NVIDIA A100 80GB SXM datasheet: max TDP 400 W (also the power limit the "
                 "calibration CSV's power fractions refer to)",
        "peak_w": _PEAK_SRC,
        "idle_w": _IDLE_SRC,
        "nvlink_bytes_per_s": "NVIDIA A100 datasheet: NVLink 600 GB/s bidirectional",
    }),
    "a40": _spec("a40", 48, 696e9 * BW_ACHIEVED_FRACTION, 149.7e12 * MATMUL_ACHIEVED_FRACTION, 300.0,
                 56.25e9, "a40_pairwise_nvlink", {
        "memory_bytes": "NVIDIA A40 datasheet: 48 GB GDDR6",
        "hbm_bw_bytes_per_s": "NVIDIA A40 datasheet 696 GB/s x 0.896 (H100 measured/datasheet)",
        "matmul_flops": "NVIDIA A40 datasheet 149.7 TFLOP/s dense bf16 x 0.807 (H100 measured/datasheet)",
        "tdp_w": "NVIDIA A40 datasheet: max power 300 W",
        "peak_w": _PEAK_SRC,
        "idle_w": _IDLE_SRC,
        "nvlink_bytes_per_s": "NVIDIA A40 datasheet: NVLink bridge 112.5 GB/s bidirectional (2 GPUs)",
    }),
}
