#!/usr/bin/env bash
# Would compiling the fast env's Python object model as it stands make the env fast enough?
#
# Copies HEAD into a temporary folder, applies bench/mypyc_trial.patch there (type annotations
# mypy needs before mypyc compiles the modules: attributes that start as None typed Any, two float
# accumulators started at 0.0, one local declared once, two int counts stored as floats; nothing
# else), compiles the fast env's modules with mypyc into C extensions, checks that the compiled tree
# walks the same trajectories as this checkout (bench/env_equivalence.py, default and training
# world) and times both trees interleaved (bench/env_speed.py --baseline, train.py's stream
# replayed and the shipped policy's). Results: docs/SIMULATOR.md ("Speed": session 28, and session
# 35 on the tree the patch was remade for). The compiled tree is thrown away: nothing here changes
# this checkout.
#
# The patch was remade against 322fb25 (session 35; first made against 71d3c31 in session 28); if
# those lines have moved, git apply names the hunk that failed and the patch needs remaking (the
# same kinds of annotation, wherever mypy reports).
#
# Needs mypy (which ships mypyc) and a C compiler in the active environment:
#   pip install mypy && bash bench/mypyc_trial.sh [ROUNDS]
# Takes about 3 minutes to compile on 2 cores, 4 to compare trajectories, then 2-3 per round.
set -euo pipefail
ROUNDS="${1:-3}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
command -v mypyc >/dev/null || { echo "mypyc_trial: mypyc not found (pip install mypy)" >&2; exit 2; }
command -v "${CC:-cc}" >/dev/null || { echo "mypyc_trial: no C compiler (${CC:-cc})" >&2; exit 2; }
DIR="$(mktemp -d)"
trap 'rm -rf "$DIR"' EXIT
git -C "$HERE" archive HEAD | tar -x -C "$DIR"
cd "$DIR"
git apply "$HERE/bench/mypyc_trial.patch"
MODS="envs/cluster.py envs/world.py envs/base.py envs/fast.py envs/obs.py envs/memo.py envs/reference.py"
mypyc --ignore-missing-imports --follow-imports=silent $MODS >"$DIR/mypyc.log" 2>&1 \
    || { tail -20 "$DIR/mypyc.log" >&2; exit 1; }
ls envs/*.so >/dev/null
echo "== compiled with mypyc: $MODS"
echo "== same trajectories? (compiled tree against $HERE)"
python bench/env_equivalence.py --baseline "$HERE" --steps 1000 --seeds 0,1
python bench/env_equivalence.py --baseline "$HERE" --steps 1000 --seeds 0,1 --training-world
echo "== speed: this run's tree = the compiled copy, baseline = $HERE (Python)"
python bench/env_speed.py --baseline "$HERE" --streams train,trained --replay train --rounds "$ROUNDS" \
    --steps 6000 --warmup 10000 --no-reference
