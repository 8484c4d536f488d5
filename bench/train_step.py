#!/usr/bin/env python3
"""brigade's training step against PyTorch eager on the same model, batch and threads.

    .venv/bin/python bench/train_step.py [--recipes R ...] [--threads 2] [--quick]

For each recipe the driver starts `bench_train_step --interleave` (brigade's
Trainer::step() in C++), which reports the resolved model and trainer settings
once warmed up, builds the same model in plain PyTorch eager from those settings
(as a PyTorch user would write it), warms it up, and then runs rounds: the
matmul peak, then one timing window per side, in an order that flips every
round. Only one side computes at a time, and each round waits for other tenants
of the machine to go quiet first. It prints the median tokens/s of each side,
the median within-round ratio, and the model-FLOPs utilisation of each against
an fp32 LibTorch matmul peak measured on the same thread count. See
bench/README.md.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = ["recipes/tiny-dense.yaml", "recipes/small-dense.yaml"]
# The issue's targets: brigade tokens/s over eager tokens/s.
TARGETS = {"tiny-dense": 1.10, "small-dense": 0.98}


# ---------------------------------------------------------------------------------
# The model, written as a PyTorch user would write it (HF Llama/Qwen layout).


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # fp32 normalisation whatever the compute dtype, as brigade does.
        return F.rms_norm(x.float(), (x.size(-1),), self.weight, self.eps).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):  # x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim]
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = m["n_heads"], m["n_kv_heads"], m["head_dim"]
        d, hd, bias = m["d_model"], m["head_dim"], m["qkv_bias"]
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.gate_proj = nn.Linear(m["d_model"], m["d_ff"], bias=False)
        self.up_proj = nn.Linear(m["d_model"], m["d_ff"], bias=False)
        self.down_proj = nn.Linear(m["d_ff"], m["d_model"], bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.input_layernorm = RMSNorm(m["d_model"], m["norm_eps"])
        self.self_attn = Attention(m)
        self.post_attention_layernorm = RMSNorm(m["d_model"], m["norm_eps"])
        self.mlp = MLP(m)

    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, m):
        super().__init__()
        if m["qk_norm"] or not m["tie_embeddings"]:
            raise SystemExit("train_step.py models tied embeddings without q/k norm only")
        self.embed_tokens = nn.Embedding(m["vocab_size"], m["d_model"])
        self.layers = nn.ModuleList(Block(m) for _ in range(m["n_layers"]))
        self.norm = RMSNorm(m["d_model"], m["norm_eps"])
        hd = m["head_dim"]
        inv_freq = 1.0 / m["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angles = torch.outer(torch.arange(m["max_seq_len"], dtype=torch.float64), inv_freq)
        full = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", full.cos().float(), persistent=False)
        self.register_buffer("rope_sin", full.sin().float(), persistent=False)
        self._init_weights(m)

    @torch.no_grad()
    def _init_weights(self, m):
        std = m["init_std"]
        out_std = std / math.sqrt(2.0 * m["n_layers"])
        self.embed_tokens.weight.normal_(0.0, std)
        for block in self.layers:
            for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                        block.mlp.gate_proj, block.mlp.up_proj):
                lin.weight.normal_(0.0, std)
                if lin.bias is not None:
                    lin.bias.zero_()
            block.self_attn.o_proj.weight.normal_(0.0, out_std)
            block.mlp.down_proj.weight.normal_(0.0, out_std)

    def forward(self, tokens):  # [batch, seq] -> [batch, seq, vocab]
        s = tokens.size(1)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        h = self.embed_tokens(tokens)
        for block in self.layers:
            h = block(h, cos, sin)
        return F.linear(self.norm(h), self.embed_tokens.weight)


# torch.optim.AdamW's implementations. "default" is what `AdamW(params, lr=...)` picks:
# on CPU in torch 2.11 the per-tensor for-loop. "fused" is the kernel brigade calls.
ADAMW_IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def lr_at(step, t):
    """brigade's CosineSchedule: linear warmup from 0, cosine to min_lr."""
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    decay = max(1, t["max_steps"] - t["warmup_steps"])
    progress = min(max((step - t["warmup_steps"]) / decay, 0.0), 1.0)
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1.0 + math.cos(math.pi * progress))


