#!/usr/bin/env bash
# GPU check of FSDP (issue 10, item 5). Not a test: run it on a machine with >= 1 NVIDIA GPU.
#   bash bench/gpu_check_fsdp.sh            # all visible GPUs (GPUS=2 to pick fewer)
# 1. fp32: trainer=fsdp and trainer=ddp (trainer=gpu on one GPU) train the tiny backbone 2 steps
#    on the same data; their exports must agree to 1e-5 (FSDP shards per decoder layer, clips
#    over all shards, gathers the export on rank 0).
# 2. bf16-mixed (the GPU default): trainer=fsdp trains, checkpoints and exports finite weights.
# Data: data=shared under GRACE_DATA_ROOT (default ../shared/data); DATA="data=offline" to change.
# CPU equivalent (run by the test suite): tests/test_fsdp.py with trainer=fsdp_cpu (2 gloo processes).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
OUT=${OUT:-/tmp/gpu_check_fsdp}
DATA=${DATA:-"data=shared data.root=${GRACE_DATA_ROOT:-$(pwd)/../shared/data}"}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
if [ "$N" -ge 2 ]; then REF="trainer=ddp"; else REF="trainer=gpu"; fi
# shellcheck disable=SC2206
COMMON=(backbone=tiny reward=sup logger=none $DATA data.max_examples=64
  data.prompts_per_step=2 algo.prompts_per_minibatch=1 rollout.num_generations=3
  rollout.max_new_tokens=6 prompt.max_prompt_tokens=96 optim.lr=1e-3 optim.weight_decay=0
  optim.grad_clip=0.05 reward.truncation=off trainer.max_steps=2 trainer.enable_progress_bar=false
  trainer.devices="$N")
rm -rf "$OUT"
t0=$(date +%s)
python train.py "${COMMON[@]}" trainer=fsdp trainer.precision=32-true hydra.run.dir="$OUT/fsdp32"
python train.py "${COMMON[@]}" $REF trainer.precision=32-true hydra.run.dir="$OUT/ref32"
python train.py "${COMMON[@]}" trainer=fsdp hydra.run.dir="$OUT/fsdp_bf16"
python - "$OUT" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
out = sys.argv[1]
load = lambda d: AutoModelForCausalLM.from_pretrained(f"{out}/{d}/export").state_dict()
fsdp, ref, bf16 = load("fsdp32"), load("ref32"), load("fsdp_bf16")
worst = max((fsdp[k] - ref[k]).abs().max().item() for k in ref)
print(f"fp32 FSDP vs reference: max |diff| = {worst:.3g} (tolerance 1e-5)")
finite = all(torch.isfinite(v).all() for v in bf16.values())
print(f"bf16-mixed FSDP export finite: {finite}")
ckpt = torch.load(f"{out}/fsdp_bf16/checkpoints/last.ckpt", weights_only=False)
print(f"bf16-mixed FSDP checkpoint global_step = {ckpt['global_step']}")
sys.exit(0 if worst <= 1e-5 and finite and ckpt["global_step"] == 2 else 1)
PY
echo "gpu_check_fsdp: OK on $N GPU(s) in $(( $(date +%s) - t0 )) s"
