#!/usr/bin/env bash
# GPU check of FSDP (issues 10 and 17). Not a test: run it on a machine with >= 1 NVIDIA GPU.
#   bash bench/gpu_check_fsdp.sh            # all visible GPUs (GPUS=2 to pick fewer)
#   FSDP_CHECK_CPU=1 bash bench/gpu_check_fsdp.sh   # the same on CPU: 2 gloo processes (~3 min)
# 1. fp32: trainer=fsdp and trainer=ddp (trainer=gpu on one GPU) train the tiny backbone 2 steps
#    on the same data; their exports must agree to 1e-5 (FSDP shards per decoder layer, clips
#    over all shards, gathers the export on rank 0). At the first rollout every parameter and
#    buffer is on the rank's root device (the parts FSDP ignores: embeddings, LM head, norm).
# 2. bf16-mixed (the GPU default), with the dev evaluation at train start (layer units run
#    before the root's first forward): trainer=fsdp trains, checkpoints and exports finite
#    weights; its FSDP units compute in bf16 and reduce gradients / keep buffers in fp32.
# 3. lockstep (>= 2 GPUs): rank 0's rows all end at EOS after 2 tokens in one sub-batch, rank 1
#    ignores EOS and samples in sub-batches of 3 rows; the run must finish (a hang is killed
#    after 240 s) and each rank's first rollouts must equal an unsharded model's.
# Data: data=shared under GRACE_DATA_ROOT (default ../shared/data); DATA="data=offline" to change.
# bench/gpu_checks.sh runs it with GPUS=1 (steps 1-2, ~60 s on one H100).
# CPU tests of the same: tests/test_fsdp.py, tests/test_fsdp_lockstep.py (trainer=fsdp_cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_fsdp}
DATA=${DATA:-"data=shared data.root=${GRACE_DATA_ROOT:-$(pwd)/../shared/data}"}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
if [ "${FSDP_CHECK_CPU:-0}" = "1" ]; then
  N=2 FSDP="trainer=fsdp_cpu" REF="trainer=ddp_cpu"
  export OMP_NUM_THREADS=1
