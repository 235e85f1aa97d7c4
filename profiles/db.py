"""ProfileDB: operator latency, memory and power from measured profiles, roofline where unmeasured.

What answers a query, in order (the answer's ``source`` says which):

1. a measured curve for (gpu, model, op, tp) from the loaded CSVs. Between grid points the
   median latency is interpolated linearly in tokens (GEMM and elementwise times are
   piecewise linear in tokens; the grid is dense: 1, 2, 4, 8, then every 8 to 1024 and
   every 32-64 above). ``measured`` at a grid point, ``interpolated`` between.
2. ``derived``: a curve computed from a measured one: the LM head from the same GPU's
   ``mlp_up_proj`` curve at equal arithmetic intensity (same tokens, time scaled by the
   weight ratio, so the achieved FLOP/s of the measured GEMM is kept); a GPU or model
   pair without data (H200, Llama-3 on H100) from the nearest profiled GPU scaled by the
   ratio of the two GPUs' rooflines for that op.
3. ``roofline``: attention kernels and sampling (see :mod:`profiles.roofline`). Measured
   attention rows (opscale profiler) replace it: the roofline is scaled by the
   measured/roofline ratio at the nearest measured (batch, context) point.
4. ``extrapolated``: tokens beyond the largest measured (time grows in proportion to
   tokens, the compute-bound roofline), or a TP degree the model was not profiled at
   (time of the nearest measured degree x tp_ref / tp for sharded ops). With
   ``strict=True`` these raise :class:`ProfileError`; otherwise they are answered, flagged in
   the Estimate, counted in :attr:`ProfileDB.flags` and warned about once per
   (gpu, model, op, tp).

Units: ms (latency), bytes (memory, messages), watts (power).
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd

from profiles import roofline as rl
from profiles.gpus import GPUS, GPUSpec
from profiles.ops import (ALL_OPS, ALL_REDUCE_GROUPS, ATTENTION_OPS, ONCE_PER_STEP, PHASES, VIDUR_OPS,
                          activation_bytes, gemm_flops, group_ops, op_params)
from profiles.overhead import OVERHEAD, OverheadModel
from profiles.paths import MEASURED_DIR, NETWORK_CSV, OPERATORS_CSV
from profiles.schema import TP_DEGREES, ProfileError, read_network_csv, read_profile_csv
from runtime.models import MODELS, OPERATOR_GROUPS, ModelConfig

SOURCES: tuple[str, ...] = ("measured", "interpolated", "derived", "roofline", "extrapolated")
#: Preference order of reference GPUs when a GPU lacks a model's profile.
_REFERENCE_GPUS: tuple[str, ...] = ("h100", "a100", "a40")
#: Ops that do not shrink with tensor parallelism (full hidden size on every GPU).
_UNSHARDED_OPS = frozenset({"input_layernorm", "post_attention_layernorm", "add"})
_OPS_SET = frozenset(ALL_OPS)


class Estimate(NamedTuple):
    """A latency answer: ``ms`` (milliseconds) and where it came from (one of SOURCES)."""

    ms: float
    source: str
    note: str = ""


@dataclass(frozen=True)
class _Curve:
    """Median latency (ms) against tokens for one (gpu, model, op, tp)."""

    x: np.ndarray  # tokens, ascending
    y: np.ndarray  # ms
    kind: str  # "measured", "derived" or "extrapolated" (how the table itself was made)
    note: str = ""


def table_ops(table: _Curve) -> list[str]:
    """Op names summed in a group table (kept in its note)."""
    return table.note.split("+")


def _check_choice(kind: str, value: object, known: Iterable[str]) -> None:
    known = sorted(set(known))
    if value not in known:
        raise ProfileError(f"unknown {kind} {value!r}; known {kind}s: {', '.join(known)}")


class ProfileDB:
    """Operator latencies (ms), memory (bytes) and power (W) for (gpu, model, op, tokens, tp).

    Build with :meth:`load`. ``strict`` decides what out-of-grid queries do (module docstring).
    """

    def __init__(self, operators: pd.DataFrame, network: pd.DataFrame, strict: bool = False,
                 overhead: OverheadModel = OVERHEAD) -> None:
        self.strict = strict
        self.overhead = overhead
        #: Out-of-grid and derived answers given so far, keyed by (source, gpu, model, op, tp).
        self.flags: Counter = Counter()
        self._warned: set[tuple] = set()
        self._curves: dict[tuple[str, str, str, int], _Curve] = {}
        self._attn: dict[tuple[str, str, str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._resolved: dict[tuple[str, str, str, int], _Curve] = {}
        self._tables: dict[tuple, _Curve | None] = {}
        self._ingest(operators)
        self._net = network
        self._net_cache: dict[tuple[str, str, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._floor: dict[str, float] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, paths: Sequence[str | Path] = (), strict: bool = False, include_shipped: bool = True,
             measured_dir: str | Path | None = MEASURED_DIR, overhead: OverheadModel = OVERHEAD) -> "ProfileDB":
        """Shipped Vidur data, then CSVs in ``measured_dir``, then ``paths`` (later override earlier).

        ``overhead``: the per-iteration overhead model used when ``calibrated=True``
        (default: the A100 fit; pass ``OverheadModel()`` for none).
        """
        frames = []
        if include_shipped:
            frames.append(read_profile_csv(OPERATORS_CSV))
        if measured_dir is not None and Path(measured_dir).is_dir():
            for p in sorted(Path(measured_dir).glob("*.csv*")):
                frames.append(read_profile_csv(p))
        frames += [read_profile_csv(p) for p in paths]
        if not frames:
            raise ProfileError("no profile data: include_shipped=False and no paths given")
        return cls(pd.concat(frames, ignore_index=True), read_network_csv(NETWORK_CSV), strict=strict,
                   overhead=overhead)

    def _ingest(self, df: pd.DataFrame) -> None:
        # Later rows override earlier ones per key, so ingest file by file in order.
        df = df.reset_index(drop=True)
        df["_order"] = np.arange(len(df))
        is_attn = df["op"].isin(ATTENTION_OPS)
        for key, g in df[~is_attn].groupby(["gpu", "model", "op", "tp"], sort=False):
            # Keep the last-loaded source for this curve; repeats at a token count are averaged.
            last_src = g.loc[g["_order"].idxmax(), "source"]
            g = g[g["source"] == last_src]
            s = g.groupby("tokens")["latency_ms_median"].mean()
            self._curves[(key[0], key[1], key[2], int(key[3]))] = _Curve(
                s.index.to_numpy(np.float64), s.to_numpy(np.float64), "measured", str(last_src))
        for key, g in df[is_attn].groupby(["gpu", "model", "op", "tp"], sort=False):
            g = g.dropna(subset=["batch", "context"])
            s = g.groupby(["batch", "context"])["latency_ms_median"].mean().reset_index()
            if len(s):
                self._attn[(key[0], key[1], key[2], int(key[3]))] = (
                    s["batch"].to_numpy(np.float64), s["context"].to_numpy(np.float64),
                    s["latency_ms_median"].to_numpy(np.float64))
        self._gpus_with_data = {k[0] for k in self._curves} | {k[0] for k in self._attn}
        self._known_gpus = sorted(self._gpus_with_data | set(GPUS))
        self._known_set = frozenset(self._known_gpus)
        self._models_on = {}
        for k in list(self._curves) + list(self._attn):
            self._models_on.setdefault(k[0], set()).add(k[1])

    # ------------------------------------------------------------------ catalogue
    @property
    def known_gpus(self) -> list[str]:
        """GPUs with data or a GPUSpec."""
        return self._known_gpus

    def models_on(self, gpu: str) -> list[str]:
        """Models with measured profiles on ``gpu``."""
        return sorted(self._models_on.get(gpu, set()))

    def gpu(self, name: str) -> GPUSpec:
        """The GPUSpec of ``name`` (a100, a40, h100, h200); ProfileError lists the known ones."""
        if name not in GPUS:
            raise ProfileError(f"unknown gpu {name!r}; GPUs with a spec: {', '.join(sorted(GPUS))}")
        return GPUS[name]

    def launch_floor_ms(self, gpu: str) -> float:
        """Smallest measured kernel time on ``gpu`` (ms): median over models and TP degrees of
        ``attn_rope`` at 1 token; a GPU without data takes its reference GPU's floor."""
        if gpu not in self._floor:
            vals = [c.y[0] for (g, _m, op, _tp), c in self._curves.items()
                    if g == gpu and op == "attn_rope" and c.x[0] == 1]
            if not vals:
                ref = self._reference_gpu(gpu, None)
                if ref is None:
                    raise ProfileError(f"no measured kernels on gpu {gpu!r} to set its launch floor")
                return self.launch_floor_ms(ref)
            self._floor[gpu] = float(np.median(vals))
        return self._floor[gpu]

    def _check(self, op: str | None, gpu: str, model: str, tp: int) -> ModelConfig:
        if op is not None and op not in _OPS_SET:
            _check_choice("op", op, ALL_OPS)
        if gpu not in self._known_set:
            _check_choice("gpu", gpu, self._known_gpus)
        if model not in MODELS:
            _check_choice("model", model, MODELS)
        if tp not in TP_DEGREES:
            raise ProfileError(f"tp={tp!r} is not supported; tensor-parallel degrees: {TP_DEGREES}")
        return MODELS[model]

    def _reference_gpu(self, gpu: str, model: str | None) -> str | None:
        for ref in _REFERENCE_GPUS:
            if ref != gpu and ref in GPUS and (model is None or model in self._models_on.get(ref, ())):
                return ref
        return None

    # ------------------------------------------------------------------ curves
    def _flag(self, source: str, key: tuple, note: str) -> None:
        self.flags[(source,) + key] += 1
        if key + (source,) not in self._warned:
            self._warned.add(key + (source,))
            warnings.warn(f"ProfileDB: {source} answer for {key}: {note}", stacklevel=4)

    def _resolve(self, gpu: str, model: str, op: str, tp: int) -> _Curve:
        """The token curve answering (gpu, model, op, tp), measured or derived (cached)."""
        key = (gpu, model, op, tp)
        if key in self._resolved:
            return self._resolved[key]
        cfg = MODELS[model]
        c = self._curves.get(key)
        if c is None and op == "lm_head":
            up = self._resolve(gpu, model, "mlp_up_proj", tp)
            ratio = op_params("lm_head", cfg, tp) / op_params("mlp_up_proj", cfg, tp)
            kind = "extrapolated" if up.kind == "extrapolated" else "derived"
            c = _Curve(up.x, up.y * ratio, kind, f"mlp_up_proj curve x weight ratio {ratio:.3f}")
        if c is None and op in VIDUR_OPS:
            others = {t: v for (g, m, o, t), v in self._curves.items() if (g, m, o) == (gpu, model, op)}
            if others:  # another TP degree of the same model on this GPU
                tp_ref = min(others, key=lambda t: (abs(np.log2(t / tp)), t))
                ref = others[tp_ref]
                f = 1.0 if op in _UNSHARDED_OPS else tp_ref / tp
                floor = self.launch_floor_ms(gpu)
                c = _Curve(ref.x, np.maximum(ref.y * f, min(floor, ref.y.min())), "extrapolated",
                           f"tp={tp} not profiled; tp={tp_ref} curve x {f:g}")
            else:
                ref_gpu = self._reference_gpu(gpu, model)
                if ref_gpu is None or gpu not in GPUS:
                    on = self.models_on(gpu)
                    raise ProfileError(
                        f"no profile of model {model!r} op {op!r} on gpu {gpu!r}; models profiled on "
                        f"{gpu}: {', '.join(on) or 'none'}; GPUs that profile {model}: "
                        f"{', '.join(g for g in sorted(self._models_on) if model in self._models_on[g]) or 'none'}")
                ref = self._resolve(ref_gpu, model, op, tp)
                c = _Curve(ref.x, ref.y * self._roof_ratio(gpu, ref_gpu, cfg, op, ref.x, tp),
                           "extrapolated" if ref.kind == "extrapolated" else "derived",
                           f"{ref_gpu} curve x roofline ratio {gpu}/{ref_gpu}")
        if c is None:
            raise ProfileError(f"no curve for op {op!r} (it is modelled, not tabulated)")
        self._resolved[key] = c
        return c

    def _roof_ratio(self, gpu: str, ref: str, cfg: ModelConfig, op: str, tokens: np.ndarray, tp: int) -> np.ndarray:
        w = op_params(op, cfg, tp) * cfg.dtype_bytes
        if op == "emb":  # a gather: reads tokens rows of the table, not all of it
            w = tokens * cfg.d_model * cfg.dtype_bytes
        act = 2 * activation_bytes(op, cfg, tokens, tp)
        fl = gemm_flops(op, cfg, tokens, tp)
        a = rl.gemm_roofline_ms(fl, w, act, GPUS[gpu], self.launch_floor_ms(gpu))
        b = rl.gemm_roofline_ms(fl, w, act, GPUS[ref], self.launch_floor_ms(ref))
        return a / b

    @staticmethod
    def _eval(c: _Curve, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ms, beyond-grid mask) of a curve at ``tokens`` (linear inside, proportional above)."""
        inside = np.interp(tokens, c.x, c.y)
        over = tokens > c.x[-1]
        ms = np.where(over, c.y[-1] * tokens / c.x[-1], inside)
        return ms, over | (tokens < c.x[0])

    # ------------------------------------------------------------------ latency
    def estimate(self, op: str, gpu: str, model: str, tokens: float, context: float = 0, batch: int = 1,
                 tp: int = 1) -> Estimate:
        """One layer's ``op`` for a batch of ``tokens`` tokens: Estimate(ms, source, note).

        ``context``: KV length per sequence (decode) or prompt length (prefill; 0 means
        tokens / batch). ``batch``: sequences. Only attention and sampling use them.
        """
        cfg = self._check(op, gpu, model, tp)
        if not tokens >= 1:
            raise ProfileError(f"tokens must be >= 1, got {tokens!r}")
        if op in ATTENTION_OPS or op == "sampling":
            ms, src, note = self._modelled(op, gpu, cfg, float(tokens), float(context), float(batch), tp)
            return Estimate(float(ms), src, note)
        c = self._resolve(gpu, model, op, tp)
        ms, out = self._eval(c, np.asarray(float(tokens)))
        key = (gpu, model, op, tp)
        if out:
            note = f"tokens={tokens:g} outside the measured grid {c.x[0]:g}..{c.x[-1]:g}; " \
                   f"scaled in proportion to tokens"
            if self.strict:
                raise ProfileError(f"{op} on {gpu}/{model} tp={tp}: {note} (strict=True)")
            self._flag("extrapolated", key, note)
            return Estimate(float(ms), "extrapolated", note)
        if c.kind == "extrapolated":
            if self.strict:
                raise ProfileError(f"{op} on {gpu}/{model}: {c.note} (strict=True)")
            self._flag("extrapolated", key, c.note)
            return Estimate(float(ms), "extrapolated", c.note)
        if c.kind == "derived":
            self.flags[("derived",) + key] += 1
            return Estimate(float(ms), "derived", c.note)
        exact = bool(np.any(c.x == tokens))
        return Estimate(float(ms), "measured" if exact else "interpolated", c.note)

    def latency(self, op: str, gpu: str, model: str, tokens: float, context: float = 0, batch: int = 1,
                tp: int = 1) -> float:
        """Milliseconds of one call of ``op`` for one layer; see :meth:`estimate`."""
        return self.estimate(op, gpu, model, tokens, context, batch, tp).ms

    def _modelled(self, op: str, gpu: str, cfg: ModelConfig, tokens: float, context: float, batch: float,
                  tp: int) -> tuple[float, str, str]:
        key = (gpu, cfg.name, op, tp)
        if op == "sampling":
            c = self._curves.get(key)
            if c is not None:
                ms, out = self._eval(c, np.asarray(batch))
                return float(ms), ("extrapolated" if out else "interpolated"), c.note
            return float(rl.sampling_ms(cfg, self.gpu(gpu), batch, self.launch_floor_ms(gpu))), "roofline", ""
        if op == "attn_prefill" and context <= 0:
            context = tokens / max(batch, 1.0)
        if batch < 1 or context < 1:
            raise ProfileError(f"{op} needs batch >= 1 and context >= 1, got batch={batch:g} context={context:g}")
        ms = self._attn_vec(op, gpu, cfg, np.asarray(batch), np.asarray(context), tp)
        pts = self._attn.get(key)
        if pts is None:
            return float(ms), "roofline", ""
        exact = np.any((pts[0] == batch) & (pts[1] == context))
        return float(ms), ("measured" if exact else "interpolated"), "roofline x measured correction"

    def _attn_vec(self, op: str, gpu: str, cfg: ModelConfig, batch: np.ndarray, context: np.ndarray,
                  tp: int) -> np.ndarray:
        fn = rl.attn_prefill_ms if op == "attn_prefill" else rl.attn_decode_ms
        pts = self._attn.get((gpu, cfg.name, op, tp))
        if pts is None:
            return fn(cfg, self.gpu(gpu), batch, context, tp, self.launch_floor_ms(gpu))
        # Measured points: the roofline's shape scaled by measured/roofline at the nearest
        # measured point (log distance in batch and context). A device without a GPUSpec
        # (e.g. the CPU the profiler ran on) borrows the H100's shape; only ratios matter.
        g = GPUS.get(gpu, GPUS["h100"])
        floor = self.launch_floor_ms(gpu) if gpu in GPUS or self._has_floor(gpu) else 0.0
        ms = fn(cfg, g, batch, context, tp, floor)
        pb, pc, pm = pts
        ratio = pm / fn(cfg, g, pb, pc, tp, floor)
        d = (np.log(np.maximum(batch, 1))[..., None] - np.log(pb)) ** 2 + \
            (np.log(np.maximum(context, 1))[..., None] - np.log(pc)) ** 2
        idx = np.argmin(d, axis=-1)
        exact = np.take_along_axis(d, idx[..., None], axis=-1)[..., 0] == 0
        return np.where(exact, pm[idx], ms * ratio[idx])  # a measured point answers itself

    def _has_floor(self, gpu: str) -> bool:
        return any(g == gpu and op == "attn_rope" and c.x[0] == 1 for (g, _m, op, _t), c in self._curves.items())

    def latency_vec(self, op: str, gpu: str, model: str, tokens: np.ndarray, context: np.ndarray | float = 0,
                    batch: np.ndarray | float = 1, tp: int = 1) -> np.ndarray:
        """Vectorised :meth:`latency` (ms per element); entries with tokens == 0 give 0.

        Out-of-grid entries follow ``strict`` like the scalar call (raise, or flag and warn once).
        """
        cfg = self._check(op, gpu, model, tp)
        tokens = np.asarray(tokens, dtype=np.float64)
        batch = np.broadcast_to(np.asarray(batch, dtype=np.float64), tokens.shape)
        context = np.broadcast_to(np.asarray(context, dtype=np.float64), tokens.shape)
        return self._op_vec(op, gpu, cfg, tokens, context, batch, tp)

    def _op_vec(self, op: str, gpu: str, cfg: ModelConfig, tokens: np.ndarray, context: np.ndarray,
                batch: np.ndarray, tp: int) -> np.ndarray:
        model = cfg.name
        active = tokens > 0
        if op == "sampling":
            c = self._curves.get((gpu, model, op, tp))
            if c is None:
                return rl.sampling_ms(cfg, self.gpu(gpu), np.where(active, batch, 0), self.launch_floor_ms(gpu))
            ms, out = self._eval(c, np.maximum(batch, 1))
        elif op in ATTENTION_OPS:
            if op == "attn_prefill":
                context = np.where(context <= 0, tokens / np.maximum(batch, 1), context)
            ms = self._attn_vec(op, gpu, cfg, np.maximum(batch, 1), np.maximum(context, 1), tp)
            return np.where(active, ms, 0.0)
        else:
            c = self._resolve(gpu, model, op, tp)
            ms, out = self._eval(c, np.maximum(tokens, 1))
            if c.kind == "extrapolated":
                out = np.ones_like(out)
            elif c.kind == "derived":
                self.flags[("derived", gpu, model, op, tp)] += 1
        out &= active
        if out.any():
            key = (gpu, model, op, tp)
            note = f"{int(out.sum())} of {out.size} queries outside the measured grid or tp"
            if self.strict:
                raise ProfileError(f"{op} on {gpu}/{model} tp={tp}: {note} (strict=True)")
            self._flag("extrapolated", key, note)
        return np.where(active, ms, 0.0)

    # ------------------------------------------------------------------ groups
    def group_latency(self, group: str, gpu: str, model: str, tokens: float, context: float = 0, batch: int = 1,
                      tp: int = 1, phase: str = "decode") -> float:
        """ms for one pass of ``group`` over all its layers, incl. its TP all-reduces.

        decode: ``batch`` sequences, one new token each, at KV length ``context``.
        prefill: ``batch`` prompts totalling ``tokens`` (prompt length tokens / batch).
        The LM head and sampling see one row per sequence (``batch``) in both phases.
        """
        out = self.group_latency_vec(group, gpu, model, np.asarray([float(tokens)]), np.asarray([float(context)]),
                                     np.asarray([float(batch)]), tp, phase)
        return float(out[0])

    def group_latency_vec(self, group: str, gpu: str, model: str, tokens: np.ndarray, contexts: np.ndarray,
                          batch: np.ndarray, tp: int = 1, phase: str = "decode") -> np.ndarray:
        """Vectorised :meth:`group_latency`: one ms value per element of ``tokens``."""
        if group not in OPERATOR_GROUPS:
            _check_choice("group", group, OPERATOR_GROUPS)
        if phase not in PHASES:
            _check_choice("phase", phase, PHASES)
        cfg = self._check(None, gpu, model, tp)
        tokens = np.asarray(tokens, dtype=np.float64)
        batch = np.broadcast_to(np.asarray(batch, dtype=np.float64), tokens.shape)
        contexts = np.broadcast_to(np.asarray(contexts, dtype=np.float64), tokens.shape)
        if np.any(tokens < 0) or np.any(batch[tokens > 0] < 1):
            raise ProfileError("tokens must be >= 0 and batch >= 1 where tokens > 0")
        total = np.zeros(tokens.shape)
        zero = np.zeros(tokens.shape)
        table = self._group_table(gpu, cfg, tp, group, phase)
        if table is not None:  # all token-indexed ops summed on one grid
            ms, out = self._eval(table, np.maximum(tokens, 1))
            out = (out | (table.kind == "extrapolated")) & (tokens > 0)
            if table.kind == "derived":
                self.flags[("derived", gpu, model, group, tp)] += 1
            if out.any():
                note = f"{int(out.sum())} of {out.size} queries outside the measured grid or tp ({table.note})"
                if self.strict:
                    raise ProfileError(f"group {group} on {gpu}/{model} tp={tp}: {note} (strict=True)")
                self._flag("extrapolated", (gpu, model, group, tp), note)
            total += np.where(tokens > 0, ms, 0.0)
        for op, calls in group_ops(group, cfg, phase):
            if table is not None and op in table_ops(table):
                continue
            if op in ("lm_head", "sampling"):
                t = np.where(tokens > 0, batch, 0.0)
                total += calls * self._op_vec(op, gpu, cfg, t, zero, batch, tp)
            elif op == "attn_prefill":
                total += calls * self._op_vec(op, gpu, cfg, tokens, zero, batch, tp)
            else:
                total += calls * self._op_vec(op, gpu, cfg, tokens, contexts, batch, tp)
        if group in ALL_REDUCE_GROUPS and tp > 1:
            total += self.all_reduce_vec(gpu, tokens * cfg.d_model * cfg.dtype_bytes, tp)
        layers = 1 if group in ONCE_PER_STEP else cfg.n_layers
        return total * layers

    def _group_table(self, gpu: str, cfg: ModelConfig, tp: int, group: str, phase: str) -> _Curve | None:
        """Sum of the group's token-indexed op curves on their common grid (cached), or None when
        the curves do not share a grid (then each op is evaluated on its own)."""
        key = (gpu, cfg.name, tp, group, phase)
        if key in self._tables:
            return self._tables[key]
        ops = [(op, n) for op, n in group_ops(group, cfg, phase)
               if op not in ATTENTION_OPS and op not in ("lm_head", "sampling")]
        table = None
        if ops:
            curves = [(self._resolve(gpu, cfg.name, op, tp), n) for op, n in ops]
            x = curves[0][0].x
            if all(c.x.shape == x.shape and np.array_equal(c.x, x) for c, _ in curves):
                kinds = {c.kind for c, _ in curves}
                kind = "extrapolated" if "extrapolated" in kinds else "derived" if "derived" in kinds else "measured"
                y = sum(n * c.y for c, n in curves)
                table = _Curve(x, y, kind, "+".join(op for op, _ in ops))
        self._tables[key] = table
        return table

    def model_step_latency(self, gpu: str, model: str, tokens: float, context: float = 0, batch: int = 1,
                           tp: int = 1, phase: str = "decode", calibrated: bool = False) -> float:
        """ms of one whole-model iteration: sum of all groups (kernels and all-reduces only), plus
        :meth:`iteration_overhead_ms` when ``calibrated``."""
        ms = sum(self.group_latency(g, gpu, model, tokens, context, batch, tp, phase) for g in OPERATOR_GROUPS)
        if calibrated:
            ms += self.iteration_overhead_ms(gpu, model, tp, batch, tokens, phase, kernel_ms=ms)
        return ms

    def model_step_latency_vec(self, gpu: str, model: str, tokens: np.ndarray, contexts: np.ndarray,
                               batch: np.ndarray, tp: int = 1, phase: str = "decode",
                               calibrated: bool = False) -> np.ndarray:
        """Vectorised :meth:`model_step_latency` (ms per element; 0 where tokens == 0)."""
        ms = sum(self.group_latency_vec(g, gpu, model, tokens, contexts, batch, tp, phase) for g in OPERATOR_GROUPS)
        if calibrated:
            cfg = MODELS[model]
            tokens = np.asarray(tokens, dtype=np.float64)
            ov = self.overhead.overhead_ms(ms, cfg.n_layers, tp, np.asarray(batch, dtype=np.float64), tokens, phase)
            ms = ms + np.where(tokens > 0, ov, 0.0)
        return ms

    def iteration_overhead_ms(self, gpu: str, model: str, tp: int, batch: float, tokens: float, phase: str = "decode",
                              context: float = 0, kernel_ms: float | None = None) -> float:
        """Per-iteration time a serving stack adds to the kernel sum (ms), from the A100 fit.

        The fitted model (:mod:`profiles.overhead`) is GPU-independent; it reaches other GPUs
        through ``kernel_ms``, the kernel sum on that GPU (computed when not given).
        """
        cfg = self._check(None, gpu, model, tp)
        _check_choice("phase", phase, PHASES)
        if kernel_ms is None:
            kernel_ms = sum(self.group_latency(g, gpu, model, tokens, context, batch, tp, phase)
                            for g in OPERATOR_GROUPS)
        return float(self.overhead.overhead_ms(np.asarray(kernel_ms), cfg.n_layers, tp, np.asarray(float(batch)),
                                               np.asarray(float(tokens)), phase))

    # ------------------------------------------------------------------ network
    def _net_curve(self, node: str, coll: str, workers: int, dpn: int) -> tuple[np.ndarray, np.ndarray] | None:
        key = (node, coll, workers, dpn)
        if key not in self._net_cache:
            n = self._net
            s = n[(n["node"] == node) & (n["collective"] == coll) & (n["num_workers"] == workers)
                  & (n["devices_per_node"] == dpn)].sort_values("nbytes")
            if s.empty:
                return None
            self._net_cache[key] = (np.log(s["nbytes"].to_numpy(np.float64)),
                                    np.log(s["latency_ms_median"].to_numpy(np.float64)))
        return self._net_cache[key]

    def _net_eval(self, curve: tuple[np.ndarray, np.ndarray], nbytes: np.ndarray, key: tuple) -> np.ndarray:
        lx, ly = curve
        x = np.log(np.maximum(nbytes, 1.0))
        inside = np.exp(np.interp(x, lx, ly))  # log-log interpolation; clamps below the smallest size
        over = x > lx[-1]
        ms = np.where(over, np.exp(ly[-1]) * nbytes / np.exp(lx[-1]), inside)
        if np.any(over):
            note = f"message above the largest measured {np.exp(lx[-1]):.0f} bytes; bandwidth-bound scaling"
            if self.strict:
                raise ProfileError(f"{key}: {note} (strict=True)")
            self._flag("extrapolated", key, note)
        return ms

    def send_recv_ms(self, gpu: str, nbytes: float, same_node: bool = True) -> float:
        """ms to move ``nbytes`` from one GPU to another (same node: NVLink; else the network)."""
        return float(self.send_recv_vec(gpu, np.asarray(float(nbytes)), same_node))

    def send_recv_vec(self, gpu: str, nbytes: np.ndarray, same_node: bool = True) -> np.ndarray:
        """Vectorised :meth:`send_recv_ms`; 0 ms where nbytes == 0."""
        node = self.gpu(gpu).network_profile
        curve = self._net_curve(node, "send_recv", 2, 2 if same_node else 1)
        if curve is None:
            raise ProfileError(f"no send_recv profile for node {node!r}")
        nbytes = np.asarray(nbytes, dtype=np.float64)
        ms = self._net_eval(curve, nbytes, (gpu, "send_recv", same_node))
        return np.where(nbytes > 0, ms, 0.0)

    def all_reduce_ms(self, gpu: str, nbytes: float, tp: int) -> float:
        """ms of one all-reduce of ``nbytes`` across ``tp`` GPUs of one node (0 for tp == 1)."""
        return float(self.all_reduce_vec(gpu, np.asarray(float(nbytes)), tp))

    def all_reduce_vec(self, gpu: str, nbytes: np.ndarray, tp: int) -> np.ndarray:
        """Vectorised :meth:`all_reduce_ms`.

        From the node's measured intra-node all-reduce (log-log interpolation in bytes). A node
        without one (A40) gets a ring estimate from its send_recv profile, 2 (tp - 1) steps of
        nbytes / tp each, flagged ``derived``.
        """
        if tp not in TP_DEGREES:
            raise ProfileError(f"tp={tp!r} is not supported; tensor-parallel degrees: {TP_DEGREES} (tp <= 8)")
        nbytes = np.asarray(nbytes, dtype=np.float64)
        if tp == 1:
            return np.zeros(nbytes.shape)
        node = self.gpu(gpu).network_profile
        curve = self._net_curve(node, "all_reduce", tp, tp)
        if curve is None:
            self.flags[("derived", gpu, "all_reduce", tp)] += 1
            return 2 * (tp - 1) * self.send_recv_vec(gpu, nbytes / tp, same_node=True)
        ms = self._net_eval(curve, nbytes, (gpu, "all_reduce", tp))
        return np.where(nbytes > 0, ms, 0.0)

    # ------------------------------------------------------------------ memory and power
    def memory(self, op_or_group: str, gpu: str, model: str, tokens: float, context: float = 0, batch: int = 1,
               tp: int = 1, phase: str = "decode") -> float:
        """Bytes one GPU of a ``tp``-way replica holds for an op or a group.

        Counted: weights (runtime/models.py shapes, sharded by tp; per layer for an op, all
        layers for a group), the largest activation the op / group writes for ``tokens``
        tokens plus its input (tokens x d_model), and for attention the KV cache of ``batch``
        sequences at ``context`` tokens (one layer for an op, all layers for the attn group).
        Not counted: allocator fragmentation, CUDA context, workspace buffers.
        """
        cfg = self._check(None, gpu, model, tp)
        self.gpu(gpu)
        inp = tokens * cfg.d_model * cfg.dtype_bytes
        kv_layer = batch * context * 2 * (cfg.n_kv_heads / tp) * cfg.head_dim * cfg.dtype_bytes
        if op_or_group in OPERATOR_GROUPS:
            _check_choice("phase", phase, PHASES)
            ops = [o for o, _ in group_ops(op_or_group, cfg, phase)]
            act = max(activation_bytes(o, cfg, batch if o in ("lm_head", "sampling") else tokens, tp) for o in ops)
            kv = kv_layer * cfg.n_layers if op_or_group == "attn" else 0.0
            return float(cfg.group_weight_bytes(op_or_group) / tp + inp + act + kv)
        _check_choice("op or group", op_or_group, ALL_OPS + OPERATOR_GROUPS)
        w = op_params(op_or_group, cfg, tp) * cfg.dtype_bytes
        kv = kv_layer if op_or_group in ATTENTION_OPS else 0.0
        return float(w + inp + activation_bytes(op_or_group, cfg, tokens, tp) + kv)

    def power_w(self, gpu: str, utilisation):
        """Watts of one GPU busy a share ``utilisation`` (0..1) of the time:
        ``idle_w + (peak_w - idle_w) * utilisation`` (float or array; linear, as fitted on
        the A100 serving data, see profiles/gpus.py)."""
        g = self.gpu(gpu)
        u = np.asarray(utilisation, dtype=np.float64)
        if np.any((u < 0) | (u > 1)) or np.any(np.isnan(u)):
            raise ProfileError(f"utilisation must lie in [0, 1], got {utilisation!r}")
        p = g.idle_w + (g.peak_w - g.idle_w) * u
        return float(p) if p.ndim == 0 else p
