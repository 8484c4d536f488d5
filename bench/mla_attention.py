#!/usr/bin/env python3
"""brigade's multi-head latent attention against transformers' DeepseekV3Attention.

    .venv/bin/python bench/mla_attention.py [--hidden 1024] [--heads 16]
        [--q-lora 384] [--kv-lora 256] [--nope 64] [--rope 32] [--v 64]
        [--batch 2] [--seq 512] [--threads 2] [--rounds 7] [--iters 3]
        [--contexts 512,2048] [--decode-iters 32]

Writes one set of random weights, an input and an output gradient, starts
`build/bench/bench_mla_attention` on them (brigade's MLAttention in C++) and builds
transformers' DeepseekV3Attention (sdpa attention, rotate-half RoPE) in this
process from the same config and weights. It checks that both give the same output,
then times forward + backward (input and every weight gradient) in rounds whose
order alternates, on the same thread count, and prints the median tokens/s of each
and the median within-round ratio. Then, from the C++ side alone, one decode step
per sequence against `--contexts` cached positions with brigade's latent cache
(the absorbed form) and with a full per-head K/V cache: values cached per position
and tokens/s. See bench/README.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

REPO = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--q-lora", type=int, default=384, help="0: no query compression (V2-Lite)")
    ap.add_argument("--kv-lora", type=int, default=256)
    ap.add_argument("--nope", type=int, default=64)
    ap.add_argument("--rope", type=int, default=32)
    ap.add_argument("--v", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--decode-iters", type=int, default=32)
    ap.add_argument("--binary", default=str(REPO / "build" / "bench" / "bench_mla_attention"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = DeepseekV3Config(
        hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        q_lora_rank=args.q_lora or None, kv_lora_rank=args.kv_lora, qk_nope_head_dim=args.nope,
        qk_rope_head_dim=args.rope, v_head_dim=args.v, rope_interleave=False, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False)
    config._attn_implementation = "sdpa"
    hf = DeepseekV3Attention(config, layer_idx=0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)
    rotary = DeepseekV3RotaryEmbedding(config)
    x = torch.randn(args.batch, args.seq, args.hidden)
    g = torch.randn_like(x)
    positions = torch.arange(args.seq).unsqueeze(0).expand(args.batch, -1)
    cos, sin = rotary(x, positions)

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "w.safetensors")
        tensors = {k: v.detach().contiguous() for k, v in hf.named_parameters()}
        tensors.update(x=x, g=g)
        meta = {"q_lora_rank": str(args.q_lora), "kv_lora_rank": str(args.kv_lora), "qk_nope_head_dim": str(args.nope),
                "qk_rope_head_dim": str(args.rope), "v_head_dim": str(args.v), "num_attention_heads": str(args.heads),
                "rope_theta": "10000.0"}
        save_file(tensors, weights, metadata=meta)
        proc = subprocess.Popen([args.binary, "--weights", weights, "--threads", str(args.threads)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def ask(line):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline()
            if not answer:
                sys.exit(f"bench_mla_attention stopped (request '{line}')")
            return json.loads(answer)

        ready = json.loads(proc.stdout.readline())
        assert ready.get("ready"), ready
        out = os.path.join(tmp, "y.safetensors")
        ask(f"output {out}")
        with torch.no_grad():
            want = hf(x, (cos, sin), None)[0]
        got = load_file(out)["y"]
        diff = ((got - want).abs().max() / want.abs().max()).item()
        if diff > 1e-4:
            sys.exit(f"outputs differ: max relative difference {diff:.2e}")

        xg = x.clone().requires_grad_(True)

        def hf_pass():
            y = hf(xg, (cos, sin), None)[0]
            y.backward(g)
            hf.zero_grad(set_to_none=True)
            xg.grad = None

        import time
        for _ in range(2):
            hf_pass()
        tokens = args.batch * args.seq * args.iters
        ours, theirs, ratios = [], [], []
        for r in range(args.rounds):
            def time_hf():
                start = time.perf_counter()
                for _ in range(args.iters):
                    hf_pass()
                return tokens / (time.perf_counter() - start)

            def time_ours():
                a = ask(f"pass {args.iters}")
                return a["tokens"] / a["seconds"]

            if r % 2 == 0:
                b, t = time_ours(), time_hf()
            else:
                t, b = time_hf(), time_ours()
            ours.append(b)
            theirs.append(t)
            ratios.append(b / t)

        q = f"q_lora {args.q_lora}" if args.q_lora else "no q compression"
        print(f"MLA attention forward+backward: hidden {args.hidden}, {args.heads} heads, {q}, kv_lora {args.kv_lora}, "
              f"dims {args.nope}+{args.rope}/{args.v}, batch {args.batch} x {args.seq}, {args.threads} threads, "
              f"{args.rounds} rounds (outputs agree to {diff:.1e})")
        print("| side | tokens/s (median) |")
        print("|---|---|")
        print(f"| brigade MLAttention | {statistics.median(ours):,.0f} |")
        print(f"| transformers DeepseekV3Attention (sdpa) | {statistics.median(theirs):,.0f} |")
        print(f"brigade / transformers: median {statistics.median(ratios):.2f}x "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")

        print("\nDecode, one new token per sequence (batch %d) against a cached context:" % args.batch)
        print("| context | cache | values per position | tokens/s | latent / full |")
        print("|---|---|---|---|---|")
        for context in [int(c) for c in args.contexts.split(",")]:
            runs = [ask(f"decode {context} {args.decode_iters}") for _ in range(3)]
            lat = statistics.median(r["latent"]["tokens"] / r["latent"]["seconds"] for r in runs)
            full = statistics.median(r["full"]["tokens"] / r["full"]["seconds"] for r in runs)
            worst = max(r["relative_difference"] for r in runs)
            if worst > 1e-4:
                sys.exit(f"latent and full caches disagree: {worst:.2e}")
            lv, fv = runs[0]["latent"]["values_per_position"], runs[0]["full"]["values_per_position"]
            print(f"| {context} | latent (absorbed) | {lv} | {lat:,.0f} | {lat / full:.2f}x |")
            print(f"| {context} | full K/V | {fv} ({fv / lv:.1f}x) | {full:,.0f} | |")
        proc.stdin.close()
        proc.wait()


if __name__ == "__main__":
    main()
