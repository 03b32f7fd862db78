#!/usr/bin/env bash
# One GPU session: environment, the CUDA tests, then the benchmarks, all inside ~9 minutes.
#
#   bash benchmarks/gpu_session.sh            # from the repository root; logs go to $OUT (default /tmp/out)
#   PART=decode bash benchmarks/gpu_session.sh   # the decoding and long-context checks instead (below)
#   SMOKE=1 PART=decode bash benchmarks/gpu_session.sh   # this script itself, on a CPU, tiny models
#
# Writes at most 5 files to $OUT:
#   session.log   everything printed (environment, pytest, every benchmark)
#   summary.txt   one line per step: name, exit code, seconds (also printed at the end)
#   bench.jsonl   one JSON line per benchmark run (its --json output)
#   junit.xml     pytest's per-test results and timings (tests/test_cuda.py)
#   metrics.txt   GPU memory/clock snapshot at the end
# Each step has its own `timeout`, cut further so the whole run ends by BUDGET_S (default 460 s);
# a step that fails or times out does not stop the rest. Nothing is installed.

set -u
set -o pipefail
OUT="${OUT:-/tmp/out}"
BUDGET_S="${BUDGET_S:-560}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LOG="$OUT/session.log" SUMMARY="$OUT/summary.txt" BENCH="$OUT/bench.jsonl"
: >"$LOG"; : >"$SUMMARY"; : >"$BENCH"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
START=$(date +%s)

# step NAME LIMIT_S CMD...: run CMD under `timeout`, output to the console and session.log;
# JSON lines it prints go to bench.jsonl; a summary line records exit code and seconds.
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        printf '%-28s SKIPPED (%ss of the budget left)\n' "$name" "$left" | tee -a "$SUMMARY" "$LOG"
        return
    fi
    printf '\n===== %s (limit %ss) : %s\n' "$name" "$limit" "$*" | tee -a "$LOG"
    local t0 rc
    t0=$(date +%s.%N)
    : >"$SCRATCH/step.out"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$SCRATCH/step.out"
    rc=$?
    grep -E '^\{.*\}$' "$SCRATCH/step.out" | sed "s/^{/{\"step\": \"$name\", /" >>"$BENCH"
    local secs
    secs=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
    local note=""; (( rc == 124 || rc == 137 )) && note=" (TIMED OUT)"
    printf '%-28s rc=%-3s %6ss%s\n' "$name" "$rc" "$secs" "$note" | tee -a "$SUMMARY" "$LOG"
}

{
    echo "== $(date -u +%FT%TZ) $(hostname) $(git rev-parse --short HEAD 2>/dev/null) (+ working tree)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
    python3 - <<'EOF'
import platform, shutil, sys
import torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available(),
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
      "| nccl:", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
print("C compiler (triton/inductor need one):", shutil.which("cc") or shutil.which("gcc") or "NONE")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
import llama2, llama2.train.pretrain, llama2.train.ppo  # noqa: E401,F401
bad = sorted(m for m in ("fastapi", "uvicorn", "gguf", "openai", "lm_eval") if m in sys.modules)
print("llama2 imports OK; optional packages pulled in:", bad or "none")
EOF
} 2>&1 | tee -a "$LOG"

# Sizes. SMOKE=1 checks this script itself on a CPU machine in a minute (tiny models, no compile).
DEC7=(--device cuda --dtype bfloat16 --preset 7b --new-tokens 128 --repeats 3)
DEC110=(--device cuda --dtype bfloat16 --preset 110m --new-tokens 128 --repeats 3)
TRAIN=(--device cuda --preset 1b --batch 8 --seq 2048 --bf16 --steps 3 --rounds 3)
TRAINC=(--device cuda --preset 1b --batch 8 --seq 2048 --bf16 --compile --steps 3 --rounds 2)
PPO=(--iterations 2 --batch 32 --minibatch 8 --max-new-tokens 40)
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEC7=(--device cpu --preset tiny --prompt-len 8 --new-tokens 8 --repeats 1)
    DEC110=("${DEC7[@]}")
    TRAIN=(--device cpu --preset tiny --batch 2 --seq 32 --bf16 --steps 1 --rounds 1)
    TRAINC=("${TRAIN[@]}")
    PPO=(--iterations 1 --batch 4 --minibatch 2 --max-new-tokens 4)
