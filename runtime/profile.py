"""Profile the operator-split model's operators on this machine (CPU or CUDA).

``python -m runtime.profile --model NAME --device cpu|cuda --out FILE.csv [--quick]``

Each operator of :mod:`runtime.model` is timed on its own, one layer's op per call, over a
grid of batch tokens (and, for attention, prompt length / KV length and batch), with
warm-up calls, repeats, device synchronisation, and median/p90/mean/min/max/std in
milliseconds. Rows use the project profile schema (docs/ARCHITECTURE.md, "profiles")
so :class:`profiles.ProfileDB` loads them next to the shipped Vidur rows; op names
follow the shipped rows (``attn_pre_proj`` is the fused QKV GEMM, ``mlp_up_proj`` the
fused gate+up GEMM).

Only one decoder layer plus the embedding table and LM head are allocated, so big shapes
(``llama-2-7b`` ... ``qwen-72b``) can be profiled on one GPU.

Memory (``memory_bytes``): the op's weights + its input tensors + what the call allocates
(outputs and workspace). On CUDA the last part is measured with
``torch.cuda.max_memory_allocated``; on CPU all three are counted analytically from tensor
sizes. ``memory_method`` says which. Power (``power_w``): on NVIDIA GPUs with NVML, the
mean board power while the op runs back to back for ``power_window_s`` seconds, from the
total-energy counter (or the power reading where the counter is unsupported); empty on CPU.
"""
from __future__ import annotations

import argparse
import csv
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from runtime.model import DecoderLayer, Embedding, LMHead, Sampler, init_weights
from runtime.models import ModelConfig, get_model

__all__ = [
    "SCHEMA",
    "EXTRA_COLUMNS",
    "OPS",
    "ProfileConfig",
    "OpTimer",
    "profile_model",
    "write_csv",
    "gpu_short_name",
    "main",
]

#: The project profile schema (docs/ARCHITECTURE.md), in column order.
SCHEMA: tuple[str, ...] = (
    "gpu", "model", "op", "tokens", "context", "batch", "tp",
    "latency_ms_median", "latency_ms_p90", "latency_ms_mean", "latency_ms_min", "latency_ms_max", "latency_ms_std",
    "memory_bytes", "power_w", "source", "device_name", "torch_version", "dtype",
)
#: Columns this profiler adds after the schema: the memory breakdown (bytes) and how the
#: point was measured.
EXTRA_COLUMNS: tuple[str, ...] = (
    "weight_bytes", "activation_bytes", "kv_bytes", "memory_method", "warmup", "repeats", "threads",
)
#: Operators timed, in the order a token meets them (names of the shipped Vidur rows + ours).
OPS: tuple[str, ...] = (
    "emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_prefill", "attn_decode", "attn_post_proj",
    "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add", "lm_head", "sampling",
)
#: Ops timed over the token grid (everything but the two attention kernels).
TOKEN_OPS: tuple[str, ...] = tuple(op for op in OPS if op not in ("attn_prefill", "attn_decode"))

SOURCE = "opscale-profiler"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _pow2(lo: int, hi: int) -> tuple[int, ...]:
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x *= 2
    return tuple(out)


