#!/usr/bin/env python3
"""ZeRO stages: step time and peak memory per rank for plain data parallelism and
ZeRO-1, 2 and 3, the same recipe, ranks and per-rank batch.

    .venv/bin/python bench/zero_stages.py [--recipe recipes/small-dense.yaml] [--ranks 2]
        [--steps 12] [--threads 1] [--micro-batch 2] [--stages 0,1,2,3] [--set KEY=VALUE ...]

Runs `brigade launch -n N -- train` once per stage (parallel.zero_stage) and
prints, from the same invocation, each stage's median step time (steps after the
first 2), its ratio to plain data parallelism, every rank's peak resident memory
(run_dir/memory.json: getrusage's max RSS over the training steps, before the
final checkpoint, which includes LibTorch itself; glibc's mmap threshold is fixed at
64 KiB so freed tensors leave RSS), and
the peak of the bytes malloc holds for live allocations (sampled after each
forward, backward and update: what the tensors need, without LibTorch's code and
glibc's kept free memory), and what each stage saves against stage 0 on both
measures (the largest rank's); then the training peak (the live heap above what
was live before training) beside `brigade plan`'s prediction for the layout.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args, stage, run_dir):
    cmd = [str(REPO / "build" / "brigade"), "launch", "-n", str(args.ranks), "--", "train", args.recipe,
           "--run-dir", str(run_dir), "--set", f"trainer.max_steps={args.steps}", "--set", "trainer.warmup_steps=2", "--set", "trainer.log_every=1",
           "--set", "trainer.eval_every=0", "--set", "trainer.checkpoint_every=0",
           "--set", f"trainer.threads={args.threads}", "--set", f"trainer.micro_batch_size={args.micro_batch}",
           "--set", f"parallel.zero_stage={stage}"]
    for setting in args.set:
        cmd += ["--set", setting]
    # Large blocks mmapped and returned to the system when freed, so that RSS follows
    # what is alive rather than glibc's heap high-water mark.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    lines = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    steps = [l["step_seconds"] for l in lines if "step_seconds" in l and l["step"] > 2]
    memory = json.loads((run_dir / "memory.json").read_text())
    # What training held (live heap above the start) and what `brigade plan` predicted.
    return (statistics.median(steps), memory["peak_rss_mib"], memory["peak_live_heap_mib"],
            memory.get("peak_training_mib", []), memory.get("planned_mib"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "small-dense.yaml"))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--set", action="append", default=[], help="a recipe override for every run (e.g. model.vocab_size=32768)")
    args = ap.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            results[stage] = run(args, stage, Path(tmp) / f"zero{stage}")
    base_time = results[stages[0]][0]
    base_mem = max(results[stages[0]][1])
    base_live = max(results[stages[0]][2])
    overrides = "".join(f" --set {s}" for s in args.set)
    print(f"{Path(args.recipe).name}{overrides}, {args.ranks} ranks x {args.threads} thread(s), micro batch {args.micro_batch}, "
          f"{args.steps} steps "
          f"(median over steps 3..); peak RSS per rank from run_dir/memory.json")
    print("| ZeRO stage | median step ms | ratio to stage " + str(stages[0]) +
          " | peak RSS per rank MiB | saved MiB | peak live heap per rank MiB | saved MiB"
          " | training peak (largest rank) MiB | brigade plan MiB | measured / plan |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for stage in stages:
        t, mem, live, training, planned = results[stage]
        most = max(training) if training else float("nan")
        plan = f"{planned:.0f} | {most / planned:.2f}" if planned else "n/a | n/a"
        print(f"| {stage} | {t * 1000:.0f} | {t / base_time:.2f} | {', '.join(f'{m:.0f}' for m in mem)} | "
              f"{base_mem - max(mem):.0f} | {', '.join(f'{m:.0f}' for m in live)} | {base_live - max(live):.0f} | "
              f"{most:.0f} | {plan} |")

if __name__ == "__main__":
    main()