class EagerTrainer:
    """The training step as a PyTorch user writes it: default AdamW, clip_grad_norm_."""

    def __init__(self, info, adamw="default"):
        # The device brigade computes on (trainer.device); on a GPU, BF16 is autocast
        # over FP32 parameters, as brigade does.
        self.device = torch.device(info.get("device", "cpu"))
        self.autocast = info["compute_dtype"] == "bfloat16"
        if self.autocast and self.device.type != "cuda":
            raise SystemExit(f"train_step.py compares float32 compute on CPUs, recipe has {info['compute_dtype']}")
        m, t = info["model"], info["trainer"]
        self.t = t
        torch.manual_seed(t["seed"])
        self.model = Transformer(m).to(self.device)
        self.model.train()
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if "embed_tokens" in name:
                (decay if t["decay_embeddings"] else no_decay).append(p)
            elif p.dim() < 2:
                (decay if t["decay_norms_and_biases"] else no_decay).append(p)
            else:
                decay.append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"], **ADAMW_IMPLEMENTATIONS[adamw])
        self.shape = (t["micro_batch_size"], t["seq_len"])
        self.vocab = m["vocab_size"]
        self.step_index = 0

    def batch(self):
        # Random token windows of the recipe's shape; making them costs microseconds.
        rows = torch.randint(0, self.vocab, (self.shape[0], self.shape[1] + 1)).to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def step(self):
        t = self.t
        self.optimizer.zero_grad()
        loss_sum = 0.0
        for _ in range(t["grad_accum_steps"]):
            inputs, targets = self.batch()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(inputs)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100)
            (loss / t["grad_accum_steps"]).backward()
            loss_sum += loss.item() / t["grad_accum_steps"]
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t["grad_clip"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step_index, t)
        self.optimizer.step()
        self.step_index += 1
        return loss_sum

    def window(self, steps):
        tokens_per_step = self.shape[0] * self.shape[1] * self.t["grad_accum_steps"]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        return {"tokens_per_sec": steps * tokens_per_step / seconds, "seconds": seconds, "loss": loss}


# ---------------------------------------------------------------------------------
# The brigade side: bench_train_step --interleave, one window per stdin line.


