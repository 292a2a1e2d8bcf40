"""FSDP (``trainer=fsdp``): per-decoder-layer sharding, CPU (gloo) support, full-state-dict export.

``GraceFSDPStrategy`` runs on CPU with 2 gloo processes here. A small LightningModule around
the tiny backbone (the same backbone, wrap policy and ``ExportPolicy`` as ``train.py``) trains
2 SGD steps under FSDP and must end with the weights of one process taking the same 2 steps on
the concatenated batches; the exported model must hold those weights.

``GraceModule`` (rollouts, several backward/step calls inside one ``training_step``, which
Lightning runs inside the FSDP root's forward) trains under ``trainer=fsdp_cpu`` to the same
weights as under ``trainer=ddp_cpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import hydra
import pytest
import torch

from grace_lightning.config import validate

from .conftest import DATA_ROOT, ROOT
from .test_train import make_cfg

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, lightning as L
    from torch.utils.data import DataLoader, TensorDataset
    from grace_lightning.callbacks.export import ExportPolicy
    from grace_lightning.models.backbone import BackboneConfig, load_backbone
    from grace_lightning.utils.fsdp import GraceFSDPStrategy, full_state_dict

    torch.set_num_threads(1)
    out = sys.argv[1]

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.policy, self.tokenizer = load_backbone(BackboneConfig(name="tiny", source="tiny"))
            self.peft_cfg = {}

        def training_step(self, batch, batch_idx):
            ids = batch[0]  # (2, 12) per rank
            return self.policy(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self):  # rank r: rows r, r+2, ... in order
            return DataLoader(TensorDataset(ids[self.global_rank :: 2]), batch_size=2)

        def export(self, directory):
            self.policy.save_pretrained(directory)
            return directory

    class Probe(L.Callback):
        def on_train_end(self, trainer, pl_module):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            units = [m for m in trainer.strategy.model.modules() if isinstance(m, FSDP)]
            replicated = {id(p) for p in trainer.strategy.replicated}
            params = list(trainer.strategy.model.parameters())
            local = sum(p.numel() for p in params if id(p) not in replicated)
            whole = sum(p.numel() for p in trainer.strategy.replicated)
            full = full_state_dict(trainer)  # collective: every rank
            if trainer.is_global_zero:
                torch.save(full, f"{out}/full.pt")
            json.dump(
                {"units": len(units), "local_numel": local, "replicated_numel": whole,
                 "layer_classes": sorted(c.__name__ for c in trainer.strategy.layer_classes)},
                open(f"{out}/rank{trainer.global_rank}.json", "w"),
            )

    ids = torch.arange(8 * 12).reshape(8, 12) % 500 + 5
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=GraceFSDPStrategy(state_dict_type="full"),
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[Probe(), ExportPolicy(f"{out}/export")],
    )
    trainer.fit(LM())
    """
)


def test_fsdp_on_cpu_shards_per_layer_trains_like_one_process_and_exports(tmp_path):
    script = tmp_path / "fsdp_probe.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    # reference: one process, the two ranks' rows of each step in one batch (rank r reads
    # rows r, r+2, ...; the mean over 4 equal-length rows equals the average of the two
    # ranks' means, which is what FSDP's reduce-scatter averages)
    torch.manual_seed(0)
    model, _ = load_backbone(BackboneConfig(name="tiny", source="tiny"))
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.arange(8 * 12).reshape(8, 12) % 500 + 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(2):
        rows = ids[4 * step : 4 * step + 4]
        model(input_ids=rows, labels=rows).loss.backward()
        opt.step()
        opt.zero_grad()
    want = model.state_dict()

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    n_layers = model.config.num_hidden_layers
    layers = sum(p.numel() for p in model.model.layers.parameters())
    for info in ranks:
        assert info["layer_classes"] == ["LlamaDecoderLayer"]
        assert info["units"] == 1 + n_layers  # the root + one unit per decoder layer
        # the decoder layers are sharded: each rank holds half of them (+ padding); the rest
        # (embeddings = tied LM head, final norm) is whole on every rank
        assert layers // 2 <= info["local_numel"] <= layers // 2 + 64
        assert info["replicated_numel"] == total - layers

    full = torch.load(tmp_path / "full.pt")
    gathered = {k[len("policy.") :]: v for k, v in full.items() if k.startswith("policy.")}
    assert set(want) <= set(gathered) | {"lm_head.weight"}
    moved = 0
    for key, value in want.items():
        got = gathered.get(key, gathered.get("model.embed_tokens.weight"))
        torch.testing.assert_close(got, value, atol=2e-5, rtol=1e-4, msg=key)
        moved += int(not torch.equal(value, before[key]))
    assert moved >= 10  # the steps changed the weights (so the comparison means something)

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").state_dict()
    for key, value in want.items():
        torch.testing.assert_close(exported[key], value, atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("trainer", ["fsdp", "fsdp_offload", "fsdp_cpu"])
def test_fsdp_configs_build_the_grace_strategy(trainer, tmp_path):
    from grace_lightning.utils.fsdp import GraceFSDPStrategy

    cfg = make_cfg([f"trainer={trainer}", "backbone=tiny"], tmp_path)
    validate(cfg)
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, GraceFSDPStrategy)
    assert strategy.auto_wrap == "decoder_layer" and strategy._state_dict_type == "full"
    assert strategy.cpu_offload.offload_params == (trainer == "fsdp_offload")
    if trainer == "fsdp_cpu":  # Lightning accepts it with a CPU accelerator (2 processes)
        from grace_lightning.train import build_trainer

        built = build_trainer(cfg, [], [])
        assert built.strategy is not None and built.num_devices == 2