@dataclass
class ProfileConfig:
    """What to profile and how.

    Attributes:
        model: opscale model name (``runtime.models.get_model``).
        device: ``cpu`` or ``cuda`` (``cuda:N`` also accepted).
        dtype: ``float32``, ``float16`` or ``bfloat16``; ``None`` = float16 on CUDA, float32 on CPU.
        tokens: batch sizes in tokens for the token-wise ops.
        prefill_contexts: prompt lengths (tokens) for ``attn_prefill`` (one sequence).
        decode_contexts: KV lengths (tokens) for ``attn_decode``.
        decode_batches: sequences per ``attn_decode`` call.
        ops: operators to profile (subset of :data:`OPS`).
        warmup: untimed calls before the repeats.
        repeats: timed calls per point.
        power_window_s: seconds of back-to-back calls per point for the NVML power reading
            (CUDA only; 0 turns power off).
        seed: weight initialisation seed.
        gpu: value of the ``gpu`` column; ``None`` derives it from the device
            (``cpu``, ``a100``, ``h100``, ...).
        clip_contexts: drop contexts beyond the model's ``max_seq_len`` from the grid
            (True for the default grids); when False such contexts are an error.
    """

    model: str = "tiny"
    device: str = "cpu"
    dtype: str | None = None
    tokens: tuple[int, ...] = _pow2(1, 4096)
    prefill_contexts: tuple[int, ...] = _pow2(128, 4096)
    decode_contexts: tuple[int, ...] = _pow2(128, 4096)
    decode_batches: tuple[int, ...] = _pow2(1, 64)
    ops: tuple[str, ...] = OPS
    warmup: int = 3
    repeats: int = 20
    power_window_s: float = 0.3
    seed: int = 0
    gpu: str | None = None
    clip_contexts: bool = True

    @classmethod
    def quick(cls, **overrides) -> "ProfileConfig":
        """A handful of points, few repeats: well under a minute on a CPU for ``tiny``."""
        base = dict(
            tokens=(1, 4, 16, 64, 256, 1024),
            prefill_contexts=(128, 256, 512),
            decode_contexts=(128, 512),
            decode_batches=(1, 4, 16),
            warmup=3,
            repeats=10,
            power_window_s=0.1,
        )
        base.update(overrides)
        return cls(**base)

    def validate(self, cfg: ModelConfig) -> None:
        """Raise ValueError naming the first bad setting."""
        unknown = [op for op in self.ops if op not in OPS]
        if unknown:
            raise ValueError(f"unknown ops {unknown}; known ops: {', '.join(OPS)}")
        for name in ("tokens", "prefill_contexts", "decode_contexts", "decode_batches"):
            vals = getattr(self, name)
            bad = [v for v in vals if int(v) < 1]
            if bad:
                raise ValueError(f"{name} must be positive integers, got {bad}")
        too_long = [c for c in (*self.prefill_contexts, *self.decode_contexts) if c > cfg.max_seq_len]
        if too_long and not self.clip_contexts:
            raise ValueError(f"contexts {too_long} exceed {cfg.name}'s max_seq_len {cfg.max_seq_len}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={self.repeats} warmup={self.warmup}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")


def gpu_short_name(device_name: str) -> str:
    """Short lower-case GPU name used in the ``gpu`` column: ``NVIDIA H100 80GB HBM3`` -> ``h100``."""
    low = device_name.lower()
    for known in ("h200", "h100", "a100", "a40", "a10g", "l40s", "l40", "l4", "v100", "t4", "b200", "gh200"):
        if re.search(rf"(?<![a-z0-9]){known}(?![0-9])", low):
            return known
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "unknown"


def _percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), like numpy's default."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _outputs(out) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    return [t for t in out if torch.is_tensor(t)]


class _Power:
    """Board power through NVML (nvidia-ml-py), or nothing where it is unavailable."""

    def __init__(self, device: torch.device) -> None:
        self.handle = None
        self.use_energy = False
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            idx = device.index if device.index is not None else torch.cuda.current_device()
            handle = None
            uuid = getattr(torch.cuda.get_device_properties(idx), "uuid", None)
            if uuid is not None:
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
                except Exception:
                    handle = None
            self.handle = handle if handle is not None else pynvml.nvmlDeviceGetHandleByIndex(idx)
            try:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
                self.use_energy = True
            except Exception:
                self.use_energy = False
        except Exception:
            self.handle = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def measure(self, fn: Callable[[], object], window_s: float, sync: Callable[[], None]) -> float | None:
        """Mean watts while ``fn`` runs back to back for ``window_s`` seconds."""
        if self.handle is None or window_s <= 0:
            return None
        nv = self.nvml
        sync()
        t0 = time.perf_counter()
        e0 = nv.nvmlDeviceGetTotalEnergyConsumption(self.handle) if self.use_energy else None
        samples: list[float] = []
        n = 0
        while True:
            fn()
            n += 1
            if n % 8 == 0:
                sync()
                if not self.use_energy:
                    samples.append(nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0)
                if time.perf_counter() - t0 >= window_s:
                    break
        sync()
        dt = time.perf_counter() - t0
        if self.use_energy:
            e1 = nv.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            return (e1 - e0) / 1000.0 / dt  # mJ -> J, / s
        return statistics.fmean(samples) if samples else None


