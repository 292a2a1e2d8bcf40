#!/usr/bin/env bash
# The GPU checks of issues 10 and 13 in one call, most important first, each under its own time
# limit so the whole stays inside one 10-minute device command. Not a test.
#   device command (repo root, .venv carried):  . .venv/bin/activate && bash bench/gpu_checks.sh
# Outputs: $OUT (default /tmp/gpu_checks)/*.txt
#   1. paper_scale --gpu, quarter-size batch: CUDA peak per phase next to the memory model (issue 10.8)
#   2. FSDP on the visible GPUs vs DDP/one GPU, fp32 to 1e-5; bf16-mixed FSDP finite  (issue 10.5)
#   3. decode loop vs model.generate vs StaticCache + torch.compile, same outputs     (issue 13.5)
#   4. paper_scale --gpu at the paper's 64 x 8 x (1024 + 2048) tokens, if time is left
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "   rc=$? in $((SECONDS - t0)) s"
  grep -v -i warn "$OUT/$name.txt" | tail -n 14
}
run paper_scale_small 150 python bench/paper_scale.py --gpu --prompts 16 --prompt-len 1024 --response-len 512
run fsdp 120 env OUT="$OUT/fsdp" bash bench/gpu_check_fsdp.sh
run decode 150 python bench/gpu_decode.py
run paper_scale_paper 150 python bench/paper_scale.py --gpu --prompts 64 --prompt-len 1024 --response-len 2048