else
  N=${GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
  FSDP="trainer=fsdp"
  if [ "$N" -ge 2 ]; then REF="trainer=ddp"; else REF="trainer=gpu"; fi
fi
# shellcheck disable=SC2206
COMMON=(experiment=none backbone=tiny reward=sup logger=none $DATA data.max_examples=64
  data.prompts_per_step=$((2 * N)) algo.prompts_per_minibatch="$N" rollout.num_generations=3
  rollout.max_new_tokens=6 prompt.max_prompt_tokens=96 optim.lr=1e-3 optim.weight_decay=0
  optim.grad_clip=0.05 reward.truncation=off trainer.max_steps=2 trainer.enable_progress_bar=false
  trainer.devices="$N")
rm -rf "$OUT"
mkdir -p "$OUT"
# train.py with a probe: each rank saves its first rollout's inputs/outputs and where every
# parameter/buffer is; FSDP_CHECK_SKEW=1 makes rank 0 stop early and rank 1 run to the end
cat > "$OUT/entry.py" <<'PY'
import os, torch
from grace_lightning.module import GraceModule
from grace_lightning.rollout.engine import HFRolloutEngine

rank = int(os.environ.get("LOCAL_RANK", "0"))
out_dir, skew = os.environ["FSDP_CHECK_OUT"], os.environ.get("FSDP_CHECK_SKEW") == "1"
rollout, generate = GraceModule.rollout, HFRolloutEngine.generate
probe = {}

def patched_rollout(self, batch):
    if not probe:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        root = self.trainer.strategy.root_device
        tensors = [*self.named_parameters(remove_duplicate=False), *self.named_buffers()]
        units = [m for m in self.trainer.strategy.model.modules() if isinstance(m, FSDP)]
        mp = [str(u.mixed_precision) for u in units[:1]]
        probe.update(root=str(root), elsewhere=[n for n, t in tensors if t.device != root],
                     units=len(units), mixed_precision=mp)
        if skew and rank == 0:  # the LM head's 2nd call (decode step 1) ends every row
            eos, calls = self.engine.eos_ids, [0]
            def bias(module, inputs, out):
                calls[0] += 1
                if calls[0] != 2:
                    return out
                out = out.clone()
                out[..., eos] += 100.0
                return out
            self.policy.get_output_embeddings().register_forward_hook(bias)
        elif skew:
            self.engine.ignore_eos, self.engine.max_rows_per_batch = True, 3
    return rollout(self, batch)

def recording(self, prompt_ids, num_samples=1, temperature=1.0, system_len=0, generator=None,
              seeds=None, progress=None):
    out = generate(self, prompt_ids, num_samples, temperature, system_len, generator, seeds,
                   progress)
    if "root" in probe and "generate" not in probe:  # a training rollout (not the dev eval's)
        probe["generate"] = dict(
            prompt_ids=prompt_ids, num_samples=num_samples, temperature=temperature,
            system_len=system_len, seeds=seeds, sub_batches=len(self.last_plan),
            engine=dict(max_new_tokens=self.max_new_tokens, ignore_eos=self.ignore_eos,
                        max_rows_per_batch=self.max_rows_per_batch),
            response_ids=out.response_ids.cpu(), pooled=out.pooled.cpu())
        torch.save(probe, f"{out_dir}/rank{rank}.pt")
    return out

GraceModule.rollout, HFRolloutEngine.generate = patched_rollout, recording
train_py = os.path.abspath("train.py")  # as __main__; Lightning relaunches this file per rank
exec(compile(open(train_py).read(), train_py, "exec"), {"__name__": "__main__", "__file__": train_py})
PY
probe() {  # run dir, overrides...: train.py through the probe
  local dir=$1; shift
  mkdir -p "$OUT/$dir"
  # timeout signals its whole process group: Lightning's rank processes too
  FSDP_CHECK_OUT="$OUT/$dir" timeout -s KILL "${RUN_LIMIT:-240}" \
    python "$OUT/entry.py" "$@" hydra.run.dir="$OUT/$dir"
}
t0=$(date +%s)
probe fsdp32 "${COMMON[@]}" $FSDP trainer.precision=32-true
python train.py "${COMMON[@]}" $REF trainer.precision=32-true hydra.run.dir="$OUT/ref32"
# + the dev evaluation at train start: layer units run before the root's first forward
probe fsdp_bf16 "${COMMON[@]}" $FSDP trainer.precision=bf16-mixed dev=default \
  callbacks.dev_eval.max_samples=16 callbacks.dev_eval.every_n_rollout_batches=0
SKEW=0
if [ "$N" -ge 2 ]; then
  SKEW=1
  FSDP_CHECK_SKEW=1 probe skew "${COMMON[@]}" $FSDP trainer.precision=32-true \
    || { echo "lockstep: the run with ranks ending at different steps failed or hung"; exit 1; }
fi
python - "$OUT" "$N" "$SKEW" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
out, n, skew = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
load = lambda d: AutoModelForCausalLM.from_pretrained(f"{out}/{d}/export").state_dict()
fsdp, ref, bf16 = load("fsdp32"), load("ref32"), load("fsdp_bf16")
ok = True
def check(name, good, detail=""):
    global ok
    ok &= bool(good)
    print(f"{'OK  ' if good else 'FAIL'} {name} {detail}")
worst = max((fsdp[k] - ref[k]).abs().max().item() for k in ref)
check("fp32 FSDP export = reference", worst <= 1e-5, f"(max |diff| = {worst:.3g}, tolerance 1e-5)")
check("bf16-mixed FSDP export finite", all(torch.isfinite(v).all() for v in bf16.values()))
ckpt = torch.load(f"{out}/fsdp_bf16/checkpoints/last.ckpt", weights_only=False)
check("bf16-mixed FSDP checkpoint at step 2", ckpt["global_step"] == 2)
for r in range(n):
    p = torch.load(f"{out}/fsdp32/rank{r}.pt", weights_only=False)
    check(f"rank {r}: every parameter/buffer on {p['root']}", not p["elsewhere"],
          str(p["elsewhere"][:6]))
mp = torch.load(f"{out}/fsdp_bf16/rank0.pt", weights_only=False)["mixed_precision"]
want = "param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32"
check("bf16-mixed FSDP units: bf16 compute, fp32 reduce and buffers", mp and want in mp[0], str(mp))
if skew:
    from grace_lightning.models.backbone import BackboneConfig, load_backbone
    from grace_lightning.rollout.engine import HFRolloutEngine
    for r in range(n):
        rec = torch.load(f"{out}/skew/rank{r}.pt", weights_only=False)["generate"]
        model, tok = load_backbone(BackboneConfig(name="tiny", source="tiny"))
        device = torch.device("cuda", r) if torch.cuda.is_available() else torch.device("cpu")
        model = model.to(device).eval()
        engine = HFRolloutEngine(model, tok, **rec["engine"])
        handle = None
        if r == 0:
            calls = [0]
            def bias(module, inputs, o, eos=engine.eos_ids):
                calls[0] += 1
                if calls[0] != 2:
                    return o
                o = o.clone()
                o[..., eos] += 100.0
                return o
            handle = model.get_output_embeddings().register_forward_hook(bias)
        want = engine.generate(rec["prompt_ids"], rec["num_samples"], rec["temperature"],
                               rec["system_len"], seeds=rec["seeds"])
        if handle is not None:
            handle.remove()
        same = torch.equal(rec["response_ids"], want.response_ids.cpu())
        gap = (rec["pooled"] - want.pooled.cpu()).abs().max().item() if same else float("inf")
        check(f"lockstep rank {r}: rollouts = unsharded model's", same and gap <= 1e-4,
              f"({rec['response_ids'].shape[1]} tokens, {rec['sub_batches']} sub-batches, "
              f"max |pooled diff| {gap:.2g})")
else:
    print("skip lockstep: needs >= 2 GPUs (tests/test_fsdp_lockstep.py runs it on CPU)")
sys.exit(0 if ok else 1)
PY
echo "gpu_check_fsdp: OK on $N device(s) in $(( $(date +%s) - t0 )) s"
