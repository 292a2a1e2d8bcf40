#!/usr/bin/env bash
# The prepared GPU check (issue 17): under 8 minutes on one H100 in total, most important first,
# each piece under its own time limit, so one device command of <= 10 minutes holds it. Not a test.
#   device command (repo root, .venv carried):  . .venv/bin/activate && bash bench/gpu_checks.sh
#   CPU smoke run of the same script (tests/test_presets.py runs it):  GPU_CHECKS_CPU_SMOKE=1 bash bench/gpu_checks.sh
# No Hub, no paper data: the Qwen2.5-1.5B architecture with random weights (backbone.init=random).
# Outputs: $OUT (default /tmp/gpu_checks)/<piece>.txt, and a summary on stdout.
#   1. train_qwen (190 s): `python train.py backbone=qwen reward=sup` itself (the paper preset, its
#      startup memory check), 3 rollout batches of 64 prompts x 8 rollouts, prompts 256 + responses
#      512 tokens (EOS off): CUDA peak per phase next to the memory model, step time, decode tokens/s
#   2. train_qwen_fsdp (100 s): the same command under trainer=fsdp on one GPU, 1 rollout batch
#   3. fsdp_equal (80 s): bench/gpu_check_fsdp.sh on one GPU (tiny backbone: FSDP = reference to
#      1e-5 in fp32, bf16-mixed FSDP finite)
#   4. decode (100 s): bench/gpu_decode.py on the Qwen2.5-1.5B shape: engine loop vs
#      model.generate vs StaticCache + torch.compile, tokens/s
#   5. contrastive (60 s): bench/contrastive_memory.py --measure --device cuda: one InfoNCE step
#      of paper_infonce's batch (192 texts x 352 tokens, Qwen2.5-1.5B, 28 layers, GC), CUDA peak
#      next to the memory model's update phase
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
SMOKE=${GPU_CHECKS_CPU_SMOKE:-0}
t_start=$SECONDS
failed=0
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  grep -v -i -E "warn|^\s*$|it/s\]|━|┃|│|┏|┡|└" "$OUT/$name.txt" | tail -n 12
}
if [ "$SMOKE" = "1" ]; then
  # the same pieces at tiny sizes on the CPU: checks that they compose and run, in about a minute
  echo "GPU_CHECKS_CPU_SMOKE=1: CPU smoke run (tiny widths, no CUDA numbers)"
  run train_qwen 240 python bench/gpu_train_check.py --cpu-smoke
  run decode 120 python bench/gpu_decode.py --device cpu --tiny --models qwen1.5b --repeats 1 \
    --compile-mode none  # torch.compile alone takes ~90 s on 2 CPU cores
  run contrastive 120 python bench/contrastive_memory.py --measure --layers 1 --texts 6 \
    --text-len 32
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  run train_qwen 190 python bench/gpu_train_check.py --rollout-batches 3
  run train_qwen_fsdp 100 python bench/gpu_train_check.py --rollout-batches 1 \
    trainer=fsdp trainer.devices=1
  run fsdp_equal 80 env GPUS=1 OUT="$OUT/fsdp" bash bench/gpu_check_fsdp.sh
  run decode 100 python bench/gpu_decode.py --models qwen1.5b --repeats 1
  run contrastive 60 python bench/contrastive_memory.py --measure --device cuda
fi
echo "gpu_checks: $failed piece(s) failed, $((SECONDS - t_start)) s in all; logs in $OUT"
exit "$failed"
