"""Plot fixed-budget attainment-vs-rate curves from saved evaluation JSONs.

Reads the ``fixed_budget.controllers.*.tried`` points of ``python -m agents.evaluate
--budget-gpus N --budget-grid LO,HI,STEP --json FILE`` outputs (one curve per controller and
file, labelled with the file's fill mode and, for ppo, the checkpoint folder's name: from the
JSON's ``checkpoint`` field, or for files written before evaluate recorded it (session 12),
``ppo-lean`` / ``ppo-budget24`` when the file name says ``lean`` / ``budget24`` and
``ppo-default`` otherwise) and, optionally, every rate of a
``bench/pack_frontier.py --json`` sweep for one fixed plan, and writes one PNG. No simulation
runs here; the numbers are the files'.

    python bench/budget_curves.py docs/results/fixed_budget_grid_*.json \
        --frontier docs/results/pack_frontier_test_session11.json --plan 16x16,7,10 \
        --extra 1.0:1.0,1.3:1.0,1.5:0.9992,1.6:0.9989,1.65:0.9955,1.75:0.9923 \
        --out docs/results/budget_curve.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.plots import plot_budget_curves  # noqa: E402


def checkpoint_name(data: dict, path: Path) -> str:
    """The ppo checkpoint an evaluation JSON scored (see the module doc for older files)."""
    if data.get("checkpoint"):
        return Path(data["checkpoint"]).name
    for tag in ("lean", "budget24"):
        if tag in path.name:
            return f"ppo-{tag}"
    return "ppo-default"


def curves_from(paths: list[Path]) -> dict[str, list[dict[str, float]]]:
    """``{"controller (checkpoint), mode": points}`` from evaluation JSONs with a ``fixed_budget`` block;
    files with the same label (one grid run in two ranges) make one curve, sorted by rate."""
    out: dict[str, list[dict[str, float]]] = {}
    for p in paths:
        data = json.loads(p.read_text())
        fb = data.get("fixed_budget")
        if not fb:
            raise SystemExit(f"{p}: no fixed_budget block (run agents.evaluate with --budget-gpus)")
        mode = f"filled ({fb['fill']})" if fb.get("fill") else "as deployed"
        ckpt = checkpoint_name(data, p)
        for name, res in fb["controllers"].items():
            label = f"{name} ({ckpt}), {mode}" if name == "ppo" else f"{name}, {mode}"
            pts = out.setdefault(label, [])   # files of one label (a grid run in two ranges) extend one curve
            pts.extend({"k": float(t["k"]), "attainment": float(t["attainment"])} for t in res["tried"])
            pts.sort(key=lambda q: q["k"])
    return out


def frontier_points(path: Path, plan: str) -> list[dict[str, float]]:
    """Every rate of a pack_frontier JSON at which the plan ``ATTNxBATCH,PROJ,MLP`` was run."""
    attn, proj, mlp = plan.split(",")
    a, b = (int(x) for x in attn.split("x"))
    want = (a, b, int(proj), int(mlp))
    data = json.loads(path.read_text())["by_rate_mult"]
    return [{"k": float(k), "attainment": float(r["attainment"])} for k, rows in data.items() for r in rows
            if (r["attn"], r["attn_batch"], r["proj"], r["mlp"]) == want]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsons", nargs="+", type=Path)
    ap.add_argument("--frontier", type=Path, default=None, help="pack_frontier sweep JSON (by_rate_mult)")
    ap.add_argument("--plan", default="16x16,7,10", help="the fixed plan to draw from --frontier: ATTNxBATCH,PROJ,MLP")
    ap.add_argument("--extra", default="", help="more K:ATTAINMENT points of that plan, comma-separated")
    ap.add_argument("--budget-gpus", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path("budget_curve.png"))
    a = ap.parse_args()
    curves = curves_from(a.jsons)
    if a.frontier is not None:
        pts = frontier_points(a.frontier, a.plan)
        for item in filter(None, a.extra.split(",")):
            k, att = item.split(":")
            pts.append({"k": float(k), "attainment": float(att)})
        curves[f"fixed pack plan {a.plan} (hindsight)"] = pts
    print(plot_budget_curves(curves, a.out, title=f"{a.budget_gpus} GPUs, test split: attainment against rate"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
