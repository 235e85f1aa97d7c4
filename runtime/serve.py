"""Command line: serve a model split into operator pools, optionally under a controller.

    python -m runtime.serve --model tiny --device cpu
    python -m runtime.serve --model llama-2-7b --device cuda --weights /models/llama-2-7b \\
        --controller ppo --checkpoint checkpoints/ppo --interval 1

Binds to 127.0.0.1 unless ``--host`` says otherwise (a non-loopback host needs
``--allow-remote``: the API has no authentication).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
from pathlib import Path

import torch

from runtime.control import SLO, Plan, PlanError
from runtime.engine import Engine, EngineConfig
from runtime.models import get_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model shape name (runtime/models.py), e.g. tiny, llama-2-7b")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="weights/activations (default float32 on cpu, float16 on cuda)")
    p.add_argument("--weights", default=None, help="Hugging Face-format folder (config.json + *.safetensors); "
                                                   "random weights when absent")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and sampling")
    p.add_argument("--controller", default=None,
                   help="static | model-level | operator-queueing | ppo (none: the plan stays until POST /v1/plan)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder for --controller ppo")
    p.add_argument("--interval", type=float, default=1.0, help="control interval (seconds)")
    p.add_argument("--budget", type=int, default=None,
                   help="fixed-budget mode: hold every plan of --controller at this many placement slots "
                        "(one GPU each on CUDA with enough GPUs), shrunk or topped up (agents/budget.py)")
    # agents.budget.FILL_RULES, written out: the runtime imports agents only when a controller is asked for
    p.add_argument("--budget-fill", default="utilisation", choices=("utilisation", "proportional"),
                   help="how --budget spends spare slots (default utilisation)")
    p.add_argument("--plan", default=None, help="initial plan: JSON text or a .json file in Plan.to_dict form")
    p.add_argument("--replicas", type=int, default=1, help="initial whole-model replicas when --plan is absent")
    p.add_argument("--max-batch", type=int, default=32, help="initial batch limit when --plan is absent")
    p.add_argument("--max-replicas", type=int, default=8, help="most replicas per group a plan may ask for")
    p.add_argument("--kv-mib", type=float, default=64.0, help="KV-cache memory per attention replica (MiB)")
    p.add_argument("--max-waiting", type=int, default=512, help="requests that may wait for KV before 429s")
    p.add_argument("--kv-allocation", choices=("on_demand", "reserve"), default="on_demand",
                   help="KV blocks grown as sequences decode, newest preempted when short (default), or "
                        "reserved for prompt + max_tokens at admission")
    p.add_argument("--micro-batches", type=int, default=2,
                   help="most micro-batches an iteration through the pools is cut into (1: never)")
    p.add_argument("--micro-batching", choices=("adaptive", "fixed"), default="adaptive",
                   help="per iteration the count measured fastest (default), or always --micro-batches")
    p.add_argument("--pool-dispatch", choices=("fill", "spread"), default="fill",
                   help="decode rows to the fewest replicas of a projection / MLP pool in max_batch chunks, "
                        "rows with prompt tokens spread over all (default), or every stage spread")
    p.add_argument("--pools", choices=("local", "ray"), default="local",
                   help="stateless pools (embedding, projections, MLP, LM head) as threads of this process "
                        "(default), or as Ray Serve deployments on a Ray cluster (runtime/rayserve.py)")
    p.add_argument("--ray-address", default=None,
                   help="with --pools ray: the Ray cluster to join (e.g. auto); default: a local Ray instance")
    p.add_argument("--ray-gpus", type=float, default=None,
                   help="with --pools ray: GPUs Ray reserves per pool replica (a fraction packs several on one "
                        "GPU); default --ray-tp with --device cuda, else 0")
    p.add_argument("--ray-tp", type=int, default=1,
                   help="with --pools ray: devices each pool replica splits its weights over (tensor parallelism)")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT target (seconds)")
    p.add_argument("--slo-tbt", type=float, default=0.5, help="TBT target (seconds)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-remote", action="store_true", help="permit a non-loopback --host")
    p.add_argument("--log-level", default="info")
    return p


def initial_plan(args: argparse.Namespace) -> Plan:
    """The plan from ``--plan`` (JSON or file), else ``--replicas`` whole-model instances."""
    if args.plan is None:
        return Plan.model_level(args.replicas, args.max_batch, 1)
    text = args.plan
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise SystemExit(f"--plan: {text!r} is neither JSON nor an existing file")
        text = path.read_text()
    try:
        return Plan.from_dict(json.loads(text))
    except (json.JSONDecodeError, PlanError) as e:
        raise SystemExit(f"--plan: {e}") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not _loopback(args.host) and not args.allow_remote:
        raise SystemExit(f"--host {args.host} is not a loopback address; add --allow-remote to expose the API")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    try:
        cfg = get_model(args.model)
    except KeyError as e:
        raise SystemExit(str(e.args[0])) from None
    if args.controller == "ppo" and not args.checkpoint:
        raise SystemExit("--controller ppo needs --checkpoint DIR")
    if args.budget is not None and not args.controller:
        raise SystemExit("--budget needs --controller (it tops the controller's plans up to the budget)")
    if args.budget is not None and args.budget < 1:
        raise SystemExit(f"--budget must be >= 1 placement slot, got {args.budget}")
    if args.micro_batches < 1:
        raise SystemExit(f"--micro-batches must be >= 1, got {args.micro_batches}")
    if args.pools != "ray" and (args.ray_address is not None or args.ray_gpus is not None or args.ray_tp != 1):
        raise SystemExit("--ray-address / --ray-gpus / --ray-tp need --pools ray")
    if not 1 <= args.ray_tp <= 8:
        raise SystemExit(f"--ray-tp must be in 1..8, got {args.ray_tp}")
    if args.ray_gpus is not None and args.ray_gpus < 0:
        raise SystemExit(f"--ray-gpus must be >= 0, got {args.ray_gpus}")
    ray_cfg = None
    if args.pools == "ray":
        try:
            from runtime.rayserve import STATELESS, RayPoolsConfig
        except ImportError as e:  # pragma: no cover - ray is a declared dependency
            raise SystemExit(f"--pools ray: {e}; install ray[serve]") from None
        gpus = args.ray_gpus if args.ray_gpus is not None else (float(args.ray_tp) if args.device == "cuda" else 0.0)
        ray_cfg = RayPoolsConfig(address=args.ray_address, num_gpus={g: gpus for g in STATELESS} if gpus else {},
                                 tp={g: args.ray_tp for g in STATELESS}, seed=args.seed)
    dtype = DTYPES[args.dtype or ("float16" if args.device == "cuda" else "float32")]

    from runtime.model import build_model

    model = build_model(cfg, device="cpu", dtype=dtype, weights_dir=args.weights, seed=args.seed)
    econf = EngineConfig(device=args.device, kv_bytes_per_replica=int(args.kv_mib * 2**20),
                         max_waiting=args.max_waiting, max_replicas=args.max_replicas,
                         slo=SLO(args.slo_ttft, args.slo_tbt), seed=args.seed, kv_allocation=args.kv_allocation,
                         micro_batches=args.micro_batches, micro_batching=args.micro_batching,
                         pool_dispatch=args.pool_dispatch, pools=args.pools, ray=ray_cfg)
    engine = Engine(model, initial_plan(args), econf).start()
    loop = None
    if args.controller:
        from runtime.controllers import ControlLoop, make_controller

        try:
            ctrl = make_controller(args.controller, engine, checkpoint=args.checkpoint, interval_s=args.interval)
            if args.budget is not None:
                from runtime.controllers import with_budget

                ctrl = with_budget(ctrl, engine, args.budget, args.budget_fill)
        except (ValueError, ImportError, RuntimeError) as e:
            engine.stop()
            raise SystemExit(f"--controller {args.controller}: {e}") from None
        loop = ControlLoop(engine, ctrl, args.interval).start()

    import uvicorn

    from runtime.server import create_app

    app = create_app(engine, controller=loop)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        if loop is not None:
            loop.stop()
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
