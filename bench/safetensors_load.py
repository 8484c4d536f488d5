"""safetensors load time: brigade's reader vs the Python safetensors package.

Writes a Llama-shaped set of weights (default about 400 MB of float32 in one file,
and the same split into 4 shards with an index), then alternates rounds of
  brigade: bench_safetensors_load (mmap + every tensor summed once)
  python:  safetensors.torch.load_file (+ the same sums)
on the warm page cache, one thread each, and prints the medians and their ratio.

  .venv/bin/python bench/safetensors_load.py [--build build] [--mb 400] [--rounds 7]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file


def make_weights(mb):
    d, ff, vocab = 1024, 2816, 32000
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, d)}
    layer = 0
    while sum(t.numel() * 4 for t in tensors.values()) < mb * 2**20:
        p = f"model.layers.{layer}."
        for name, shape in [("self_attn.q_proj.weight", (d, d)), ("self_attn.k_proj.weight", (d // 4, d)),
                            ("self_attn.v_proj.weight", (d // 4, d)), ("self_attn.o_proj.weight", (d, d)),
                            ("mlp.gate_proj.weight", (ff, d)), ("mlp.up_proj.weight", (ff, d)),
                            ("mlp.down_proj.weight", (d, ff)), ("input_layernorm.weight", (d,)),
                            ("post_attention_layernorm.weight", (d,))]:
            tensors[p + name] = torch.randn(*shape)
        layer += 1
    return tensors


def python_round(path):
    start = time.perf_counter()
    if os.path.isdir(path):
        index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
        tensors = {}
        for f in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(os.path.join(path, f)))
    else:
        tensors = load_file(path)
    checksum = sum(t.float().sum().item() for t in tensors.values())
    return time.perf_counter() - start, checksum


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    binary = os.path.join(args.build, "bench", "bench_safetensors_load")
    if not os.path.exists(binary):
        sys.exit(f"{binary} not found: make -C {args.build} bench_safetensors_load")
    with tempfile.TemporaryDirectory() as tmp:
        weights = make_weights(args.mb)
        single = os.path.join(tmp, "model.safetensors")
        save_file(weights, single, metadata={"format": "pt"})
        sharded = os.path.join(tmp, "sharded")
        os.makedirs(sharded)
        names = list(weights)
        parts = [names[i::4] for i in range(4)]
        weight_map = {}
        for i, part in enumerate(parts):
            f = f"model-{i + 1:05d}-of-00004.safetensors"
            save_file({n: weights[n] for n in part}, os.path.join(sharded, f), metadata={"format": "pt"})
            weight_map.update({n: f for n in part})
        json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(sharded, "model.safetensors.index.json"), "w"))
        total_mb = sum(t.numel() * 4 for t in weights.values()) / 2**20
        del weights
        print(f"{total_mb:.0f} MB float32, {len(names)} tensors; warm page cache; 1 thread; {args.rounds} rounds each\n")
        print("| file | brigade s (median) | python safetensors s (median) | speed-up |")
        print("|---|---|---|---|")
        for label, path in [("one file", single), ("4 shards + index", sharded)]:
            ours, theirs = [], []
            for _ in range(args.rounds):  # alternate so both see the same machine state
                out = subprocess.run([binary, path, "1"], check=True, capture_output=True, text=True).stdout.split()
                ours.append(float(out[0]))
                seconds, checksum = python_round(path)
                theirs.append(seconds)
                if abs(float(out[1]) - checksum) > 1e-3 * max(1.0, abs(checksum)):
                    sys.exit(f"checksums differ: brigade {out[1]} python {checksum}")
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"| {label} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
