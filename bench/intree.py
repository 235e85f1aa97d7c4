"""Run a bench's measurement in a fresh process against one checkout's code.

The A/B benches (env_speed, env_equivalence, clone_speed, plan_cost) time or compare two trees
(this one and ``--baseline DIR``) in separate processes, so neither inherits the other's caches
or compiled code, and the tree under test comes first on ``sys.path`` while the bench module is
this tree's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def run_in_tree(root: Path, module: str, call: str, what: str, env: dict[str, str] | None = None) -> object:
    """``print(json.dumps(<module>.<call>))`` in a fresh Python with ``root`` first on sys.path and
    bench/ second, in ``root``; returns the printed value. ``env``: variables added to this
    process's environment. Raises RuntimeError naming ``what`` and ``root`` with the child's stderr
    when it fails."""
    code = (f"import sys, json; sys.path.insert(0, {str(root)!r}); sys.path.insert(1, {str(BENCH)!r}); "
            f"import {module}; print(json.dumps({module}.{call}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False,
                         env=dict(os.environ, **env) if env else None)
    if res.returncode != 0:
        raise RuntimeError(f"{what} in {root} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
