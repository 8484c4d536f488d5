#!/usr/bin/env bash
# The GPU check: brigade's *_CUDA tests, a short training run with a resume, and
# the GPU benchmarks, with every result in one summary.json. Made to run on a GPU
# machine from the bundle of scripts/gpu-bundle.sh, within 8 minutes on one H200.
#
#   scripts/gpu-check.sh [--cpu] [--bundle DIR] [--out DIR]
#
# --cpu: the same steps with trainer.device=cpu and CPU-sized benchmarks (CI runs
#        this, so the script cannot rot); the *_CUDA tests then skip.
# --bundle DIR|FILE.tar.xz: binaries and libraries from DIR, or from the archive
#        scripts/gpu-bundle.sh writes (unpacked into the output directory first);
#        default .gpu-bundle when it exists, else .gpu-bundle.tar.xz, else build/.
# --out DIR: where logs and summary.json go (default $OUT when set, else
#        runs/gpu-check).
#
# LibTorch, CUDA and NCCL come from the machine's PyTorch wheel (python3 -c
# 'import torch'), found at run time. Exit status 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=cuda
BUNDLE=""
DEST="${OUT:-runs/gpu-check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --bundle) BUNDLE="$2"; shift ;;
    --out) DEST="$2"; shift ;;
    *) echo "gpu-check: unknown argument '$1' (expected --cpu, --bundle DIR, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
[ -z "$BUNDLE" ] && [ -d .gpu-bundle/bin ] && BUNDLE=.gpu-bundle
[ -z "$BUNDLE" ] && [ -f .gpu-bundle.tar.xz ] && BUNDLE=.gpu-bundle.tar.xz
if [[ "$BUNDLE" == *.tar.xz ]]; then
  # Python's tarfile reads xz without the xz tool, which a GPU image may lack. Not
  # under $DEST: what lands there comes back from a device run.
  unpacked=$(mktemp -d)
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BUNDLE" "$unpacked" || {
    echo "gpu-check: cannot unpack $BUNDLE" >&2; exit 2; }
  BUNDLE="$unpacked/$(basename "$BUNDLE" .tar.xz)"
fi