class OpTimer:
    """Times one callable: warm-up, repeats, per-call latencies in milliseconds.

    On CUDA the repeats are queued back to back between CUDA events (one event pair per
    call) after a device synchronisation, and read after a final synchronisation, so the
    numbers are device time per call; on CPU each call is timed with ``perf_counter_ns``.
    """

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        self.sync()
        if self.device.type == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats + 1)]
            events[0].record()
            for i in range(self.repeats):
                fn()
                events[i + 1].record()
            self.sync()
            return [events[i].elapsed_time(events[i + 1]) for i in range(self.repeats)]
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) / 1e6)
        return times


@dataclass
class _Point:
    op: str
    tokens: int
    context: int | None  # None (empty cell) for token-wise ops, like the shipped rows
    batch: int | None
    fn: Callable[[], object]
    weights: list[torch.Tensor]
    inputs: list[torch.Tensor]
    kv_bytes: int = 0


class _Bench:
    """One decoder layer, the embedding and the LM head of a model, with inputs per point."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.layer = DecoderLayer(cfg, device=device, dtype=dtype)
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, device=device, dtype=dtype)
        self.head = LMHead(cfg.d_model, cfg.vocab_size, device=device, dtype=dtype)
        self.sampler = Sampler()
        for i, m in enumerate((self.layer, self.embed, self.head)):
            init_weights(m, seed=seed + i)
            m.requires_grad_(False)
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, device=self.device, dtype=torch.float32, generator=self.gen).to(self.dtype)

    def token_point(self, op: str, T: int) -> _Point:
        cfg, L = self.cfg, self.layer
        H, KV, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        x = self.randn(T, d)
        if op == "emb":
            ids = torch.randint(0, cfg.vocab_size, (T,), device=self.device, generator=self.gen)
            return _Point(op, T, None, None, lambda: self.embed(ids), [self.embed.weight], [ids])
        if op in ("input_layernorm", "post_attention_layernorm"):
            norm = L.attn_norm if op == "input_layernorm" else L.mlp_norm
            return _Point(op, T, None, None, lambda: norm(x), [norm.weight], [x])
        if op == "attn_pre_proj":
            return _Point(op, T, None, None, lambda: L.qkv(x), [L.qkv.weight], [x])
        if op == "attn_rope":
            q, k = self.randn(T, H, hd), self.randn(T, KV, hd)
            pos = torch.arange(T, device=self.device)
            L.rope.reserve(T)  # the grid may go past max_seq_len (tiny: 512); CUDA does not grow on demand
            return _Point(op, T, None, None, lambda: L.rope(q, k, pos), [L.rope.cos_cached, L.rope.sin_cached], [q, k, pos])
        if op == "attn_post_proj":
            a = self.randn(T, H * hd)
            return _Point(op, T, None, None, lambda: L.o_proj(a), [L.o_proj.weight], [a])
        if op == "mlp_up_proj":
            return _Point(op, T, None, None, lambda: L.mlp.up_proj(x), [L.mlp.gate_up.weight], [x])
        if op == "mlp_act":
            gu = self.randn(T, L.mlp.gate_up.weight.shape[0])
            return _Point(op, T, None, None, lambda: L.mlp.act(gu), [], [gu])
        if op == "mlp_down_proj":
            h = self.randn(T, cfg.d_ff)
            return _Point(op, T, None, None, lambda: L.mlp.down_proj(h), [L.mlp.down.weight], [h])
        if op == "add":
            y = self.randn(T, d)
            return _Point(op, T, None, None, lambda: x + y, [], [x, y])
        if op == "lm_head":
            return _Point(op, T, None, None, lambda: self.head(x), [self.head.weight], [x])
        if op == "sampling":
            logits = self.randn(T, cfg.vocab_size)
            # one sampled token per sequence: batch = rows of logits
            return _Point(op, T, None, T, lambda: self.sampler(logits), [], [logits])
        raise ValueError(f"{op!r} is not a token-wise op; token-wise ops: {TOKEN_OPS}")

    def prefill_point(self, P: int) -> _Point:
        cfg = self.cfg
        q, k, v = self.randn(P, cfg.n_heads, cfg.head_dim), self.randn(P, cfg.n_kv_heads, cfg.head_dim), self.randn(
            P, cfg.n_kv_heads, cfg.head_dim
        )
        attn = self.layer.attn
        return _Point("attn_prefill", P, P, 1, lambda: attn.prefill(q, k, v), [], [q, k, v], kv_bytes=_bytes(k, v))

    def decode_point(self, B: int, ctx: int) -> _Point:
        cfg = self.cfg
        q = self.randn(B, cfg.n_heads, cfg.head_dim)
        kc, vc = self.randn(B, ctx, cfg.n_kv_heads, cfg.head_dim), self.randn(B, ctx, cfg.n_kv_heads, cfg.head_dim)
        lengths = torch.full((B,), ctx, device=self.device, dtype=torch.long)
        attn = self.layer.attn
        return _Point(
            "attn_decode", B, ctx, B, lambda: attn.decode(q, kc, vc, lengths), [], [q, kc, vc, lengths],
            kv_bytes=_bytes(kc, vc),
        )


def _points(bench: _Bench, pc: ProfileConfig) -> Iterable[Callable[[], _Point]]:
    """Lazily made points (inputs allocated only when the point is measured)."""
    for op in pc.ops:
        if op == "attn_prefill":
            for P in pc.prefill_contexts:
                yield lambda P=P: bench.prefill_point(int(P))
        elif op == "attn_decode":
            for B in pc.decode_batches:
                for C in pc.decode_contexts:
                    yield lambda B=B, C=C: bench.decode_point(int(B), int(C))
        else:
            for T in pc.tokens:
                yield lambda op=op, T=T: bench.token_point(op, int(T))


def _memory(point: _Point, device: torch.device) -> tuple[int, int, str]:
    """(activation bytes, total memory bytes, method) of one call of ``point``."""
    w, inp = _bytes(*point.weights), _bytes(*point.inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = point.fn()
        torch.cuda.synchronize(device)
        extra = max(0, torch.cuda.max_memory_allocated(device) - before)
        del out
        return inp + extra, w + inp + extra, "cuda_max_memory_allocated"
    out = point.fn()
    act = inp + _bytes(*_outputs(out))
    return act, w + act, "analytic"


def _settle_cpu_allocator() -> None:
    """Allocate and free one ~31 MiB tensor before timing on CPU.

    glibc serves big allocations with mmap until the first such block is freed, then raises
    its mmap threshold (up to 32 MiB). Without this, whichever op is timed first pays page
    faults on every call that later ops do not (measured: RMSNorm over 1024 x 256 floats,
    0.83 ms when timed first vs 0.11 ms after).
    """
    torch.empty(31 * 2**20 // 4, dtype=torch.float32).fill_(0.0)


@torch.no_grad()
def profile_model(
    pc: ProfileConfig,
    progress: Callable[[str], None] | None = None,
    cfg: ModelConfig | None = None,
) -> list[dict]:
    """Measure every point of ``pc``; returns rows (dicts with :data:`SCHEMA` + :data:`EXTRA_COLUMNS`).

    ``cfg`` overrides the shape looked up from ``pc.model`` (e.g. one read from a checkpoint's
    config.json); the ``model`` column is then ``cfg.name``.
    """
    cfg = cfg or get_model(pc.model)
    pc.validate(cfg)
    if pc.clip_contexts:
        pc = replace(
            pc,
            prefill_contexts=tuple(c for c in pc.prefill_contexts if c <= cfg.max_seq_len),
            decode_contexts=tuple(c for c in pc.decode_contexts if c <= cfg.max_seq_len),
        )
    device = torch.device(pc.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for but torch.cuda.is_available() is False on this machine")
    dtype_name = pc.dtype or ("float16" if device.type == "cuda" else "float32")
    dtype = _DTYPES[dtype_name]
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    gpu = pc.gpu or (gpu_short_name(device_name) if device.type == "cuda" else "cpu")
    if device.type == "cpu":
        _settle_cpu_allocator()
    bench = _Bench(cfg, device, dtype, pc.seed)
    timer = OpTimer(device, pc.warmup, pc.repeats)
    power = _Power(device)
    rows: list[dict] = []
    for make in _points(bench, pc):
        point = make()
        times = timer(point.fn)
        act, mem, method = _memory(point, device)
        watts = power.measure(point.fn, pc.power_window_s, timer.sync) if power.available else None
        rows.append({
            "gpu": gpu, "model": cfg.name, "op": point.op, "tokens": point.tokens, "context": "" if point.context is None else point.context,
            "batch": "" if point.batch is None else point.batch, "tp": 1,
            "latency_ms_median": statistics.median(times), "latency_ms_p90": _percentile(times, 90),
            "latency_ms_mean": statistics.fmean(times), "latency_ms_min": min(times), "latency_ms_max": max(times),
            "latency_ms_std": statistics.pstdev(times),
            "memory_bytes": mem, "power_w": "" if watts is None else round(watts, 2), "source": SOURCE,
            "device_name": device_name, "torch_version": torch.__version__, "dtype": dtype_name,
            "weight_bytes": _bytes(*point.weights), "activation_bytes": act, "kv_bytes": point.kv_bytes,
            "memory_method": method, "warmup": pc.warmup, "repeats": pc.repeats,
            "threads": torch.get_num_threads() if device.type == "cpu" else "",
        })
        if progress is not None:
            r = rows[-1]
            progress(f"{r['op']:<25} tokens={r['tokens']:<5} context={r['context']!s:<5} batch={r['batch']!s:<3} "
                     f"median={r['latency_ms_median']:.4f} ms")
        del point
    return rows


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write rows with the schema columns first, then :data:`EXTRA_COLUMNS`."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(SCHEMA) + list(EXTRA_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.profile",
        description="Time each operator of the operator-split model and write a profile CSV (ProfileDB schema).",
    )
    p.add_argument("--model", default="tiny", help="model name from runtime/models.py (default: tiny)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--out", required=True, help="output CSV path")
    p.add_argument("--quick", action="store_true", help="a handful of points and few repeats (under a minute on CPU for tiny)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of: {','.join(OPS)}")
    p.add_argument("--tokens", type=_int_list, default=None, help="token grid, e.g. 1,2,4,...,4096")
    p.add_argument("--prefill-contexts", type=_int_list, default=None, help="prompt lengths for attn_prefill")
    p.add_argument("--decode-contexts", type=_int_list, default=None, help="KV lengths for attn_decode")
    p.add_argument("--decode-batches", type=_int_list, default=None, help="sequences per attn_decode call")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--power-window", type=float, default=None, help="seconds per point for NVML power (0 = off)")
    p.add_argument("--gpu", default=None, help="value of the gpu column (default: derived from the device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; use 1 on a CPU shared with other jobs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-point progress lines")
    return p


def config_from_args(args: argparse.Namespace) -> ProfileConfig:
    """A :class:`ProfileConfig` from parsed CLI arguments."""
    overrides: dict = {"model": args.model, "device": args.device, "dtype": args.dtype, "seed": args.seed, "gpu": args.gpu}
    for arg, name in (("tokens", "tokens"), ("prefill_contexts", "prefill_contexts"),
                      ("decode_contexts", "decode_contexts"), ("decode_batches", "decode_batches"),
                      ("warmup", "warmup"), ("repeats", "repeats"), ("power_window", "power_window_s")):
        if getattr(args, arg) is not None:
            overrides[name] = getattr(args, arg)
    if args.ops:
        overrides["ops"] = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    # contexts the user names are measured or refused; default grids are clipped to the model
    overrides["clip_contexts"] = False
    pc = ProfileConfig.quick(**overrides) if args.quick else ProfileConfig(**overrides)
    max_len = get_model(args.model).max_seq_len
    if args.prefill_contexts is None:
        pc = replace(pc, prefill_contexts=tuple(c for c in pc.prefill_contexts if c <= max_len))
    if args.decode_contexts is None:
        pc = replace(pc, decode_contexts=tuple(c for c in pc.decode_contexts if c <= max_len))
    return pc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:  # callers in the same process (tests) keep their thread count
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    try:
        pc = config_from_args(args)
        get_model(pc.model)
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        rows = profile_model(pc, progress=log)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = write_csv(rows, args.out)
    print(f"wrote {len(rows)} rows to {out} in {time.perf_counter() - t0:.1f} s "
          f"({pc.model}, {rows[0]['device_name'] if rows else pc.device}, {rows[0]['dtype'] if rows else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
