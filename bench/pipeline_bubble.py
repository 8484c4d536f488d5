#!/usr/bin/env python3
"""Pipeline bubble: how long the first stage waits per step under each schedule,
against the schedule's theoretical bubble, and the step time against one rank.

    .venv/bin/python bench/pipeline_bubble.py [--recipe recipes/tiny-dense.yaml] [--stages 2]
        [--micro 4,8] [--steps 20] [--threads 1]

For each micro-batch count M and schedule (gpipe, 1f1b, interleaved_1f1b with 2
chunks per rank, and when M >= 2P dualpipev with its zero-bubble W steps and
dualpipev-no-w with parallel.pp_zero_bubble=false) it runs `brigade launch -n P -- train`
with parallel.pipeline_parallel = P and trainer.grad_accum_steps = M, and reads
metrics.jsonl (rank 0 = stage 0): pp_wait_seconds (time the stage waited for its
neighbour's activations or gradients) over step_seconds is the measured bubble,
printed beside the theoretical (P - 1) / (V M + P - 1) of equal-cost stages (V = 2
chunks for interleaved_1f1b, else 1; for dualpipev the bubble its action lists
leave when simulated with forwards of 1 and backwards of 2 time units, a split
backward 1 and its W step 1). Stage 0's
wait misses the time other stages wait for stage 0 (DualPipe-V's rank 0 runs the
embedding and the head), so the step t is also set against t1, one process's step
with the same recipe and M micro-batches: 1 - t1 / (P t) is the share of the P
ranks' time not spent on one process's work (bubble, imbalance and messages
together). held counts micro-batches, or chunks for interleaved_1f1b and
dualpipev. Medians over steps 4..
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
        # "dualpipev-no-w": DualPipe-V with its backwards whole (no zero-bubble W steps).
        name = "dualpipev" if schedule.startswith("dualpipev") else schedule
        cmd += ["--set", f"parallel.pipeline_parallel={ranks}", "--set", f"parallel.pp_schedule={name}",
                "--set", f"parallel.pp_zero_bubble={'false' if schedule == 'dualpipev-no-w' else 'true'}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    return [l for l in lines if "step_seconds" in l and l["step"] > 3]


def dualpipev_actions(p, m, r, zero_bubble):
    """Rank r's (kind, chunk) list under dualpipev (parallel/pipeline.cpp): kind F, B,
    b (a split backward: input gradients only) or W (a split backward's weight part)."""
    out = []
    b = "b" if zero_bubble else "B"
    out += [("F", 0)] * ((p - r - 1) * 2)
    out += [("F", 0), ("F", 1)] * (r + 1)
    out += ([(b, 1), ("W", 1), ("F", 1)] if zero_bubble else [("B", 1), ("F", 1)]) * (p - r - 1)
    out += [("F", 0), ("B", 1), ("F", 1), ("B", 0)] * (m - 2 * p + r + 1)
    out += [("B", 1), ("F", 1), ("B", 0)] * (p - r - 1)
    split = False
    for i in range(r + 1):
        if i == (r + 1) // 2 and r % 2 == 1:
            split = zero_bubble
        out.append(("b" if split else "B", 1))
        if i == (r + 1) // 2 and r % 2 == 0:
            split = zero_bubble
        out.append(("b" if split else "B", 0))
    out += ([("W", 0), (b, 0)] if zero_bubble else [("B", 0)]) * (p - r - 1)
    out += [("W", 0)] * ((r + 1) if zero_bubble else 0)
    return out


def simulated_dualpipev_bubble(p, m, zero_bubble):
    """Every rank's actions run together (forward 1, backward 2 time units per chunk,
    a split backward 1 and its W step 1; a forward needs the previous chunk's, a
    backward the next chunk's): idle share."""
    lists = [dualpipev_actions(p, m, r, zero_bubble) for r in range(p)]
    chunk = lambda r, v: r if v == 0 else 2 * p - 1 - r
    done, pos, clock = {}, [0] * p, [0] * p
    counters = [[{"F": 0, "B": 0}, {"F": 0, "B": 0}] for _ in range(p)]
    while any(pos[r] < len(lists[r]) for r in range(p)):
        for r in range(p):
            if pos[r] == len(lists[r]):
                continue
            kind, v = lists[r][pos[r]]
            if kind == "W":
                clock[r] += 1
                pos[r] += 1
                continue
            cost = {"F": 1, "B": 2, "b": 1}[kind]
            kind = "B" if kind == "b" else kind
            c, micro = chunk(r, v), counters[r][v][kind]
            need = (("F", micro, c - 1) if c > 0 else None) if kind == "F" else \
                (("B", micro, c + 1) if c < 2 * p - 1 else ("F", micro, c))
            if need is not None and need not in done:
                continue
            clock[r] = max(clock[r], done[need] if need else 0) + cost
            done[(kind, micro, c)] = clock[r]
            counters[r][v][kind] += 1
            pos[r] += 1
    span = max(clock)
    return (span - 6 * m) / span


def theory(schedule, p, micro, chunks):
    if schedule.startswith("dualpipev"):
        return simulated_dualpipev_bubble(p, micro, zero_bubble=schedule == "dualpipev")
    return (p - 1) / (chunks * micro + p - 1)


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
    print("| M | schedule | step ms | 1 rank step ms | stage-0 wait ms | measured bubble | theoretical (P-1)/(VM+P-1) | 1 - t1/(P t) | held |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for micro in [int(m) for m in args.micro.split(",")]:
            one = run(args, 1, micro, "", Path(tmp) / f"one{micro}")
            t1 = statistics.median(l["step_seconds"] for l in one)
            for schedule in ["gpipe", "1f1b", "interleaved_1f1b", "dualpipev-no-w", "dualpipev"]:
                if schedule.startswith("dualpipev") and micro < 2 * p:
                    continue
                chunks = 2 if schedule == "interleaved_1f1b" else 1
                lines = run(args, p, micro, schedule, Path(tmp) / f"{schedule}{micro}")
                step = statistics.median(l["step_seconds"] for l in lines)
                wait = statistics.median(l["pp_wait_seconds"] for l in lines)
                held = max(l["pp_in_flight"] for l in lines)
                print(f"| {micro} | {schedule} | {step * 1000:.0f} | {t1 * 1000:.0f} | {wait * 1000:.0f} | "
                      f"{wait / step:.2f} | {theory(schedule, p, micro, chunks):.2f} | {1 - t1 / (p * step):.2f} | {held} |")


if __name__ == "__main__":
    main()
