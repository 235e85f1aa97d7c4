"""CPU instructions per fast-env step, counted by valgrind, against another checkout.

Usage: ``python bench/env_instructions.py --baseline DIR [--streams random,train,keep] [--steps 300] [--gc]
[--warm] [--json]``

On a shared, noisy host an env-level A/B (bench/env_speed.py) cannot resolve a change of a few
per cent: rounds of one tree spread by 30 % or more. Instructions executed are not noisy.
This bench runs the same action stream through ``env.step`` of both trees under ``valgrind
--tool=callgrind`` (both at once, one per core) and counts only what runs inside ``env.step``:
the steps are driven through ``map()``, and callgrind collects only inside CPython's
``map_next`` (``--toggle-collect``), so imports, set-up and action sampling are left out. The
streams are bench/env_speed.py's: ``random`` (uniformly random actions), ``train`` (train.py's
early stream: random replica counts under the frozen layout, embed and head frozen too; its actions are drawn once by a
plain run of this tree, saved, and replayed by both trees) and ``keep`` (the plan kept). With
``--warm`` each tree first runs the stream once uncounted and then replays it from the same
reset (the caches of placements and step models full, as late in a training run).

Python's cyclic collector is off while the steps are counted (``--gc`` leaves it on): a
collection runs when allocations cross a threshold, so a change that allocates a little more or
less moves collections (millions of instructions each) in or out of the window, which swamps
the per-step difference being measured (bench/env_speed.py ``--gc-share`` measures the
collector's share of a step). Two runs of one tree counted the same (1.261 M instructions a step
on the kept plan, 300 steps, collector on). One-off costs inside the window count too and read as a per-step
change once spread over the steps, e.g. a numba function's first call loading its compiled code
(some 4 M instructions; session 26 met one: docs/SIMULATOR.md "Speed", log).

It prints instructions per step for each tree and their ratio (baseline / current: > 1 means the
current tree executes fewer). Instructions are not time: cache misses and branch mispredictions
are not counted, and numba-compiled code counts like any other. Each run takes minutes
(valgrind runs Python some 50x slower; start-up under it alone is about five minutes here).
Needs ``valgrind`` on PATH and a CPython with its symbol table (``map_next``); PYTHONHASHSEED is
fixed to 0 in both runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STREAMS = ("random", "train", "keep")


def drive(stream: str, steps: int, actions: str | None = None, warm: bool = False,
          record: str | None = None, gc_on: bool = False) -> None:
    """Run ``steps`` env steps of ``stream`` (in the tree first on sys.path), the steps inside
    ``map()``, the cyclic collector off unless ``gc_on``. ``actions``: a .npy of actions to replay
    instead; ``record``: only draw the actions (stepping this tree's env) and save them there."""
    import gc

    import numpy as np

    import env_speed

    st = env_speed._Stream(stream, 0)  # bench/env_speed.py's streams, on a fresh env
    stepper = st.stepper
    if actions is not None:
        acts = list(np.load(actions))
    else:
        acts = []
        for _ in range(steps):
            acts.append(st.action())
            if stream == "train":  # its actions depend on the plan the env has reached
                st.step(acts[-1])
        if record is not None:
            np.save(record, np.asarray(acts))
            return

    def one(a) -> None:  # noqa: ANN001
        _, _, term, trunc, _ = stepper.step(a)
        if term or trunc:
            stepper.reset()

    if warm:
        stepper.reset(seed=0)
        for a in acts:  # uncounted: the same stream fills the caches
            one(a)
    stepper.reset(seed=0)
    if not gc_on:
        gc.collect()
        gc.disable()
    list(map(one, acts))  # counted: callgrind collects inside map_next only
    gc.enable()


def _code(root: Path, call: str) -> str:
    return (f"import sys; sys.path.insert(0, {str(root)!r}); sys.path.insert(1, {str(ROOT / 'bench')!r}); "
            f"import env_instructions; env_instructions.{call}")


def _start(root: Path, call: str, out: Path) -> subprocess.Popen:
    cmd = ["valgrind", "--tool=callgrind", "--toggle-collect=map_next", f"--callgrind-out-file={out}",
           sys.executable, "-c", _code(root, call)]
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONHASHSEED="0"))


def _collected(proc: subprocess.Popen, what: str) -> int:
    text = proc.communicate()[0]
    m = re.search(r"Collected : (\d+)", text)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"{what} failed (rc {proc.returncode}):\n{text[-2000:]}")
    return int(m.group(1))


def measure(stream: str, steps: int, baseline: Path, warm: bool, tmp: Path, gc_on: bool = False) -> dict:
    """Instructions per step of both trees on one stream (both runs at once)."""
    actions = None
    if stream == "train":
        actions = tmp / "train_actions.npy"
        code = _code(ROOT, f"drive('train', {steps}, record={str(actions)!r})")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    call = f"drive({stream!r}, {steps}, actions={str(actions) if actions else None!r}, warm={warm}, gc_on={gc_on})"
    procs = {name: _start(root, call, tmp / f"{name}.{stream}.out")
             for name, root in (("current", ROOT), ("baseline", baseline))}
    counts = {name: _collected(p, f"{stream} stream in the {name} tree") for name, p in procs.items()}
    per = {name: c / steps for name, c in counts.items()}
    return {"steps": steps, "current_per_step": per["current"], "baseline_per_step": per["baseline"],
            "ratio": per["baseline"] / per["current"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="another checkout (e.g. git archive HEAD unpacked)")
    p.add_argument("--streams", default="random,train,keep", help=f"comma-separated, of {', '.join(STREAMS)}")
    p.add_argument("--steps", type=int, default=300, help="counted env steps per stream")
    p.add_argument("--warm", action="store_true", help="run the stream once uncounted first (caches full)")
    p.add_argument("--gc", action="store_true",
                   help="leave the cyclic collector on while counting (see the module doc)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    streams = [s.strip() for s in a.streams.split(",") if s.strip()]
    bad = [s for s in streams if s not in STREAMS]
    if bad:
        p.error(f"unknown stream(s) {bad}; choose from {list(STREAMS)}")
    if shutil.which("valgrind") is None:
        p.error("valgrind is not on PATH")
    if not (a.baseline / "envs").is_dir():
        p.error(f"--baseline {a.baseline} has no envs/ folder")
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for s in streams:
            res[s] = measure(s, a.steps, a.baseline.resolve(), a.warm, Path(d), a.gc)
            if not a.json:
                r = res[s]
                print(f"{s:7s} {a.steps} steps{' (warm)' if a.warm else ''}: current "
                      f"{r['current_per_step'] / 1e6:8.3f} M instructions/step, baseline "
                      f"{r['baseline_per_step'] / 1e6:8.3f} M: ratio {r['ratio']:.3f}", flush=True)
    if a.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
