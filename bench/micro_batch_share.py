"""How often the simulators' adaptive micro-batch rule cuts an iteration, by kind.

    python bench/micro_batch_share.py --split val --controller ppo --checkpoint checkpoints/ppo-default

Runs one controller over a split in the reference simulator and, for every iteration between
disaggregated pools (a unit whose groups are not all on its own GPUs), times it at each allowed
micro-batch count with the step model and picks with its own rule (``StepModel.pick``: the
fastest, ties to fewer, or the fewest within the scenario's slack), counting the winners
separately for iterations carrying prompt tokens and decode-only ones. The runtime's measured rule (runtime/microbatch.py) is meant to make the same choice;
this is what it is compared with (docs/RUNTIME.md "Micro-batches").

The contention slowdowns used for the count are the step model's of its last evaluation (the
reference reuses timings of equal iterations), so a count can differ from the iteration's
own where packed processes changed their busy shares in between; the simulation itself is
not changed.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agents.registry as registry  # noqa: E402
from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from agents.evaluate import run_timeline  # noqa: E402
from envs import SPLITS  # noqa: E402
from envs.reference import ReferenceSimulator  # noqa: E402


def count(split: str, controller: str, checkpoint: str | None) -> dict[str, dict[int, int]]:
    """{kind: {micro-batch count: iterations}} over one reference run."""
    counts: dict[str, collections.Counter] = {"prefill": collections.Counter(), "decode": collections.Counter()}
    timed = ReferenceSimulator._time

    def _time(self, n_dec, ctx_dec, p_tok, ctx_pre, n_pre):  # noqa: ANN001, ANN202
        out = timed(self, n_dec, ctx_dec, p_tok, ctx_pre, n_pre)
        sm = self.sm
        if sm.hops and len(sm.m_choices) > 1:
            tokens = n_dec + p_tok
            slow = sm._slow_cache[1] if sm._has_peers else None
            tt, ts = max(self._tot_tokens, tokens), max(self._tot_seqs, n_dec + n_pre)
            each = [sm._layers(m, n_dec, ctx_dec, p_tok, ctx_pre, n_pre, tokens, tt, ts, slow) for m in sm.m_choices]
            chosen = sm.pick(each)  # the step model's own rule (slack included)
            m = sm.m_choices[next(i for i, r in enumerate(each) if r is chosen)]
            counts["prefill" if p_tok > 0 else "decode"][m] += 1
        return out

    ReferenceSimulator._time = _time
    try:
        sc = load_scenario()
        trace = load_split(sc, split)
        sim = make_sim(sc, trace, "reference", 0)
        ctl, plan0 = registry.make_controller(controller, sc, slo=sim.slo, trace=trace, checkpoint=checkpoint)
        run_timeline(sim, ctl, plan0)
    finally:
        ReferenceSimulator._time = timed
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="val", choices=SPLITS)
    ap.add_argument("--controller", default="ppo")
    ap.add_argument("--checkpoint", default="checkpoints/ppo-default")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    counts = count(args.split, args.controller, args.checkpoint if args.controller == "ppo" else None)
    for kind, c in counts.items():
        n = sum(c.values())
        shares = ", ".join(f"{m}: {v / max(n, 1):.1%}" for m, v in c.items())
        print(f"{kind}: {n} iterations between pools; micro-batches {shares}")
    if args.json is not None:
        args.json.write_text(json.dumps({"split": args.split, "controller": args.controller, "counts": counts}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
