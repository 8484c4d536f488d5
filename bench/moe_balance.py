#!/usr/bin/env python3
"""Expert load balance on tiny-moe: aux-loss-free bias update on versus off.

    .venv/bin/python bench/moe_balance.py [--recipe recipes/tiny-moe.yaml] [--set k=v ...]

Trains the recipe twice with `build/brigade train` (log_every 1): as shipped
(bias_update_rate from the recipe) and with model.moe.bias_update_rate=0. For
each MoE layer it prints max/mean expert load over the last 20% of steps (the
mean of the per-step values and the worst step) and the final eval loss.
The issue's target: mean max/mean <= 1.3 with the update on.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.3


def train(recipe, overrides, run_dir):
    cmd = [str(REPO / "build" / "brigade"), "train", recipe, "--run-dir", str(run_dir),
           "--set", "trainer.log_every=1"]
    for o in overrides:
        cmd += ["--set", o]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    steps = [l for l in lines if "moe_load_max_over_mean" in l]
    evals = [l for l in lines if "eval_loss" in l]
    tail = steps[int(len(steps) * 0.8):]
    layers = len(tail[0]["moe_load_max_over_mean"])
    per_layer = []
    for i in range(layers):
        values = [l["moe_load_max_over_mean"][i] for l in tail]
        per_layer.append((statistics.mean(values), max(values)))
    return per_layer, evals[-1]["eval_loss"], len(tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-moe.yaml"))
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        on, on_loss, n = train(args.recipe, args.overrides, Path(tmp) / "on")
        off, off_loss, _ = train(args.recipe, args.overrides + ["model.moe.bias_update_rate=0"], Path(tmp) / "off")
    print(f"max/mean expert load over the last {n} steps of {Path(args.recipe).name} (mean over steps / worst step)")
    print("| MoE layer | bias update on | bias update off (gamma = 0) |")
    print("|---|---|---|")
    for i, (a, b) in enumerate(zip(on, off)):
        print(f"| {i + 1} | {a[0]:.3f} / {a[1]:.3f} | {b[0]:.3f} / {b[1]:.3f} |")
    print(f"| final eval loss | {on_loss:.4f} | {off_loss:.4f} |")
    worst = max(a[0] for a in on)
    print(f"target mean max/mean <= {TARGET} with the update on: {'meets' if worst <= TARGET else 'MISSES'} ({worst:.3f})")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
