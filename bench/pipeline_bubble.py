#!/usr/bin/env python3
"""Pipeline bubble: how long the first stage waits per step under each schedule,
against the schedule's theoretical bubble, and the step time against one rank.

    .venv/bin/python bench/pipeline_bubble.py [--recipe recipes/tiny-dense.yaml] [--stages 2]
        [--micro 4,8] [--steps 20] [--threads 1]

For each micro-batch count M and schedule (gpipe, 1f1b, interleaved_1f1b with 2
chunks per rank) it runs
`brigade launch -n P -- train` with parallel.pipeline_parallel = P and
trainer.grad_accum_steps = M, and reads metrics.jsonl (rank 0 = stage 0):
pp_wait_seconds (time the stage waited for its neighbour's activations or
gradients) over step_seconds is the measured bubble, printed beside the
theoretical (P - 1) / (V M + P - 1) of equal-cost stages (V = 2 chunks for
interleaved_1f1b, else 1); held counts micro-batches, or chunks when interleaved. One process with the same
recipe and M micro-batches gives the unpipelined step time. Medians over steps 4..
"""

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args, ranks, micro, schedule, run_dir):
    cmd = [str(REPO / "build" / "brigade")]
    if ranks > 1:
        cmd += ["launch", "-n", str(ranks), "--"]
    cmd += ["train", args.recipe, "--run-dir", str(run_dir), "--set", f"trainer.max_steps={args.steps}",
            "--set", "trainer.warmup_steps=2", "--set", "trainer.log_every=1", "--set", "trainer.eval_every=0",
            "--set", "trainer.checkpoint_every=0", "--set", f"trainer.threads={args.threads}",
            "--set", f"trainer.grad_accum_steps={micro}"]
    if ranks > 1:
        cmd += ["--set", f"parallel.pipeline_parallel={ranks}", "--set", f"parallel.pp_schedule={schedule}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    return [l for l in lines if "step_seconds" in l and l["step"] > 3]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-dense.yaml"))
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--micro", default="4,8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    p = args.stages
    print(f"{Path(args.recipe).name}, {p} stages x {args.threads} thread(s), {args.steps} steps (medians over steps 4..)")
    print("| M | schedule | step ms | 1 rank step ms | stage-0 wait ms | measured bubble | theoretical (P-1)/(VM+P-1) | held |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for micro in [int(m) for m in args.micro.split(",")]:
            one = run(args, 1, micro, "", Path(tmp) / f"one{micro}")
            t1 = statistics.median(l["step_seconds"] for l in one)
            for schedule in ["gpipe", "1f1b", "interleaved_1f1b"]:
                chunks = 2 if schedule == "interleaved_1f1b" else 1
                lines = run(args, p, micro, schedule, Path(tmp) / f"{schedule}{micro}")
                step = statistics.median(l["step_seconds"] for l in lines)
                wait = statistics.median(l["pp_wait_seconds"] for l in lines)
                held = max(l["pp_in_flight"] for l in lines)
                print(f"| {micro} | {schedule} | {step * 1000:.0f} | {t1 * 1000:.0f} | {wait * 1000:.0f} | "
                      f"{wait / step:.2f} | {(p - 1) / (chunks * micro + p - 1):.2f} | {held} |")


if __name__ == "__main__":
    main()
