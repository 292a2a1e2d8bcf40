"""Peak memory of one GRACE training step per memory setting, on the embedded default (SmolLM2).

    python bench/memory.py [--groups 2] [--k 4] [--new-tokens 32] [--prompt-tokens 128]
                           [--only full,lora,...]

Every setting runs ``train.py``'s ``train()`` for ONE rollout batch with one optimiser step, in
its own subprocess, so each peak is its own. Reported per setting:

- loaded (GB): RSS when fit starts (model, tokenizer, data loaded);
- fit peak (GB): the RSS high-water mark from ``on_fit_start`` on (reset through
  ``/proc/self/clear_refs``; Linux only): rollout + loss pass + optimiser step;
- peak RSS (GB): the process high-water mark over its whole life (model load included);
- CUDA peak (GB): ``torch.cuda.max_memory_allocated`` during fit (GPU runs only);
- step (s): wall time of the fit.

Settings: full fine-tuning fp32 with the shared-prompt loss pass (default), without it
(``algo.share_prompt=false``), with gradient checkpointing, LoRA, LoRA + gradient checkpointing;
on a GPU also bf16-mixed and FSDP with CPU offload (rows marked GPU-only elsewhere). Shapes are
fixed (EOS ignored) so every setting does the same work. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (overrides, GPU only?, what it is)
SETTINGS: dict[str, tuple[list[str], bool, str]] = {
    "full": ([], False, "full fine-tuning, fp32, shared-prompt loss pass"),
    "full-noshare": (["algo.share_prompt=false"], False, "... share_prompt=false"),
    "full-gc": (["model.gradient_checkpointing=true"], False, "... + gradient checkpointing"),
    "lora": (["peft=lora"], False, "LoRA r=16 (attention + MLP)"),
    "lora-gc": (["peft=lora", "model.gradient_checkpointing=true"], False, "LoRA + grad ckpt"),
    "bf16": (["trainer=gpu"], True, "full FT, bf16-mixed autocast (fp32 master weights)"),
    "fsdp-offload": (
        ["trainer=fsdp_offload", "trainer.devices=1"],
        True,
        "FSDP, params/grads/optimizer offloaded to CPU",
    ),
}


def rss_gb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


class PeakMemory(L.Callback):
    """Resets the RSS / CUDA high-water marks when fit starts and reads them when it ends."""

    result: dict = {}

    def on_fit_start(self, trainer, pl_module):
        import torch

        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            PeakMemory.result["hwm_reset"] = True
        except OSError:
            PeakMemory.result["hwm_reset"] = False
        PeakMemory.result["rss_at_fit_start_gb"] = rss_gb("VmRSS")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        PeakMemory.result["t0"] = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        import torch

        r = PeakMemory.result
        r["step_s"] = time.perf_counter() - r.pop("t0")
        r["fit_peak_rss_gb"] = rss_gb("VmHWM") if r["hwm_reset"] else None
        if torch.cuda.is_available():
            r["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
            r["cuda_reserved_gb"] = torch.cuda.max_memory_reserved() / 1024**3


def compose(args, setting: str, out_dir: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    overrides = [
        "backbone=smollm2",
        "reward=sup",
        f"data.prompts_per_step={args.groups}",
        f"algo.prompts_per_minibatch={args.groups}",  # one optimiser step
        f"rollout.num_generations={args.k}",
        f"rollout.max_new_tokens={args.new_tokens}",
        "rollout.ignore_eos=true",  # fixed shape: every setting does the same work
        f"prompt.max_prompt_tokens={args.prompt_tokens}",
        "trainer.max_steps=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "callbacks=none",
        "+callbacks.peak._target_=__main__.PeakMemory",
        "model.logging_cfg.table_every_n_steps=0",
        f"paths.output_dir={out_dir}",
        *SETTINGS[setting][0],
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = out_dir
    HydraConfig().set_config(cfg)
    return cfg


def run_setting(args, setting: str) -> dict:
    from grace_lightning.train import train

    cfg = compose(args, setting, tempfile.mkdtemp(prefix="bench-memory-"))
    train(cfg)
    result = dict(PeakMemory.result)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return result


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=2, help="policy prompts (triplets) per step")
    p.add_argument("--k", type=int, default=4, help="rollouts per prompt")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--only", default=None, help="comma-separated settings (default: all)")
    p.add_argument("--setting", default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.setting:
        print("RESULT " + json.dumps(run_setting(args, args.setting)))
        return

    import torch

    cuda = torch.cuda.is_available()
    names = args.only.split(",") if args.only else list(SETTINGS)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    print(
        f"device: {device}; backbone=smollm2 (SmolLM2-135M-Instruct); {args.groups} triplets x "
        f"{args.k} rollouts x {args.new_tokens} new tokens, prompts <= {args.prompt_tokens} "
        f"tokens; 1 optimiser step"
    )
    header = f"{'setting':14s}{'loaded':>9s}{'fit peak':>10s}{'peak RSS':>10s}{'CUDA peak':>11s}{'step s':>8s}  "
    print(header + "what")
    for name in names:
        overrides, gpu_only, what = SETTINGS[name]
        if gpu_only and not cuda:
            print(f"{name:14s}{'GPU-only: skipped (no CUDA)':>48s}  {what}")
            continue
        cmd = [sys.executable, __file__, "--setting", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            err = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            print(f"{name:14s}{'FAILED: ' + err[0][:60]:>48s}  {what}")
            continue
        r = json.loads(line[-1][7:])
        print(
            f"{name:14s}{fmt(r.get('rss_at_fit_start_gb')):>9s}"
            f"{fmt(r.get('fit_peak_rss_gb')):>10s}{fmt(r['peak_rss_gb']):>10s}"
            f"{fmt(r.get('cuda_peak_gb')):>11s}{fmt(r['step_s'], '.1f'):>8s}  {what}"
        )
    print(
        "GB = 2**30 bytes. loaded: RSS at fit start (model + data loaded); fit peak: high-water "
        "mark from fit start; peak RSS: whole process. step s: wall time of the fit (noisy on "
        "shared machines)."
    )


if __name__ == "__main__":
    main()
