#!/usr/bin/env bash
# One GPU session (an H200): LoRA / QLoRA fine-tuning against PEFT on a 7B-shaped model with random
# weights (bf16, seq 2048), then a PPO-with-LoRA iteration timing on the same shape; ~9 minutes.
#
#   bash benchmarks/gpu_lora_session.sh        # from anywhere; SMOKE=1 checks the script on a CPU in ~2 min
#
# Writes to benchmarks/results/gpu-lora-<UTC time>/ (and copies it to $OUT when $OUT is set: the
# device machine hands back only $OUT):
#   session.log            everything printed (environment, every step)
#   summary.txt            one line per step: name, exit code, seconds
#   finetune-cuda.json/.md the fine-tuning table (benchmarks/finetune.py)
#   finetune-ppo-cuda.json/.md  PPO with LoRA: generation / scoring / training seconds per iteration
#   bench.jsonl            each step's --json line
# Disk: the fine-tuning model directory (13.5 GB, bf16) is deleted before PPO writes its two
# (policy and reward model, 27 GB). peft-qlora (bitsandbytes) is replaced by peft-qlora-torchao when
# bitsandbytes does not import; full fine-tuning runs last (pure bf16: ~54 GB of weights, gradients
# and AdamW moments plus activations; an out-of-memory is reported as "oom", not a failure of the rest).
# Nothing is installed.

set -u
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
DEST="${DEST:-benchmarks/results/gpu-lora-$STAMP}"
BUDGET_S="${BUDGET_S:-560}"
PY="${PYTHON:-python3}"   # the interpreter with torch (PYTHON=.venv/bin/python for a local SMOKE run)
mkdir -p "$DEST"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LOG="$DEST/session.log" SUMMARY="$DEST/summary.txt" BENCH="$DEST/bench.jsonl"
: >"$LOG"; : >"$SUMMARY"; : >"$BENCH"
SCRATCH="$(mktemp -d)"
finish() {
    rm -rf "$SCRATCH"
    if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT" && cp -r "$DEST"/. "$OUT"/; fi
}
trap finish EXIT
START=$(date +%s)

# step NAME LIMIT_S CMD...: run CMD under `timeout` (cut to what is left of BUDGET_S), output to the
# console and session.log; JSON lines it prints go to bench.jsonl; a summary line records rc and time.
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    (( limit > left )) && limit=$left
    if (( limit < 30 )); then
        printf '%-24s SKIPPED (%ss of the budget left)\n' "$name" "$left" | tee -a "$SUMMARY" "$LOG"
        return
    fi
    printf '\n===== %s (limit %ss) : %s\n' "$name" "$limit" "$*" | tee -a "$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$SCRATCH/step.out" 2>&1
    rc=$?
    # the JSON line is long: it goes to bench.jsonl, not to the console
    grep -v -E '^\{.*\}$' "$SCRATCH/step.out" | tee -a "$LOG"
    grep -E '^\{.*\}$' "$SCRATCH/step.out" | sed "s/^{/{\"step\": \"$name\", /" >>"$BENCH"
    local note=""; (( rc == 124 || rc == 137 )) && note=" (TIMED OUT)"
    printf '%-24s rc=%-3s %6ss%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note" | tee -a "$SUMMARY" "$LOG"
}

# The GPU image has torch, transformers and peft but no internet: torchao (QLoRA's NF4) comes as a
# wheel (git-ignored; name benchmarks/wheels in the device run's carry). Before the session, here:
#   pip download --no-deps torchao -d benchmarks/wheels
if ! "$PY" -c "import torchao" >/dev/null 2>&1; then
    for whl in benchmarks/wheels/torchao-*.whl; do
        [[ -f "$whl" ]] && "$PY" -m pip install -q --no-deps "$whl" 2>&1 | tail -2 | tee -a "$LOG"
    done
fi

