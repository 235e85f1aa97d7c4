"""Sweep operator-queueing settings on one trace split in the reference simulator.

Each setting is the shipped ``agents/configs/controllers.yaml`` block with the given keys
changed; prints attainment, average GPUs and energy per setting (the tuning tables of
docs/RESULTS.md).

    python bench/oq_sweep.py --split trainval '{"peak_window_s": 300}' '{"peak_window_s": 900}'

Units: attainment as a share of requests, GPUs averaged over the run, energy in kWh.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.envtools import load_scenario, load_split, make_sim  # noqa: E402
from agents.evaluate import metrics, run_timeline  # noqa: E402
from agents.registry import load_controller_settings, make_controller  # noqa: E402
from envs import SPLITS  # noqa: E402

TUNABLE = ("operator-queueing", "model-level", "model-level-ongoing")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="trainval", choices=SPLITS)
    ap.add_argument("--controller", default="operator-queueing", choices=TUNABLE)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    ap.add_argument("settings", nargs="+", help='JSON objects of the controller\'s settings, e.g. \'{"peak_window_s": 300}\'')
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    overrides = []
    for text in args.settings:
        try:
            overrides.append(dict(json.loads(text)))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            ap.error(f"setting {text!r} is not a JSON object: {e}")
    sc = load_scenario()
    trace = load_split(sc, args.split)
    base = load_controller_settings()
    rows = []
    for over in overrides:
        settings = {k: dict(v) for k, v in base.items()}
        settings[args.controller].update(over)
        t0 = time.time()
        sim = make_sim(sc, trace, "reference", 0)
        ctl, plan0 = make_controller(args.controller, sc, slo=sim.slo, trace=trace, settings=settings)
        summary, tl = run_timeline(sim, ctl, plan0)
        m = metrics(summary, tl, sc.attainment_target)
        rows.append({"controller": args.controller, "split": args.split, "settings": over,
                     "slo_attainment": m["slo_attainment"], "avg_gpus": m["avg_gpus"], "energy_kwh": m["energy_kwh"]})
        print(f"{json.dumps(over)}: attainment {m['slo_attainment']:.4f}, avg GPUs {m['avg_gpus']:.2f}, "
              f"{m['energy_kwh']:.2f} kWh ({time.time() - t0:.0f} s)", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
