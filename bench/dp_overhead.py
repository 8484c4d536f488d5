#!/usr/bin/env python3
"""Data-parallel overhead: step time at N ranks against 1 rank, same per-rank batch.

    .venv/bin/python bench/dp_overhead.py [--recipe recipes/tiny-dense.yaml] [--ranks 2]
        [--steps 60] [--threads 1] [--bucket-mb 25] [--zero]

Runs `brigade train` once alone and once under `brigade launch -n N` with the same
micro-batch per rank and `trainer.threads` per rank (each rank gets its own core),
and prints from the same invocation the median step time of both, their ratio,
and how much of the gradient all-reduce was hidden behind backward: the buckets
that started during backward, and the median time the step still waited for
communication after backward (dp_wait_seconds). The first 10 steps are skipped
(warm-up). --zero: the multi-rank run uses ZeRO-1 (parallel.zero_stage=1:
reduce-scatter, sharded AdamW, all-gather) instead of all-reduce.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args, ranks, run_dir):
    cmd = [str(REPO / "build" / "brigade")]
    if ranks > 1:
        cmd += ["launch", "-n", str(ranks), "--"]
    extra = ["--set", "parallel.zero_stage=1"] if ranks > 1 and args.zero else []
    cmd += ["train", args.recipe, "--run-dir", str(run_dir), "--set", f"trainer.max_steps={args.steps}",
            "--set", "trainer.log_every=1", "--set", "trainer.eval_every=0", "--set", "trainer.checkpoint_every=0",
            "--set", f"trainer.threads={args.threads}", "--set", f"parallel.bucket_mb={args.bucket_mb}"] + extra
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    return [l for l in lines if "step_seconds" in l and l["step"] > 10]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-dense.yaml"))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--zero", action="store_true", help="ZeRO-1 in the multi-rank run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args, 1, Path(tmp) / "one")
        many = run(args, args.ranks, Path(tmp) / "many")
    t1 = statistics.median(l["step_seconds"] for l in one)
    tn = statistics.median(l["step_seconds"] for l in many)
    wait = statistics.median(l["dp_wait_seconds"] for l in many)
    buckets = many[-1]["dp_buckets"]
    early = statistics.median(l["dp_buckets_in_backward"] for l in many)
    mode = "ZeRO-1 (reduce-scatter + all-gather)" if args.zero else "all-reduce"
    print(f"{Path(args.recipe).name}, {args.steps} steps (median over steps 11..), {args.threads} thread(s) per rank, {mode}")
    print("| ranks | median step ms | ratio to 1 rank | buckets (started in backward) | wait after backward ms |")
    print("|---|---|---|---|---|")
    print(f"| 1 | {1e3 * t1:.1f} | 1.00 | — | — |")
    print(f"| {args.ranks} | {1e3 * tn:.1f} | {tn / t1:.2f} | {buckets} ({early:.0f}) | {1e3 * wait:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