class BrigadeProcess:
    def __init__(self, binary, recipe, args):
        cmd = [str(binary), "--recipe", str(recipe), "--threads", str(args.threads),
               "--warmup", str(args.warmup), "--matmul-size", str(args.matmul_size), "--interleave"]
        for kv in args.set:
            cmd += ["--set", kv]
        self.cmd = cmd
        env = dict(os.environ)
        for kv in args.brigade_env:
            key, _, value = kv.partition("=")
            env[key] = value
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"bench_train_step exited with {self.proc.returncode}: {' '.join(self.cmd)}")
        return json.loads(line)

    def window(self, steps):
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def profile(self, steps):
        self.proc.stdin.write(f"profile {steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def matmul_peak(self):
        self.proc.stdin.write("matmul\n")
        self.proc.stdin.flush()
        return self._read()["matmul_peak_gflops"]

    def close(self):
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise SystemExit(f"bench_train_step exited with {self.proc.returncode}")


def find_binary(explicit):
    if explicit:
        return Path(explicit)
    for build in ("build-bench", "build"):
        path = REPO / build / "bench" / "bench_train_step"
        if path.exists():
            return path
    raise SystemExit("bench_train_step not found; build it (bench/README.md) or pass --binary")


class OtherLoad:
    """Cores' worth of CPU that processes other than ours used during a measurement.

    The machine is shared: another tenant's compiler on our cores slows a 2-thread
    OpenMP step by anything up to 20x (a descheduled thread stalls every barrier).
    From /proc: all busy CPU time (steal included) minus this process's and the
    brigade process's own, over the wall time.
    """

    def __init__(self, pid):
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def _sample(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = sum(v[:8]) - v[3] - v[4]  # all but idle and iowait; guest time is already in user
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        child = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
        t = os.times()
        return time.perf_counter(), busy / self.tick - child / self.tick - (t.user + t.system)

    def wait_quiet(self, max_load, max_seconds):
        """Waits (up to max_seconds) for a half second in which others used at most max_load cores."""
        deadline = time.perf_counter() + max_seconds
        while True:
            _, other = self.measure(lambda: time.sleep(0.5))
            if other <= max_load or time.perf_counter() > deadline:
                return other <= max_load

    def measure(self, fn):
        """(fn(), other processes' load in cores during it)."""
        t0, other0 = self._sample()
        result = fn()
        t1, other1 = self._sample()
        return result, max(0.0, (other1 - other0) / (t1 - t0))


def compare(recipe, binary, args):
    brigade = BrigadeProcess(binary, recipe, args)
    info = brigade.info
    eager = EagerTrainer(info, args.eager_adamw)
    eager_params = sum(p.numel() for p in eager.model.parameters())
    if eager_params != info["params_total"]:
        raise SystemExit(f"{info['recipe']}: eager model has {eager_params} parameters, brigade "
                         f"{info['params_total']}: the models differ")
    for _ in range(args.warmup):
        eager.step()
    load = OtherLoad(brigade.proc.pid)
    if args.profile > 0:
        load.wait_quiet(max(args.max_other_load, 0.0), args.max_wait)
        print_profiles(info["recipe"], brigade.profile(args.profile), eager_profile(eager, args.profile))

    # One step per side sizes the windows: both sides run the same number of steps,
    # enough for the slower side to take about --window-seconds.
    if args.max_other_load >= 0:
        load.wait_quiet(args.max_other_load, args.max_wait)
    step_seconds = max(brigade.window(1)["seconds"], eager.window(1)["seconds"])
    steps = max(1, round(args.window_seconds / step_seconds))

    # A round: the matmul peak, then one window per side, the side order flipping
    # every round. Each round waits (up to --max-wait seconds) for the machine to
    # go quiet first; rounds during which other processes still used more than
    # --max-other-load cores are repeated, up to 3x --rounds in all. The medians
    # are over the quiet rounds when there are enough of them, else over all.
    rounds = []
    for r in range(3 * args.rounds):
        if args.max_other_load >= 0:
            load.wait_quiet(args.max_other_load, args.max_wait)
        rnd = {}
        rnd["peak"], rnd["peak_load"] = load.measure(lambda: brigade.matmul_peak())
        order = ("brigade", "eager") if r % 2 == 0 else ("eager", "brigade")
        for side in order:
            run = brigade.window if side == "brigade" else eager.window
            w, rnd[side + "_load"] = load.measure(lambda: run(steps))
            rnd[side] = w["tokens_per_sec"]
            rnd[side + "_loss"] = w["loss"]
        other = max(rnd["peak_load"], rnd["brigade_load"], rnd["eager_load"])
        rnd["quiet"] = args.max_other_load < 0 or other <= args.max_other_load
        rounds.append(rnd)
        if args.verbose:
            print(f"  {info['recipe']} round {r}: brigade {rnd['brigade']:.0f} tok/s, eager {rnd['eager']:.0f} tok/s, "
                  f"peak {rnd['peak']:.1f} GFLOP/s; other load {rnd['brigade_load']:.2f} / {rnd['eager_load']:.2f} / "
                  f"{rnd['peak_load']:.2f} cores{'' if rnd['quiet'] else ' (noisy)'}", file=sys.stderr)
        if sum(x["quiet"] for x in rounds) >= args.rounds:
            break
    brigade.close()

    quiet = [x for x in rounds if x["quiet"]]
    used = quiet if len(quiet) >= min(3, args.rounds) else rounds
    med = lambda key: statistics.median(x[key] for x in used)
    b, e, peak = med("brigade"), med("eager"), med("peak")
    fpt = info["flops_per_token"]
    round_ratios = [x["brigade"] / x["eager"] for x in used]
    return {
        "recipe": info["recipe"],
        "threads": info["threads"],
        "batch": [info["trainer"]["micro_batch_size"], info["trainer"]["seq_len"]],
        "params_total": info["params_total"],
        "flops_per_token": fpt,
        "steps_per_window": steps,
        "rounds_run": len(rounds),
        "rounds_used": len(used),
        "quiet_only": used is quiet,
        "brigade_median": b,
        "eager_median": e,
        # The headline ratio pairs the two windows of each round: they are seconds
        # apart, so slow drift in the machine's speed cancels out of it.
        "ratio": statistics.median(round_ratios),
        "ratio_of_medians": b / e,
        "round_ratio_min": min(round_ratios),
        "round_ratio_max": max(round_ratios),
        # The issue's targets are for brigade as built against eager as users write it.
        "target": TARGETS.get(info["recipe"]) if args.eager_adamw == "default" and not args.brigade_env else None,
        "eager_adamw": args.eager_adamw,
        "brigade_env": args.brigade_env,
        "brigade_mfu": b * fpt / (peak * 1e9),
        "eager_mfu": e * fpt / (peak * 1e9),
        "matmul_peak_gflops": peak,
        "rounds": rounds,
    }


def eager_profile(eager, steps):
    """Per-op times per step of the eager model, in bench_train_step --profile's format."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            eager.step()
        seconds = time.perf_counter() - start
    ops = [{"name": e.key, "calls": e.count / steps, "self_ms": e.self_cpu_time_total / 1e3 / steps,
            "total_ms": e.cpu_time_total / 1e3 / steps} for e in prof.key_averages()]
    ops.sort(key=lambda o: -o["self_ms"])
    return {"steps": steps, "step_ms": 1e3 * seconds / steps, "ops": ops}


def print_profiles(recipe, brigade, eager, top=30):
    """Self time per op and step, brigade beside eager, largest first."""
    b = {o["name"]: o for o in brigade["ops"]}
    e = {o["name"]: o for o in eager["ops"]}
    largest = lambda n: max(b.get(n, {}).get("self_ms", 0), e.get(n, {}).get("self_ms", 0))
    names = sorted(set(b) | set(e), key=lambda n: -largest(n))
    print(f"\n{recipe}: per-op self time per step (ms), {brigade['steps']} profiled steps per side")
    print(f"{'op':<64} {'brigade':>8} {'calls':>6} {'eager':>8} {'calls':>6}")
    for n in names[:top]:
        bo, eo = b.get(n), e.get(n)
        cell = lambda o, k, f: format(o[k], f) if o else "-"
        print(f"{n[:64]:<64} {cell(bo, 'self_ms', '8.2f'):>8} {cell(bo, 'calls', '6.0f'):>6} "
              f"{cell(eo, 'self_ms', '8.2f'):>8} {cell(eo, 'calls', '6.0f'):>6}")
    for side, p in (("brigade", brigade), ("eager", eager)):
        inside = sum(o["self_ms"] for o in p["ops"])
        print(f"{side}: {p['step_ms']:.2f} ms per profiled step, {inside:.2f} ms inside LibTorch ops, "
              f"{p['step_ms'] - inside:.2f} ms outside")


def print_table(results):
    head = ["recipe", "brigade tok/s", "eager tok/s", "ratio", "target", "brigade MFU", "eager MFU",
            "matmul peak GFLOP/s"]
    rows = []
    for r in results:
        target = r["target"]
        verdict = "" if target is None else (" ok" if r["ratio"] >= target else " MISS")
        rows.append([r["recipe"], f"{r['brigade_median']:.0f}", f"{r['eager_median']:.0f}", f"{r['ratio']:.3f}x",
                     "-" if target is None else f">= {target:.2f}x{verdict}",
                     f"{100 * r['brigade_mfu']:.1f}%", f"{100 * r['eager_mfu']:.1f}%",
                     f"{r['matmul_peak_gflops']:.1f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    print()
    for r in results:
        which = "quiet rounds" if r["quiet_only"] else "rounds (too few quiet ones: NOISY)"
        print(f"{r['recipe']}: {r['params_total'] / 1e6:.2f}M params, batch {r['batch'][0]}x{r['batch'][1]}, "
              f"{r['flops_per_token'] / 1e6:.1f} MFLOP/token, {r['threads']} threads; medians over {r['rounds_used']} "
              f"{which} of {r['rounds_run']} run, {r['steps_per_window']} steps per window; per-round ratios "
              f"{r['round_ratio_min']:.3f}-{r['round_ratio_max']:.3f}, ratio of the medians {r['ratio_of_medians']:.3f}")
    adamw = {r["eager_adamw"] for r in results}
    print(f"eager: torch.optim.AdamW implementation '{'/'.join(sorted(adamw))}', clip_grad_norm_, F.cross_entropy.")
    if results and results[0]["brigade_env"]:
        print(f"brigade process environment: {' '.join(results[0]['brigade_env'])}")
    print("Each round: matmul peak, then a brigade and an eager window in alternating order; ratio: median over "
          "rounds of brigade/eager within the round. A round is quiet when other processes used at most "
          "--max-other-load cores during it. brigade trains on its recipe's sampler, "
          "eager on random tokens of the same shape (data costs microseconds per step either way). MFU: "
          "PaLM-convention training FLOPs/token x tokens/s over the fp32 LibTorch matmul peak.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="recipe files (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for both sides (default: 2)")
    parser.add_argument("--rounds", type=int, default=11,
                        help="quiet rounds wanted, one timing window per side each (default: 11)")
    parser.add_argument("--window-seconds", type=float, default=1.5,
                        help="target length of one window of the slower side; at least one step (default: 1.5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side (default: 3)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n^3 peak matmul (default: 2048)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override passed to brigade (the eager side follows it)")
    parser.add_argument("--max-other-load", type=float, default=0.25, metavar="CORES",
                        help="a round is quiet when other processes used at most this many cores; "
                             "negative: keep every round (default: 0.25)")
    parser.add_argument("--max-wait", type=float, default=60.0, metavar="SECONDS",
                        help="longest wait for a quiet machine before each round (default: 60)")
    parser.add_argument("--eager-adamw", choices=sorted(ADAMW_IMPLEMENTATIONS), default="default",
                        help="torch.optim.AdamW implementation of the eager side (default: default, as a user "
                             "writes it; fused: the kernel brigade uses)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="before timing, profile STEPS steps per side and print per-op times (default: 0)")
    parser.add_argument("--brigade-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the brigade process only, e.g. to try allocator "
                             "settings: GLIBC_TUNABLES=glibc.malloc.mmap_max=0 (repeatable)")
    parser.add_argument("--binary", help="bench_train_step (default: build-bench/ or build/ under the repo)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 rounds of short windows, 1 warm-up step, short waits for quiet")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every round")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.window_seconds, args.warmup, args.matmul_size = 2, 0.5, 1, 1024
        args.max_wait = min(args.max_wait, 10.0)

    torch.set_num_threads(args.threads)
    binary = find_binary(args.binary)
    results = []
    for recipe in args.recipes:
        path = Path(recipe)
        if not path.exists() and (REPO / recipe).exists():
            path = REPO / recipe
        results.append(compare(path, binary, args))
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