if [ -n "$BUNDLE" ]; then
  [[ "$BUNDLE" == /* ]] || BUNDLE="$ROOT/$BUNDLE"
  BIN="$BUNDLE/bin"
  TESTS="$BIN/brigade_tests"; BRIGADE="$BIN/brigade"; TRAIN_STEP="$BIN/bench_train_step"; FP8_GEMM="$BIN/bench_fp8_gemm"
  CROSS_ENTROPY="$BIN/bench_cross_entropy"
  libs="$BUNDLE/lib"
  # The PyTorch wheel's LibTorch and the NVIDIA wheels beside it (cuBLAS, NCCL, ...).
  site=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null || true)
  if [ -n "$site" ]; then
    libs="$libs:$site/torch/lib"
    for d in "$site"/nvidia/*/lib "$site"/nvidia/cu*/lib; do [ -d "$d" ] && libs="$libs:$d"; done
  fi
  # Only brigade's binaries see the packed libraries (python3 and the tools keep the
  # machine's own).
  RUN=(env "LD_LIBRARY_PATH=$libs:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}")
else
  RUN=(env)
  TESTS="$ROOT/build/tests/brigade_tests"; BRIGADE="$ROOT/build/brigade"
  TRAIN_STEP="$ROOT/build/bench/bench_train_step"; FP8_GEMM="$ROOT/build/bench/bench_fp8_gemm"
  CROSS_ENTROPY="$ROOT/build/bench/bench_cross_entropy"
fi
echo "gpu-check: binaries from $(dirname "$BRIGADE")"
for b in "$TESTS" "$BRIGADE" "$TRAIN_STEP" "$FP8_GEMM" "$CROSS_ENTROPY"; do
  [ -x "$b" ] || { echo "gpu-check: $b is missing (scripts/gpu-bundle.sh, or scripts/setup.sh brigade_tests bench_train_step bench_fp8_gemm bench_cross_entropy)" >&2; exit 2; }
done

STEPS="$DEST/steps.tsv"
: > "$STEPS"
failed=0
# step NAME TIMEOUT_S COMMAND...: runs it with its output in NAME.log, records status and seconds.
step() {
  local name=$1 limit=$2; shift 2
  printf '\n==> %s\n' "$name"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
  rc=$?
  tail -n 15 "$DEST/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STEPS"
  [ "$rc" = 0 ] || { echo "gpu-check: step $name failed with status $rc (log: $DEST/$name.log)"; failed=1; }
}

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader > "$DEST/gpu.txt" 2>&1 || true
fi
if [ "$MODE" = cuda ]; then
  DEVICE=cuda; DENSE=recipes/gpu-1b-dense.yaml; MOE=recipes/gpu-moe.yaml
  BENCH=(--warmup 2 --steps 3 --windows 3 --matmul-size 8192 --threads 4)
  GEMM=(--reps 10)
  CE=(--device cuda --tokens 16384 --vocab 131072 --reps 5)
else
  DEVICE=cpu; DENSE=recipes/tiny-dense.yaml; MOE=recipes/tiny-moe.yaml
  BENCH=(--warmup 1 --steps 2 --windows 2 --matmul-size 256 --threads 1)
  GEMM=(--reps 2 --hidden 256 --tokens 256)
  CE=(--device cpu --tokens 512 --vocab 4096 --reps 1 --threads 1)
fi

# 1. The *_CUDA tests (the device-generic placement logic too, so a CPU run tests something).
step tests 300 "${RUN[@]}" OMP_NUM_THREADS=1 "$TESTS" --gtest_filter='*_CUDA*:Placement*' --gtest_output="json:$DEST/tests.json"

# 2. A short run, stopped half-way and resumed, on the device.
run_dir="$DEST/run-tiny"
rm -rf "$run_dir"
TRAIN=(train recipes/tiny-dense.yaml --run-dir "$run_dir" --set trainer.device=$DEVICE --set trainer.max_steps=60
       --set trainer.log_every=10 --set trainer.eval_every=30 --set trainer.checkpoint_every=30)
step train 180 "${RUN[@]}" "$BRIGADE" "${TRAIN[@]}" --set trainer.stop_after=30
step resume 180 "${RUN[@]}" "$BRIGADE" "${TRAIN[@]}" --resume

# 2b. DeepSeek-V3's architecture at CPU size (multi-head latent attention, shared +
#     routed experts, an MTP module, FP8 blockwise GEMMs): stopped and resumed, then
#     decoded with the MTP module as the draft.
ds_dir="$DEST/run-deepseek"
rm -rf "$ds_dir"
DS=(train recipes/tiny-deepseek-v3.yaml --run-dir "$ds_dir" --set trainer.device=$DEVICE --set trainer.max_steps=40 --set trainer.warmup_steps=5
    --set trainer.log_every=10 --set trainer.eval_every=20 --set trainer.checkpoint_every=20)
step deepseek_train 240 "${RUN[@]}" "$BRIGADE" "${DS[@]}" --set trainer.stop_after=20
step deepseek_resume 240 "${RUN[@]}" "$BRIGADE" "${DS[@]}" --resume
step deepseek_speculative 120 "${RUN[@]}" "$BRIGADE" generate --checkpoint "$ds_dir" --prompt "Problem: 12+35" \
     --max-new-tokens 48 --speculative mtp --set trainer.device=$DEVICE

# 3. Benchmarks: the dense and MoE training steps, then the FP8 kernels (GPU only;
#    without one bench_fp8_gemm says so and exits 0).
step bench_dense 240 "${RUN[@]}" "$TRAIN_STEP" --recipe "$DENSE" --set trainer.device=$DEVICE "${BENCH[@]}"
step bench_moe 240 "${RUN[@]}" "$TRAIN_STEP" --recipe "$MOE" --set trainer.device=$DEVICE "${BENCH[@]}"
step bench_fp8_gemm 180 "${RUN[@]}" "$FP8_GEMM" "${GEMM[@]}"
step bench_cross_entropy 120 "${RUN[@]}" "$CROSS_ENTROPY" "${CE[@]}"

python3 - "$DEST" "$MODE" <<'EOF'
import json, pathlib, sys, time
dest, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
summary = {"mode": mode, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}
gpu = dest / "gpu.txt"
summary["gpu"] = gpu.read_text().strip() if gpu.exists() else None
for line in (dest / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    summary["steps"][name] = {"status": int(rc), "seconds": int(seconds)}
tests = dest / "tests.json"
if tests.exists():
    cases = [c for s in json.loads(tests.read_text())["testsuites"] for c in s["testsuite"]]
    skipped = [c for c in cases if c.get("result") == "SKIPPED"]
    failed = [c for c in cases if c.get("failures")]
    summary["tests"] = {"run": len(cases), "skipped": len(skipped), "failed": [f"{c['classname']}.{c['name']}" for c in failed],
                        "passed": len(cases) - len(skipped) - len(failed)}
# The training run's last logged loss and eval, from metrics.jsonl.
metrics = dest / "run-tiny" / "metrics.jsonl"
if metrics.exists():
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    train = [r for r in rows if "loss" in r]
    summary["train"] = {"steps_logged": [r["step"] for r in train],
                        "first_loss": train[0]["loss"] if train else None,
                        "last_loss": train[-1]["loss"] if train else None}
    # Stopped at 30 and resumed: every logged step once, to 60, and the loss fell.
    t = summary["train"]
    t["ok"] = t["steps_logged"] == [10, 20, 30, 40, 50, 60] and t["last_loss"] < 0.8 * t["first_loss"]
else:
    summary["train"] = {"ok": False}
# The DeepSeek-shaped run: every logged step once, the loss fell, MTP loss logged.
metrics = dest / "run-deepseek" / "metrics.jsonl"
if metrics.exists():
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    train = [r for r in rows if "loss" in r]
    d = summary["deepseek"] = {"steps_logged": [r["step"] for r in train],
                               "first_loss": train[0]["loss"] if train else None,
                               "last_loss": train[-1]["loss"] if train else None,
                               "mtp_loss": [r.get("mtp_loss") for r in train]}
    d["ok"] = d["steps_logged"] == [10, 20, 30, 40] and d["last_loss"] < 0.8 * d["first_loss"] and None not in d["mtp_loss"]
else:
    summary["deepseek"] = {"ok": False}
spec = dest / "deepseek_speculative.log"
summary["deepseek"]["speculative"] = [l for l in spec.read_text().splitlines() if l.startswith("speculative mtp")] if spec.exists() else []
for bench in ("bench_dense", "bench_moe"):
    log = dest / f"{bench}.log"
    lines = [l for l in log.read_text().splitlines() if l.startswith("{")] if log.exists() else []
    if lines:
        info = json.loads(lines[-1])
        summary[bench] = {k: info.get(k) for k in ("recipe", "device", "gpu", "compute_dtype", "params_total",
                                                   "tokens_per_step", "median_tokens_per_sec", "mfu",
                                                   "matmul_peak_gflops")}
for bench in ("bench_fp8_gemm", "bench_cross_entropy"):
    log = dest / f"{bench}.log"
    if log.exists():
        summary[bench] = log.read_text().splitlines()[-40:]
ok = summary["train"]["ok"] and summary["deepseek"]["ok"] and not summary.get("tests", {"failed": ["(no tests.json)"]})["failed"]
summary["ok"] = ok and all(s["status"] == 0 for s in summary["steps"].values())
(dest / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\ngpu-check ({mode}): summary in {dest / 'summary.json'}")
for name, s in summary["steps"].items():
    print(f"  {name:<16} status {s['status']:<4} {s['seconds']:>4} s")
print(f"  train + resume: {'ok' if summary['train']['ok'] else 'FAILED'} {summary['train']}")
print(f"  deepseek (MLA + MoE + MTP + FP8) train + resume: {'ok' if summary['deepseek']['ok'] else 'FAILED'} {summary['deepseek']}")
if "tests" in summary:
    t = summary["tests"]
    print(f"  tests: {t['passed']} passed, {t['skipped']} skipped, {len(t['failed'])} failed {t['failed'] or ''}")
for bench in ("bench_dense", "bench_moe"):
    if bench in summary:
        b = summary[bench]
        print(f"  {bench}: {b['recipe']} on {b['device']}: {b['median_tokens_per_sec']:.0f} tok/s, MFU {100 * b['mfu']:.1f}% "
              f"of a measured {b['matmul_peak_gflops'] / 1e3:.1f} TFLOP/s {b['compute_dtype']} matmul")
sys.exit(0 if summary["ok"] else 1)
EOF
[ $? = 0 ] || failed=1
exit $failed
