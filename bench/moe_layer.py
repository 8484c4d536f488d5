#!/usr/bin/env python3
"""brigade's MoE layer against transformers' DeepSeek-V3 MoE block, forward+backward.

    .venv/bin/python bench/moe_layer.py [--hidden 512] [--experts 64] [--top-k 6]
        [--shared 2] [--expert-ff 128] [--groups 8] [--topk-group 4]
        [--batch 4] [--seq 512] [--threads 2] [--rounds 7] [--iters 3]

Writes one set of random weights, an input and an output gradient, starts
`build/bench/bench_moe_layer` on them (brigade's MoELayer in C++) and builds
transformers' DeepseekV3MoE in this process from the same config and weights.
Each round times one window of each side, in an order that flips every round, on
the same thread count: forward + backward (input and all weight gradients). The
slow per-token reference (moe/reference.h) is timed on a few tokens. It checks
that both sides give the same output first, then prints the median tokens/s of
each side and the median within-round ratio. See bench/README.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

REPO = Path(__file__).resolve().parent.parent
TARGET = 2.0  # the target: brigade tokens/s over transformers tokens/s on CPU


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--shared", type=int, default=2)
    ap.add_argument("--expert-ff", type=int, default=128)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--topk-group", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3, help="passes per timing window")
    ap.add_argument("--reference-tokens", type=int, default=32)
    ap.add_argument("--binary", default=str(REPO / "build" / "bench" / "bench_moe_layer"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    meta = {
        "hidden_size": str(args.hidden),
        "moe_intermediate_size": str(args.expert_ff),
        "n_routed_experts": str(args.experts),
        "num_experts_per_tok": str(args.top_k),
        "n_shared_experts": str(args.shared),
        "n_group": str(args.groups),
        "topk_group": str(args.topk_group),
        "norm_topk_prob": "true",
        "routed_scaling_factor": "2.5",
    }
    config = DeepseekV3Config(
        hidden_size=args.hidden, moe_intermediate_size=args.expert_ff, n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k, n_shared_experts=args.shared, n_group=args.groups,
        topk_group=args.topk_group, norm_topk_prob=True, routed_scaling_factor=2.5, hidden_act="silu")
    block = DeepseekV3MoE(config).train()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
        block.gate.e_score_correction_bias.uniform_(0.0, 0.01)
    x = torch.randn(args.batch, args.seq, args.hidden)
    g = torch.randn_like(x)
    tensors = {k: v.detach().contiguous() for k, v in block.state_dict().items()}
    tensors["x"], tensors["g"] = x, g

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "moe.safetensors")
        save_file(tensors, weights, metadata=meta)
        proc = subprocess.Popen([args.binary, "--weights", weights, "--threads", str(args.threads)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

        def ask(line):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline()
            if not answer:
                sys.exit(f"bench_moe_layer exited (code {proc.wait()}) on '{line}'")
            return json.loads(answer)

        ready = json.loads(proc.stdout.readline())
        assert ready.get("ready"), ready

        # Same output on both sides before any timing.
        out = os.path.join(tmp, "y.safetensors")
        ask(f"output {out}")
        with torch.no_grad():
            hf_y = block(x)
        diff = (load_file(out)["y"] - hf_y).abs().max().item()
        print(f"output parity: max abs diff {diff:.2e} (max |y| {hf_y.abs().max().item():.3f})")
        if diff > 1e-4:
            sys.exit("outputs differ: the comparison would be meaningless")

        xg = x.clone().requires_grad_(True)

        def hf_window(iters):
            start = time.perf_counter()
            for _ in range(iters):
                y = block(xg)
                y.backward(g)
                block.zero_grad(set_to_none=True)
                xg.grad = None
            return time.perf_counter() - start

        hf_window(2)  # warm-up
        tokens = args.batch * args.seq
        ours, theirs, ratios = [], [], []
        for r in range(args.rounds):
            first_ours = r % 2 == 0
            for side in ((0, 1) if first_ours else (1, 0)):
                if side == 0:
                    a = ask(f"layer {args.iters}")
                    b_tps = a["tokens"] / a["seconds"]
                else:
                    h_tps = tokens * args.iters / hf_window(args.iters)
            ours.append(b_tps)
            theirs.append(h_tps)
            ratios.append(b_tps / h_tps)
            print(f"round {r + 1}: brigade {b_tps:,.0f} tok/s, transformers {h_tps:,.0f} tok/s, ratio {b_tps / h_tps:.2f}")

        ref = [ask(f"reference {args.reference_tokens}") for _ in range(3)]
        ref_tps = statistics.median(a["tokens"] / a["seconds"] for a in ref)
        proc.stdin.close()
        proc.wait()

    b, h = statistics.median(ours), statistics.median(theirs)
    shape = (f"hidden {args.hidden}, {args.experts} experts (ff {args.expert_ff}), top-{args.top_k}, "
             f"{args.shared} shared, groups {args.groups}/{args.topk_group}, {tokens} tokens, {args.threads} threads")
    print(f"\nMoE layer forward+backward, {shape}")
    print("| implementation | tokens/s (median) | brigade / it |")
    print("|---|---|---|")
    print(f"| brigade MoELayer (C++) | {b:,.0f} | 1.00 |")
    print(f"| transformers DeepseekV3MoE (eager) | {h:,.0f} | {statistics.median(ratios):.2f} (median of rounds) |")
    print(f"| slow per-token reference (C++, {args.reference_tokens} tokens) | {ref_tps:,.1f} | {b / ref_tps:,.0f} |")
    verdict = "meets" if statistics.median(ratios) >= TARGET else "MISSES"
    print(f"target brigade/transformers >= {TARGET}: {verdict}")


if __name__ == "__main__":
    main()
