#!/usr/bin/env bash
# bench/paper_scale.py --gpu on one 80 GB GPU: a Qwen2.5-1.5B-shaped model (random weights, EOS
# off), one paper_sup rollout batch, step time / rollout tokens/s / CUDA peak per phase next to the
# memory model's prediction. First a quarter-size batch (~1-2 min), then the paper's
# 64 prompts x 8 rollouts, prompts 1024 + responses 2048 tokens (a few minutes on an H100).
# Device command (repo root):  bash bench/gpu_paper_scale.sh   (output also in $OUT if set)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python bench/paper_scale.py --gpu --prompts 16 --prompt-len 1024 --response-len 512 \
  2>&1 | tee "$out/paper_scale_gpu_small.txt" | grep -v -i warn | tail -n 12
python bench/paper_scale.py --gpu --prompts 64 --prompt-len 1024 --response-len 2048 \
  2>&1 | tee "$out/paper_scale_gpu_paper.txt" | grep -v -i warn | tail -n 12