{
    echo "== $(date -u +%FT%TZ) $(hostname)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
    df -h "${TMPDIR:-/tmp}" | tail -1
    "$PY" - <<'EOF'
import platform
import torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available(),
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for mod in ("peft", "torchao", "bitsandbytes"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "NOT importable:", type(e).__name__, e)
EOF
} 2>&1 | tee -a "$LOG"

# The PEFT QLoRA peer: bitsandbytes' NF4 (PEFT's usual QLoRA) when it imports, else PEFT over torchao's
# NF4 (the same base format as ours). Both when ALL_PEERS=1 (~1 minute more).
if "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
    CONFIGS="lora,peft-lora,qlora,peft-qlora,full"
    [[ "${ALL_PEERS:-0}" == 1 ]] && CONFIGS="lora,peft-lora,qlora,peft-qlora,peft-qlora-torchao,full"
else
    CONFIGS="lora,peft-lora,qlora,peft-qlora-torchao,full"
    echo "bitsandbytes not importable: peft-qlora (PEFT over bitsandbytes NF4) skipped; the PEFT QLoRA peer is" \
         "peft-qlora-torchao (PEFT over torchao's NF4, the same base format as ours)" | tee -a "$LOG" "$SUMMARY"
fi

# Sizes. SMOKE=1: tiny shapes on the CPU, to check this script itself.
FT=(--device cuda --preset 7b --weights-dtype bf16 --seq-len 2048 --micro-batch-size 2 --steps 3 --warmup 1
    --timeout 110)
PPO=(--ppo --device cuda --preset 7b --weights-dtype bf16 --ppo-iterations 2 --ppo-batch 16 --ppo-minibatch 4
     --ppo-new-tokens 64 --model-dir "$SCRATCH/ppo")
FT_LIMIT=310 PPO_LIMIT=240
if [[ "${SMOKE:-0}" == 1 ]]; then
    FT=(--device cpu --preset tiny --seq-len 32 --micro-batch-size 2 --steps 1 --warmup 1 --timeout 60)
    PPO=(--ppo --preset tiny --ppo-iterations 1 --ppo-batch 2 --ppo-minibatch 1 --ppo-new-tokens 4
         --model-dir "$SCRATCH/ppo")
    FT_LIMIT=200 PPO_LIMIT=100
fi
FT_OUT="$DEST/finetune-cuda" PPO_OUT="$DEST/finetune-ppo-cuda"
[[ "${SMOKE:-0}" == 1 ]] && FT_OUT="$DEST/finetune-smoke" PPO_OUT="$DEST/finetune-ppo-smoke"

# 1. Fine-tuning: ours full / LoRA / QLoRA vs PEFT, each configuration in its own process
#    (torch.cuda.max_memory_allocated per configuration); the table is rewritten after each one, so a
#    step cut short keeps what it measured. The model directory is deleted when the step ends.
step finetune-7b-lora "$FT_LIMIT" "$PY" benchmarks/finetune.py "${FT[@]}" --configs "$CONFIGS" \
    --model-dir "$SCRATCH/ft" --out "$FT_OUT" --json
rm -rf "$SCRATCH/ft"   # 13.5 GB, also when the step was cut short
# 2. PPO with LoRA: five roles on the GPU (policy + reference = adapters off, value, two reward models).
mkdir -p "$SCRATCH/ppo"
step ppo-7b-lora "$PPO_LIMIT" "$PY" benchmarks/finetune.py "${PPO[@]}" --out "$PPO_OUT" --json
rm -rf "$SCRATCH/ppo"

nvidia-smi --query-gpu=name,memory.used,memory.total,temperature.gpu,power.draw --format=csv \
    >>"$LOG" 2>&1 || true
echo "== total $(( $(date +%s) - START )) s" | tee -a "$SUMMARY" "$LOG"
echo; echo "===== summary"; cat "$SUMMARY"
for f in "$FT_OUT.md" "$PPO_OUT.md"; do [[ -f "$f" ]] && { echo "===== $f"; cat "$f"; }; done
ls -la "$DEST"