fi

if [[ "${PART:-base}" == decode ]]; then
    # Decoding at the roofline, the server on the GPU, speculative decoding, 16k context (~9 min).
    D7=(--device cuda --dtype bfloat16 --preset 7b --new-tokens 128 --repeats 3)
    S110=(--device cuda --preset 110m --clients 1,8,32,64 --max-tokens 64)
    SPEC=(--device cuda --preset 7b --draft-tokens 2,4 --new-tokens 64 --repeats 2)
    LONG=(--device cuda --preset 7b --seq-len 16384 --new-tokens 64 --repeats 2)
    if [[ "${SMOKE:-0}" == 1 ]]; then
        D7=(--device cpu --preset tiny --prompt-len 8 --new-tokens 8 --repeats 1 --no-llama-cpp)
        S110=(--device cpu --preset nano --clients 1,2 --max-tokens 4)
        SPEC=(--device cpu --preset nano --draft-tokens 2 --new-tokens 8 --repeats 1 --draft-quantize int8)
        LONG=(--device cpu --preset nano --seq-len 512 --new-tokens 8 --repeats 1)
    fi
    step pytest-cuda-decode 120 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "generat or compile or cache"
    step decode-7b-b1-compile 170 python3 benchmarks/decode.py "${D7[@]}" --compile --json
    step decode-7b-b8-compile 120 python3 benchmarks/decode.py "${D7[@]}" --compile --batch 8 --json
    step long-context-7b-16k 120 python3 benchmarks/long_context.py "${LONG[@]}" --json
    step speculative-7b 90 python3 benchmarks/speculative.py "${SPEC[@]}" --json
    step serve-110m 90 python3 benchmarks/serve.py "${S110[@]}" --json
    step serve-110m-compile 120 python3 benchmarks/serve.py "${S110[@]}" --compile --json
    echo "== total $(( $(date +%s) - START )) s" | tee -a "$SUMMARY" "$LOG"
    echo; echo "===== summary"; cat "$SUMMARY"
    exit 0
fi

# 1. Correctness on the GPU (~1.5-2 min: two torch.compile tests, two torchrun launches).
step pytest-cuda 200 python3 -m pytest tests/test_cuda.py -v -p no:cacheprovider --durations=15 \
    --junitxml="$OUT/junit.xml"
# The CPU model/decoding tests against this machine's torch/transformers versions (~20 s).
step pytest-model-generate 60 python3 -m pytest tests/test_model.py tests/test_generate.py -q -p no:cacheprovider

# 2. Benchmarks, --json: one line each for bench.jsonl (the human summary is the same numbers).
step decode-7b-bf16 150 python3 benchmarks/decode.py "${DEC7[@]}" --json
step train-1b-bf16 120 python3 benchmarks/train.py "${TRAIN[@]}" --json
step train-1b-bf16-compile 150 python3 benchmarks/train.py "${TRAINC[@]}" --json
step decode-110m-bf16 90 python3 benchmarks/decode.py "${DEC110[@]}" --json
step decode-110m-bf16-compile 120 python3 benchmarks/decode.py "${DEC110[@]}" --compile --json
step decode-7b-bf16-compile 180 python3 benchmarks/decode.py "${DEC7[@]}" --compile --json

nvidia-smi --query-gpu=name,memory.used,memory.total,temperature.gpu,clocks.sm,power.draw --format=csv \
    >"$OUT/metrics.txt" 2>&1
echo "== total $(( $(date +%s) - START )) s" | tee -a "$SUMMARY" "$LOG"
echo; echo "===== summary"; cat "$SUMMARY"
echo "===== bench.jsonl"; cat "$BENCH"
ls -la "$OUT"
