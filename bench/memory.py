"""Peak memory of one GRACE training step per memory setting, on the embedded default (SmolLM2).

    python bench/memory.py [--groups 2] [--k 4] [--new-tokens 32] [--prompt-tokens 128]
                           [--only full,lora,...]

Every setting runs ``train.py``'s ``train()`` for ONE rollout batch with one optimiser step, in
its own subprocess, so each peak is its own. Reported per setting:

- loaded (GB): RSS when fit starts (model, tokenizer, data loaded);
- rollout / update (GB): the RSS high-water mark during ``GraceModule.rollout`` (sampling and
  pooling) and ``GraceModule.update`` (loss pass, backward, optimiser step), each reset through
  ``/proc/self/clear_refs`` (Linux);
- fit peak (GB): the high-water mark from fit start; process (GB): over the whole process;
- CUDA roll / upd / fit (GB): ``torch.cuda.max_memory_allocated`` likewise (GPU runs only);
- fit s: wall time of the fit.

Settings: full fine-tuning fp32 with the shared-prompt loss pass (default), without it
(``algo.share_prompt=false``), with gradient checkpointing, LoRA (default dropout 0.05, and 0),
LoRA + gradient checkpointing;
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
    "lora-nodrop": (["peft=lora", "peft.lora_dropout=0"], False, "LoRA, lora_dropout=0"),
    "lora-gc": (["peft=lora", "model.gradient_checkpointing=true"], False, "LoRA + grad ckpt"),
    "bf16": (["trainer=gpu"], True, "full FT, bf16-mixed autocast (fp32 master weights)"),
    "fsdp-offload": (
        ["trainer=fsdp_offload", "trainer.devices=1"],
        True,
        "FSDP, params/grads/optimizer offloaded to CPU",
    ),
}


# glibc: tensors over 64 KiB get their own mmap, so freed memory leaves RSS at once and the
# high-water marks follow live tensors rather than the allocator's free lists (without it the
# same setting varied by +-0.3 GB from run to run here)
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}


def rss_gb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


class Peaks:
    """RSS and CUDA high-water marks per phase: ``start(phase)`` resets them (after folding the
    current marks into the running fit maximum), ``stop(phase)`` reads them."""

    def __init__(self):
        self.result: dict = {}
        self.fit_rss = self.fit_cuda = 0.0

    def _fold(self):
        import torch

        self.fit_rss = max(self.fit_rss, rss_gb("VmHWM") or 0.0)
        if torch.cuda.is_available():
            self.fit_cuda = max(self.fit_cuda, torch.cuda.max_memory_allocated() / 1024**3)

    def start(self, phase: str) -> None:
        import torch

        self._fold()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux)
        except OSError:
            self.result["hwm_reset"] = False
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.result[f"t_{phase}"] = time.perf_counter()

    def stop(self, phase: str) -> None:
        import torch

        self.result[f"{phase}_s"] = time.perf_counter() - self.result.pop(f"t_{phase}")
        self.result[f"{phase}_rss_gb"] = rss_gb("VmHWM")
        if torch.cuda.is_available():
            self.result[f"{phase}_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        self._fold()


PEAKS = Peaks()


class PeakMemory(L.Callback):
    """Peaks from fit start (model loaded) to fit end, and per phase of the training step."""

    def on_fit_start(self, trainer, pl_module):
        PEAKS.result["rss_at_fit_start_gb"] = rss_gb("VmRSS")
        PEAKS.fit_rss = PEAKS.fit_cuda = 0.0
        PEAKS.start("fit")
        PEAKS.fit_rss = 0.0  # from here on only

    def on_fit_end(self, trainer, pl_module):
        PEAKS.stop("fit")
        PEAKS.result["fit_rss_gb"] = PEAKS.fit_rss
        if PEAKS.fit_cuda:
            PEAKS.result["fit_cuda_gb"] = PEAKS.fit_cuda


def watch_phases() -> None:
    """Measure GraceModule.rollout (sampling + pooling) and .update (loss pass + step) apart."""
    from grace_lightning.module import GraceModule

    def wrap(fn, phase):
        def wrapped(*args, **kwargs):
            PEAKS.start(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                PEAKS.stop(phase)

        return wrapped

    GraceModule.rollout = wrap(GraceModule.rollout, "rollout")
    GraceModule.update = wrap(GraceModule.update, "update")


def compose(args, setting: str, out_dir: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    overrides = [
        "experiment=none",  # the group defaults, not the quickstart preset
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

    # checkpoints of a run are not part of the measurement: the directory goes with the run
    with tempfile.TemporaryDirectory(prefix="bench-memory-", ignore_cleanup_errors=True) as out:
        cfg = compose(args, setting, out)
        watch_phases()
        train(cfg)
    result = dict(PEAKS.result)
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
    cols = [  # (header, result key, format)
        ("loaded", "rss_at_fit_start_gb", ".2f"),
        ("rollout", "rollout_rss_gb", ".2f"),
        ("update", "update_rss_gb", ".2f"),
        ("fit peak", "fit_rss_gb", ".2f"),
        ("process", "peak_rss_gb", ".2f"),
    ]
    if cuda:
        cols += [
            ("CUDA roll", "rollout_cuda_gb", ".2f"),
            ("CUDA upd", "update_cuda_gb", ".2f"),
            ("CUDA fit", "fit_cuda_gb", ".2f"),
        ]
    cols += [("fit s", "fit_s", ".1f")]
    width = 10 * len(cols)
    print(f"{'setting':14s}" + "".join(f"{h:>10s}" for h, _, _ in cols) + "  what")
    for name in names:
        overrides, gpu_only, what = SETTINGS[name]
        if gpu_only and not cuda:
            print(f"{name:14s}{'GPU-only: skipped (no CUDA)':>{width}s}  {what}")
            continue
        cmd = [sys.executable, __file__, "--setting", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            err = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            print(f"{name:14s}{'FAILED: ' + err[0][:60]:>{width}s}  {what}")
            continue
        r = json.loads(line[-1][7:])
        print(f"{name:14s}" + "".join(f"{fmt(r.get(k), f):>10s}" for _, k, f in cols) + f"  {what}")
    print(
        "RSS in GB (2**30 bytes). loaded: at fit start (model + data loaded); rollout / update: "
        "high-water mark during GraceModule.rollout (sampling + pooling) / .update (loss pass, "
        "backward, optimiser step); fit peak: from fit start; process: whole process. "
        "fit s: wall time of the fit (noisy on shared machines)."
    )


if __name__ == "__main__":
    main()
