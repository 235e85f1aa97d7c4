#!/usr/bin/env bash
# Would compiling the fast env's Python object model as it stands make the env fast enough?
#
# Copies HEAD into a temporary folder, applies bench/mypyc_trial.patch there (type annotations
# mypy needs before mypyc compiles the modules: Optional attributes typed Any, two float
# accumulators started at 0.0, one narrowed local; nothing else), compiles the fast env's modules
# with mypyc into C extensions, checks that the compiled tree walks the same trajectories as this
# checkout (bench/env_equivalence.py) and times both trees interleaved (bench/env_speed.py
# --baseline). Session 28's result is in docs/SIMULATOR.md ("Speed", log). The compiled tree is
# thrown away: nothing here changes this checkout.
#
# The patch was made against 71d3c31; if those lines have moved, git apply names the hunk that
# failed and the patch needs remaking (the same kinds of annotation, wherever mypy reports).
#
# Needs mypy (which ships mypyc) and a C compiler in the active environment:
#   pip install mypy && bash bench/mypyc_trial.sh [ROUNDS]
# Takes about 4 minutes to compile on 2 cores, then a few minutes per round.
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
MODS="envs/cluster.py envs/world.py envs/base.py envs/fast.py envs/obs.py envs/memo.py"
mypyc --ignore-missing-imports --follow-imports=silent $MODS >"$DIR/mypyc.log" 2>&1 \
    || { tail -20 "$DIR/mypyc.log" >&2; exit 1; }
ls envs/*.so >/dev/null
echo "== compiled with mypyc: $MODS"
echo "== same trajectories? (compiled tree against $HERE)"
python bench/env_equivalence.py --baseline "$HERE" --steps 500 --seeds 0,1
echo "== speed: this run's tree = the compiled copy, baseline = $HERE (Python)"
python bench/env_speed.py --baseline "$HERE" --streams keep,train,random --rounds "$ROUNDS" --steps 1000 \
    --no-reference