def test_decoder_layer_classes_from_config_and_model(tiny_backbone):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from grace_lightning.models.backbone import BackboneConfig, decoder_layer_classes

    assert decoder_layer_classes(BackboneConfig(name="tiny", source="tiny")) == {LlamaDecoderLayer}
    assert decoder_layer_classes(tiny_backbone[0]) == {LlamaDecoderLayer}


GRACE_CLI = [
    "experiment=none",  # the group defaults, not the quickstart job
    "backbone=tiny",
    "reward=sup",
    "logger=none",
    "trainer.max_steps=2",  # one rollout batch of 2 optimiser steps per rank
    "data=shared",
    f"data.root={DATA_ROOT}",
    "data.max_examples=64",
    "data.prompts_per_step=2",
    "algo.prompts_per_minibatch=1",
    "algo.micro_batch_size=1",  # 3 backward passes per optimiser step: accumulation
    "rollout.num_generations=3",
    "rollout.max_new_tokens=6",
    "prompt.max_prompt_tokens=96",
    "optim.lr=1e-3",
    "optim.weight_decay=0",
    "optim.grad_clip=0.05",  # binding (the norm is ~0.2): needs the global norm over all shards
    "reward.truncation=off",
    "trainer.enable_progress_bar=false",
]


def test_grace_module_under_fsdp_cpu_equals_ddp(tmp_path):
    """The real training loop (rollouts, rewards, 2 optimiser steps per rollout batch of 3
    micro-batch backward passes each, a binding clip, export, checkpoint) under
    trainer=fsdp_cpu ends with the weights of trainer=ddp_cpu on the same data: FSDP shards
    (and accumulates sharded gradients), DDP replicates (no_sync), the maths is the same."""
    from transformers import AutoModelForCausalLM

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for trainer in ("fsdp_cpu", "ddp_cpu"):
        cmd = [sys.executable, "train.py", *GRACE_CLI, f"trainer={trainer}"]
        cmd.append(f"hydra.run.dir={tmp_path / trainer}")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    fsdp = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp_cpu" / "export").state_dict()
    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp_cpu" / "export").state_dict()
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    start = load_backbone(BackboneConfig(name="tiny", source="tiny"))[0].state_dict()
    assert set(fsdp) == set(ddp)
    for key in ddp:
        # AdamW normalises each step: 1e-3 per step; agreement to 2e-6 is the same update
        torch.testing.assert_close(fsdp[key], ddp[key], atol=2e-6, rtol=0, msg=key)
    moved = [k for k in ddp if not torch.equal(ddp[k], start[k])]
    assert len(moved) > len(ddp) // 2
    ckpt = torch.load(tmp_path / "fsdp_cpu" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and any(k.startswith("policy.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("trainer", ["fsdp_cpu", "ddp_cpu"])
def test_multi_process_resume_from_last_continues_as_the_uninterrupted_run(trainer, tmp_path):
    """A 2-process run stopped after its first rollout batch and restarted with ckpt_path=last
    (under FSDP: Lightning's load_checkpoint with full state dicts gathered on CPU) ends with the
    rationales and weights of a run that was never stopped."""
    from transformers import AutoModelForCausalLM

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cli = [*GRACE_CLI, f"trainer={trainer}", "callbacks.model_checkpoint.every_n_rollout_batches=1"]

    def run(run_dir, *extra):
        cmd = [sys.executable, "train.py", *cli, *extra, f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    run(tmp_path / "ref", "trainer.max_steps=4")
    run(tmp_path / "run", "trainer.max_steps=2")  # stops after the first rollout batch
    run(tmp_path / "run", "trainer.max_steps=4", "ckpt_path=last")

    def rows(d):
        lines = (d / "rationales.jsonl").read_text().splitlines()
        return [(r["step"], r["text"], r["rationale"]) for r in map(json.loads, lines)]

    assert rows(tmp_path / "run") == rows(tmp_path / "ref") and rows(tmp_path / "ref")[-1][0] == 4
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export").state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "export").state_dict()
    for key in want:  # optimizer state restored too: the second batch's update is the same
        torch.testing.assert_close(got[key], want[key], atol=2e-6, rtol=0, msg=key)
