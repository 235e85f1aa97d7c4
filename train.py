"""Train the PPO operator-scaling policy on the default scenario.

    python train.py --trace azure                     # the default job (`make train`)
    python train.py --trace azure --timesteps 2000    # a quick smoke run
    python train.py --resume checkpoints/latest --timesteps 50000

Writes a checkpoint folder (``--save``) with ``policy.zip``, ``vecnormalize.pkl`` and
``metadata.json``, TensorBoard events under ``--logdir``, and ends by evaluating the policy
against the model-level autoscaler on the held-out split (reference simulator), printed as
a table. See docs/TRAINING.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from agents.hyperparams import DEFAULT_CONFIG


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default="azure", help="trace name or CSV path (default azure)")
    p.add_argument("--model", default=None, help="model preset (default: the scenario's, llama-2-70b)")
    p.add_argument("--gpu", default=None, help="GPU type (default: the scenario's, h100)")
    p.add_argument("--scenario", default=None, help="scenario YAML (default envs/configs/default.yaml)")
    p.add_argument("--timesteps", type=int, default=None, help="env steps to train (default: from --config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-envs", type=int, default=None, help="parallel envs (default: from --config)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="hyperparameter YAML (RL Zoo layout)")
    p.add_argument("--logdir", default="runs", help="TensorBoard folder")
    p.add_argument("--save", default="checkpoints/latest", help="checkpoint folder to write")
    p.add_argument("--resume", default=None, help="checkpoint folder to continue training from")
    p.add_argument("--bc-episodes", type=int, default=None,
                   help="teacher episodes for behaviour cloning before PPO (0: off; default from --config)")
    p.add_argument("--eval-freq", type=int, default=None, help="env steps between validation evaluations (EvalCallback on the val split)")
    p.add_argument("--final-eval", default="reference", choices=["reference", "fast", "none"],
                   help="simulator of the closing comparison with model-level on the held-out split")
    p.add_argument("--final-eval-window-s", type=float, default=None,
                   help="trace seconds of the closing comparison (default: the whole held-out split)")
    p.add_argument("--no-progress-bar", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from agents.training import TrainArgs, train

    t0 = time.time()
    out = train(TrainArgs(trace=args.trace, model=args.model, gpu=args.gpu, scenario=args.scenario,
                          timesteps=args.timesteps, seed=args.seed, n_envs=args.n_envs, config=args.config,
                          logdir=args.logdir, save=args.save, resume=args.resume, bc_episodes=args.bc_episodes,
                          eval_freq=args.eval_freq, progress_bar=not args.no_progress_bar))
    print(f"trained {out['timesteps']} steps in {out['train_seconds']:.0f} s; checkpoint {out['checkpoint']} "
          f"(from {out['chosen']}); TensorBoard: {out['logdir']}")
    if args.final_eval != "none":
        from agents.evaluate import evaluate, format_table

        names = ["model-level", "ppo"]
        results, _ = evaluate(names, out["scenario"], "test", args.final_eval, out["checkpoint"], args.seed,
                              args.final_eval_window_s)
        print(format_table(results))
        ml, ppo = results["model-level"], results["ppo"]
        beats = ppo["meets_slo"] and ppo["gpu_hours"] < ml["gpu_hours"] if ml["meets_slo"] else \
            ppo["slo_attainment"] >= ml["slo_attainment"] and ppo["gpu_hours"] <= ml["gpu_hours"]
        print(f"ppo vs model-level on the held-out split: GPU-hours x{ppo['gpu_hours_vs_model_level']:.3f}, "
              f"energy x{ppo['energy_vs_model_level']:.3f}, attainment {ppo['slo_attainment']:.4f} vs "
              f"{ml['slo_attainment']:.4f} -> {'beats' if beats else 'does not beat'} model-level")
        Path(out["checkpoint"], "final_eval.json").write_text(json.dumps(
            {"fidelity": args.final_eval, "controllers": results}, indent=1, default=float) + "\n")
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
