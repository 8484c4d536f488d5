#!/usr/bin/env python3
"""`brigade serve` against llama.cpp's server: requests/s and tokens/s at several
client concurrencies, on the same model, prompts and threads.

    .venv/bin/python bench/serve_throughput.py [--concurrency 1,8,32] [--requests 64]
        [--max-tokens 64] [--threads 1] [--steps 300]

Trains recipes/tiny-dense.yaml for --steps steps, exports it as an F32 GGUF, and
serves it twice: `brigade serve` (continuous batching) and llama-cpp-python's
llama_cpp.server (llama.cpp's OpenAI-compatible server; pip's llama-cpp-python is
in the test venv), each with --threads compute threads, an F32 KV cache for
llama.cpp and repeat_penalty 1.0 so both decode plainly. At each concurrency C, C
client threads send --requests greedy /v1/completions requests (arithmetic
prompts, max_tokens --max-tokens) in all; requests/s and completion tokens/s are
counted over the wall time, and every request must come back 200 with its text
(nothing lost). The servers answer one at a time (one warm-up request first).

Then brigade's own remote-teacher client, as `brigade distill` uses it: the generate
stage (`--stage generate`, distill.teacher.concurrency C, one greedy sample per
prompt) against each server, requests/s over the process's wall time (start-up
included), every sample stored without error.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BRIGADE = REPO / "build" / "brigade"


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(url, proc, log):
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"server exited: {Path(log).read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/models", timeout=1).read()
            return
        except Exception:
            time.sleep(0.2)
    sys.exit(f"server not ready: {Path(log).read_text()[-2000:]}")


def post(url, body):
    req = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.status, json.loads(r.read())


def load(url, prompts, concurrency, max_tokens, extra):
    results = [None] * len(prompts)
    next_index = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(prompts):
                return
            try:
                status, body = post(url, {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, **extra})
                results[i] = (status, body["choices"][0]["text"], body["usage"]["completion_tokens"])
            except Exception as e:  # counted as lost
                results[i] = (0, str(e), 0)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r[0] == 200]
    return wall, len(ok), sum(r[2] for r in ok), [r[1] for r in results]


def brigade_client(url, extra, prompts, concurrency, max_tokens, run_dir):
    """`brigade distill --stage generate` against `url`: (wall seconds, samples stored without error)."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "prompts.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"p{i}", "prompt": p}) + "\n")
    cmd = [str(BRIGADE), "distill", str(REPO / "recipes" / "distill-arith.yaml"), "--stage", "generate",
           "--run-dir", str(run_dir / "run"), "--set", f"distill.prompts={run_dir / 'prompts.jsonl'}",
           "--set", f"distill.teacher.url={url}", "--set", f"distill.teacher.concurrency={concurrency}",
           "--set", "distill.generate.samples=1", "--set", "distill.generate.temperature=0",
           "--set", f"distill.generate.max_new_tokens={max_tokens}"]
    if extra:
        cmd += ["--set", "distill.teacher.extra_body=" + json.dumps(extra)]
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"brigade distill failed:\n{done.stdout[-3000:]}")
    traces = run_dir / "run" / "distill" / "generate" / "traces.jsonl"
    stored = [json.loads(line) for line in traces.read_text().splitlines() if line.strip()]
    return wall, sum(t.get("finish_reason") != "error" for t in stored)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    python = str(REPO / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([str(BRIGADE), "train", str(REPO / "recipes" / "tiny-dense.yaml"), "--run-dir", str(tmp / "run"),
                        "--set", f"trainer.max_steps={args.steps}", "--set", "trainer.eval_every=0",
                        "--set", f"trainer.threads={args.threads}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([str(BRIGADE), "export", "--checkpoint", str(tmp / "run"), "--format", "gguf", "--quant", "f32",
                        "--out", str(tmp / "model.gguf")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        prompts = []
        for i in range(args.requests):
            a, b, c = 3 + i % 7, 11 + (i * 5) % 37, 2 + (i * 3) % 9
            prompts.append(f"Problem: {a} + {b} * {c}\n")
        servers = {}
        p1 = free_port()
        servers["brigade serve"] = ([str(BRIGADE), "serve", "--checkpoint", str(tmp / "run"), "--port", str(p1),
                                     "--max-batch", str(max(levels)), "--set", f"trainer.threads={args.threads}"],
                                    f"http://127.0.0.1:{p1}/v1", {})
        p2 = free_port()
        servers["llama.cpp server"] = ([python, "-m", "llama_cpp.server", "--model", str(tmp / "model.gguf"),
                                        "--host", "127.0.0.1", "--port", str(p2), "--n_threads", str(args.threads),
                                        "--n_threads_batch", str(args.threads), "--n_ctx", "256",
                                        "--type_k", "0", "--type_v", "0"],
                                       f"http://127.0.0.1:{p2}/v1", {"repeat_penalty": 1.0})
        rows = {}
        texts = {}
        client = {}
        for name, (cmd, url, extra) in servers.items():
            log = tmp / (name.split()[0] + ".log")
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            try:
                wait_ready(url, proc, log)
                post(url, {"prompt": prompts[0], "max_tokens": 4, "temperature": 0, **extra})  # warm-up
                for c in levels:
                    wall, ok, tokens, out = load(url, prompts, c, args.max_tokens, extra)
                    rows[(name, c)] = (wall, ok, tokens)
                    texts[(name, c)] = out
                for c in levels:
                    client[(name, c)] = brigade_client(url, extra, prompts, c, args.max_tokens,
                                                       tmp / f"client_{name.split()[0]}_{c}")
            finally:
                proc.terminate()
                proc.wait()
    print(f"tiny-dense ({args.steps} steps), {args.requests} greedy requests of max_tokens {args.max_tokens}, "
          f"{args.threads} compute threads per server")
    print("| concurrency | server | requests/s | tokens/s | completed | brigade / llama.cpp (tokens/s) |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        for name in servers:
            wall, ok, tokens = rows[(name, c)]
            ratio = ""
            if name == "brigade serve":
                lw, _, lt = rows[("llama.cpp server", c)]
                ratio = f"{(tokens / wall) / (lt / lw):.2f}x" if lt > 0 else "n/a"
            print(f"| {c} | {name} | {ok / wall:.2f} | {tokens / wall:.1f} | {ok}/{args.requests} | {ratio} |")
    same = sum(a == b for a, b in zip(texts[("brigade serve", levels[0])], texts[("llama.cpp server", levels[0])]))
    print(f"greedy texts identical between the servers at concurrency {levels[0]}: {same}/{args.requests}")
    print()
    print("brigade's remote-teacher client (`brigade distill --stage generate`, start-up included)")
    print("| concurrency | server | requests/s | stored without error |")
    print("|---|---|---|---|")
    for c in levels:
        for name in servers:
            wall, ok = client[(name, c)]
            print(f"| {c} | {name} | {ok / wall:.2f} | {ok}/{args.requests} |")
    lost = sum(args.requests - rows[k][1] for k in rows) + sum(args.requests - client[k][1] for k in client)
    if lost:
        sys.exit(f"{lost} requests lost")


if __name__ == "__main__":
    main()
