"""Controller plug-in for the live runtime: name -> Controller, and the control loop.

``make_controller(name, engine, ...)`` builds ``static``, ``model-level``,
``operator-queueing`` or ``ppo`` from the agents package (imported lazily, so the runtime
serves without it when no controller is asked for). ``agents.registry.make_controller``
is bound to a simulator scenario (profiled GPU, scenario codec); the live runtime instead
gives the non-learned controllers a :class:`agents.context.ControllerContext` whose
latency model is measured on the engine's own operators at start-up
(:func:`measure_latency`, a linear fit per group). The PPO controller is the same class
the simulator evaluates, loaded from its checkpoint folder with its own codec.
:func:`with_budget` wraps any of them in fixed-budget mode (agents/budget.py), counting the
runtime's placement slots.

:class:`ControlLoop` calls ``controller.decide(engine.observe())`` every ``interval_s``
seconds on its own thread and applies the plan; a controller that raises keeps the plan in
force (logged), so a bad decision never stops serving.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from runtime.control import ClusterState, Controller, Plan
from runtime.models import OPERATOR_GROUPS

log = logging.getLogger("opscale.runtime.control")

CONTROLLERS = ("static", "model-level", "operator-queueing", "ppo")


def _time_ms(fn: Any, repeats: int = 7) -> float:
    """Fastest of ``repeats`` timed calls after two warm-ups (ms); the minimum resists noise
    from other processes on a shared machine."""
    fn()
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return min(out)


@torch.no_grad()
def measure_latency(engine: Any, tokens: tuple[int, ...] = (1, 8, 32), contexts: tuple[int, ...] = (16, 128),
                    repeats: int = 7) -> Any:
    """A :class:`agents.context.LinearLatency` fitted to the engine's own operators (ms).

    Each group's modules (all layers) are timed on the master model for ``tokens`` rows
    (fastest of ``repeats``);
    ``fixed_ms`` and ``per_token_ms`` come from a least-squares line through the medians.
    Attention is timed as decode over ``contexts`` cached tokens to get ``per_ctx_ms``.
    """
    from agents.context import LinearLatency
    from runtime.engine import group_modules

    m = engine.model
    cfg = m.cfg
    dev = m.embed.weight.device
    dt = m.embed.weight.dtype
    fixed: dict[str, float] = {}
    per_tok: dict[str, float] = {}
    per_ctx: dict[str, float] = {}
    for g in OPERATOR_GROUPS:
        mods = group_modules(m, g)
        rows = []
        for T in tokens:
            x = torch.randn(T, cfg.d_model, device=dev, dtype=dt)
            ids = torch.randint(0, cfg.vocab_size, (T,), device=dev)
            if g == "embed":
                fn = lambda ids=ids: mods["embed"](ids)  # noqa: E731
            elif g == "proj":
                def fn(x=x):
                    for q in mods["qkv"]:
                        _, _, _ = q(x)
                    for o in mods["o"]:
                        o(torch.zeros(x.shape[0], cfg.n_heads * cfg.head_dim, device=dev, dtype=dt))
            elif g == "mlp":
                def fn(x=x):
                    for n, f in zip(mods["norm"], mods["mlp"]):
                        x + f(n(x))
            elif g == "head":
                fn = lambda x=x: mods["sampler"](mods["lm_head"](mods["norm"](x)))  # noqa: E731
            else:
                for C in contexts:
                    q = torch.randn(T, cfg.n_heads, cfg.head_dim, device=dev, dtype=dt)
                    kc = torch.randn(T, C, cfg.n_kv_heads, cfg.head_dim, device=dev, dtype=dt)
                    lengths = torch.full((T,), C, device=dev)

                    def fn(x=x, q=q, kc=kc, lengths=lengths):
                        for n, a in zip(mods["norm"], mods["attn"]):
                            n(x)
                            a.decode(q, kc, kc, lengths)
                    rows.append((T, T * C, _time_ms(fn, repeats)))
                continue
            rows.append((T, 0, _time_ms(fn, repeats)))
        a = np.array([[1.0, r[0], r[1]] for r in rows])
        y = np.array([r[2] for r in rows])
        if g != "attn":
            a = a[:, :2]
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        fixed[g] = float(max(coef[0], 0.0))
        per_tok[g] = float(max(coef[1], 0.0))
        if g == "attn":
            per_ctx[g] = float(max(coef[2], 0.0))
    return LinearLatency(fixed, per_tok, per_ctx)


def controller_context(engine: Any, interval_s: float, slot_memory_bytes: int = 8 * 2**30, latency: Any = None) -> Any:
    """The :class:`agents.context.ControllerContext` of a live engine (latency measured if not given)."""
    from agents.context import ControllerContext
    from runtime.codec import CodecConfig

    return ControllerContext(model=engine.cfg, slo=engine.config.slo, latency=latency or measure_latency(engine),
                             gpu_memory_bytes=slot_memory_bytes, tp=1, interval_s=interval_s,
                             codec=CodecConfig(max_replicas=engine.config.max_replicas))


def make_controller(name: str, engine: Any, checkpoint: str | None = None, interval_s: float = 1.0,
                    **kwargs: Any) -> Controller:
    """The controller called ``name`` for ``engine``; raises ValueError naming the choices."""
    key = name.lower()
    if key not in CONTROLLERS:
        raise ValueError(f"unknown controller {name!r}; choose one of {', '.join(CONTROLLERS)}")
    if key == "ppo" and not checkpoint:
        raise ValueError("controller 'ppo' needs --checkpoint DIR (a folder written by training)")
    if key == "static":
        from agents.baselines import StaticController

        return StaticController(engine.plan)
    if key == "ppo":
        from agents.ppo import PPOController

        return PPOController(checkpoint, **kwargs)
    ctx = controller_context(engine, interval_s)
    if key == "model-level":
        from agents.baselines import ModelLevelConfig, ModelLevelController

        return ModelLevelController(ctx, ModelLevelConfig(max_replicas=engine.config.max_replicas, **kwargs))
    from agents.operator_queueing import OperatorQueueingConfig, OperatorQueueingController

    return OperatorQueueingController(ctx, OperatorQueueingConfig(**kwargs))


def slot_count(plan: Plan) -> int:
    """Placement slots ``plan`` occupies (:func:`runtime.pools.assign_slots`): the runtime's
    ``gpus_in_use`` on a CPU machine; on CUDA the slots map round-robin onto the visible GPUs
    (one GPU each when there are as many GPUs as slots)."""
    from runtime.pools import assign_slots

    return len({s for slots in assign_slots(plan).values() for s in slots})


def with_budget(controller: Controller, engine: Any, budget_slots: int, rule: str = "utilisation") -> Controller:
    """``controller`` in fixed-budget mode on a live engine: every plan it decides is shrunk to or
    topped up to ``budget_slots`` placement slots (:class:`agents.budget.BudgetFill` with
    ``cap=True``, counting slots with :func:`slot_count`; ``rule`` as there)."""
    from agents.budget import BudgetFill

    return BudgetFill(controller, budget_slots, slot_count, engine.config.max_replicas, rule, cap=True)


@dataclass
class Decision:
    """One turn of the control loop."""

    time_s: float
    plan: Plan
    decide_s: float
    error: str | None = None
    state: ClusterState | None = field(default=None, repr=False)


class ControlLoop:
    """Calls ``controller.decide(engine.observe())`` every ``interval_s`` and applies the plan.

    Args:
        engine: a started :class:`runtime.engine.Engine`.
        controller: any :class:`runtime.control.Controller`.
        interval_s: control interval (seconds).
        keep: decisions kept in :attr:`history`.
    """

    def __init__(self, engine: Any, controller: Controller, interval_s: float = 1.0, keep: int = 1000) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.engine = engine
        self.controller = controller
        self.interval_s = interval_s
        self.name = getattr(controller, "name", type(controller).__name__)
        self.history: list[Decision] = []
        self._keep = keep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opscale-control", daemon=True)

    def start(self) -> "ControlLoop":
        """Reset the controller with the current state and start the loop thread."""
        self.controller.reset(self.engine.observe())
        self._thread.start()
        return self

    def step(self) -> Decision:
        """One control turn now (also used by the thread)."""
        state = self.engine.observe()
        t0 = time.perf_counter()
        try:
            plan = self.controller.decide(state)
            applied = self.engine.apply(plan)
            d = Decision(state.time_s, applied, time.perf_counter() - t0, state=state)
        except Exception as e:  # keep serving under the plan in force
            log.exception("controller %s failed; keeping the plan in force", self.name)
            d = Decision(state.time_s, self.engine.plan, time.perf_counter() - t0, f"{type(e).__name__}: {e}", state)
        self.history.append(d)
        del self.history[:-self._keep]
        return d

    def _run(self) -> None:
        next_t = time.perf_counter() + self.interval_s
        while not self._stop.wait(max(next_t - time.perf_counter(), 0.0)):
            self.step()
            next_t += self.interval_s

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
