#!/usr/bin/env python3
"""brigade's MoE layer against transformers' DeepSeek-V3 MoE block, forward+backward.

    .venv/bin/python bench/moe_layer.py [--hidden 512] [--experts 64] [--top-k 6]
        [--shared 2] [--expert-ff 128] [--groups 8] [--topk-group 4]
        [--batch 4] [--seq 512] [--threads 2] [--rounds 7] [--iters 3]
        [--hf-impls eager,grouped_mm[,batched_mm]] [--profile N]

Writes one set of random weights, an input and an output gradient, starts
`build/bench/bench_moe_layer` on them (brigade's MoELayer in C++) and builds
transformers' DeepseekV3MoE in this process from the same config and weights,
once per experts implementation transformers offers ("eager" is the per-expert
loop a standalone block runs; "grouped_mm" is what a full transformers model
picks by default; "batched_mm" is about 100x slower on CPU, so
not timed unless asked). Each round times one window of every contender, in an order
that rotates every round, on the same thread count: forward + backward (input
and all weight gradients). The slow per-token reference (moe/reference.h) is
timed on a few tokens. It checks that all give the same output first, then
prints the median tokens/s of each and the median within-round ratio of brigade
over each. --profile N adds brigade's per-op times over N passes (self time per
pass, top 12 ops). See bench/README.md.
"""

import argparse
import copy
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
    ap.add_argument("--hf-impls", default="eager,grouped_mm",
                    help="transformers experts implementations to time")
    ap.add_argument("--profile", type=int, default=0, help="passes to profile brigade's ops over (0: none)")
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
    blocks = {}
    for impl in args.hf_impls.split(","):
        impl_config = copy.deepcopy(config)
        impl_config._experts_implementation = impl
        blocks[impl] = DeepseekV3MoE(impl_config).train()
        blocks[impl].load_state_dict(tensors)
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

        # Same output everywhere before any timing.
        out = os.path.join(tmp, "y.safetensors")
        ask(f"output {out}")
        ours_y = load_file(out)["y"]
        for impl, b in blocks.items():
            with torch.no_grad():
                hf_y = b(x)
            diff = (ours_y - hf_y).abs().max().item()
            print(f"output parity vs transformers {impl}: max abs diff {diff:.2e} (max |y| {hf_y.abs().max().item():.3f})")
            if diff > 1e-4:
                sys.exit("outputs differ: the comparison would be meaningless")

        xg = x.clone().requires_grad_(True)

        def hf_window(b, iters):
            time.sleep(0.5)  # let the other side's idle OpenMP threads stop spinning
            start = time.perf_counter()
            for _ in range(iters):
                y = b(xg)
                y.backward(g)
                b.zero_grad(set_to_none=True)
                xg.grad = None
            return time.perf_counter() - start

        for b in blocks.values():
            hf_window(b, 2)  # warm-up
        tokens = args.batch * args.seq
        names = ["brigade"] + list(blocks)
        rates = {n: [] for n in names}
        ratios = {n: [] for n in blocks}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            got = {}
            for n in order:
                if n == "brigade":
                    time.sleep(0.5)
                    a = ask(f"layer {args.iters}")
                    got[n] = a["tokens"] / a["seconds"]
                else:
                    got[n] = tokens * args.iters / hf_window(blocks[n], args.iters)
            for n in names:
                rates[n].append(got[n])
            for n in blocks:
                ratios[n].append(got["brigade"] / got[n])
            print(f"round {r + 1}: " + ", ".join(f"{n} {got[n]:,.0f} tok/s" for n in names))

        if args.profile > 0:
            ops = ask(f"profile {args.profile}")["ops"]
            total = sum(o["self_ms"] for o in ops)
            print(f"\nbrigade per-op self time per pass ({args.profile} passes, {total:.1f} ms in LibTorch ops):")
            for o in ops[:12]:
                print(f"  {o['self_ms']:8.2f} ms {100 * o['self_ms'] / total:5.1f}%  {o['calls'] // args.profile:5d} calls  {o['name']}")

        ref = [ask(f"reference {args.reference_tokens}") for _ in range(3)]
        ref_tps = statistics.median(a["tokens"] / a["seconds"] for a in ref)
        proc.stdin.close()
        proc.wait()

    b = statistics.median(rates["brigade"])
    # Matmul FLOPs per token, forward + backward (x3): top_k experts and the shared
    # experts (3 GEMMs each) and the router.
    shared_ff = args.expert_ff * args.shared
    flops = 2 * 3 * (args.top_k * 3 * args.hidden * args.expert_ff + 3 * args.hidden * shared_ff
                     + args.hidden * args.experts)
    a = torch.randn(2048, 2048)
    b2 = torch.randn(2048, 2048)
    a @ b2
    start = time.perf_counter()
    for _ in range(10):
        a @ b2
    peak = 10 * 2 * 2048 ** 3 / (time.perf_counter() - start)
    shape = (f"hidden {args.hidden}, {args.experts} experts (ff {args.expert_ff}), top-{args.top_k}, "
             f"{args.shared} shared, groups {args.groups}/{args.topk_group}, {tokens} tokens, {args.threads} threads")
    print(f"\nMoE layer forward+backward, {shape}, {args.rounds} rounds")
    print(f"{flops / 1e6:.1f} MFLOP per token; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (2048^3, {args.threads} threads)")
    print("| implementation | tokens/s (median) | GFLOP/s | of peak | brigade / it (median of rounds) |")
    print("|---|---|---|---|---|")

    def row(name, tps, ratio):
        print(f"| {name} | {tps:,.1f} | {tps * flops / 1e9:.1f} | {tps * flops / peak:.0%} | {ratio} |")

    row("brigade MoELayer (C++)", b, "1.00")
    for n in blocks:
        row(f"transformers DeepseekV3MoE, experts `{n}`", statistics.median(rates[n]),
            f"{statistics.median(ratios[n]):.2f}")
    row(f"slow per-token reference (C++, {args.reference_tokens} tokens)", ref_tps, f"{b / ref_tps:,.0f}")
    worst = min(statistics.median(v) for v in ratios.values())
    verdict = "meets" if worst >= TARGET else "MISSES"
    print(f"target brigade / transformers >= {TARGET} (against its fastest implementation): {verdict} ({worst:.2f})")


if __name__ == "__main__":
    main()
