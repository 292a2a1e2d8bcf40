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

    # batch sizes are global: 4 GPUs (trainer=fsdp) split 8 prompts, 4 a mini-batch
    sizes = ["data.prompts_per_step=8", "algo.prompts_per_minibatch=4"]
    cfg = make_cfg([f"trainer={trainer}", "backbone=tiny", *sizes], tmp_path)
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
    "data.prompts_per_step=4",  # global: 2 a rank
    "algo.prompts_per_minibatch=2",  # global: 1 group a rank an optimiser step
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


def test_strategy_setup_puts_every_parameter_and_buffer_on_the_root_device(monkeypatch):
    """The parts FSDP leaves out (``ignored_states``: embeddings = tied LM head, final norm,
    a reference copy's) are on the root device after the strategy's set-up, with every other
    parameter and buffer, and tied weights stay tied.

    On GPUs FSDP moves what it manages to ``device_id`` and nothing moves the ignored parts
    (Lightning's ``model_to_device`` is a no-op under FSDP): they stayed on the CPU. Here the
    root device is ``meta`` (this machine has no GPU, and the CPU is where the model starts),
    and FSDP is replaced by what it does about placement: move every parameter and buffer but
    ``ignored_states`` to the root device, and return the module (wrapping and sharding are
    FSDP's, run for real by the gloo tests above).
    """
    import lightning as L
    import torch.distributed.fsdp as torch_fsdp

    from grace_lightning.models.backbone import BackboneConfig, load_backbone
    from grace_lightning.utils.fsdp import GraceFSDPStrategy

    root = torch.device("meta")

    class PlacingFSDP:
        def __new__(cls, module, ignored_states=(), **kwargs):
            ignored = {id(p) for p in ignored_states}
            for sub in module.modules():
                for p in sub.parameters(recurse=False):
                    if id(p) not in ignored and p.device != root:
                        moved = torch.nn.Parameter(p.to(root), requires_grad=p.requires_grad)
                        torch.utils.swap_tensors(p, moved)
                for name, buf in sub.named_buffers(recurse=False):
                    sub._buffers[name] = buf.to(root)
            return module

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.policy, _ = load_backbone(BackboneConfig(name="tiny", source="tiny"))
            self.ref_policy, _ = load_backbone(BackboneConfig(name="tiny", source="tiny"))
            self.ref_policy.requires_grad_(False)  # algo.beta > 0: a frozen reference copy

    monkeypatch.setattr(torch_fsdp, "FullyShardedDataParallel", PlacingFSDP)
    monkeypatch.setattr(GraceFSDPStrategy, "root_device", property(lambda self: root))
    strategy = GraceFSDPStrategy()
    module = LM()
    assert module.policy.lm_head.weight is module.policy.model.embed_tokens.weight
    wrapped = strategy._setup_model(module)

    tensors = [*wrapped.named_parameters(remove_duplicate=False), *wrapped.named_buffers()]
    elsewhere = [name for name, t in tensors if t.device != root]
    assert not elsewhere, f"not on the root device after set-up: {elsewhere}"
    assert any(name.endswith("rotary_emb.inv_freq") for name, _ in tensors)
    assert len(strategy.replicated) == 4  # 2 x (embeddings = LM head, final norm)
    own = {id(p) for p in wrapped.parameters()}
    assert all(id(p) in own for p in strategy.replicated)  # moved in place, not replaced
    assert wrapped.policy.lm_head.weight is wrapped.policy.model.embed_tokens.weight


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fsdp_reduces_gradients_and_keeps_buffers_in_fp32(precision, tmp_path):
    """trainer=fsdp's ``precision: bf16-mixed`` reaches FSDP as bf16 compute with fp32
    gradient reduction and fp32 buffers (verl's default); Lightning's own config for it reduces
    in bf16."""
    from lightning.fabric.plugins.precision.fsdp import FSDPPrecision
    from torch.distributed.fsdp import MixedPrecision

    from grace_lightning.train import build_trainer
    from grace_lightning.utils.fsdp import GraceFSDPStrategy

    cfg = make_cfg(
        ["trainer=fsdp_cpu", f"trainer.precision={precision}", "backbone=tiny"], tmp_path
    )
    validate(cfg)
    trainer = build_trainer(cfg, [], [])
    built = trainer.strategy.mixed_precision_config
    compute = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    assert built.param_dtype == compute
    assert built.reduce_dtype == torch.float32 and built.buffer_dtype == torch.float32
    # layer units cast their inputs (fp32 embeddings' output) to bf16 compute
    assert built.cast_forward_inputs == (precision == "bf16-mixed")
    assert FSDPPrecision(precision).mixed_precision_config.reduce_dtype == compute  # Lightning's

    explicit = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    assert GraceFSDPStrategy(mixed_precision=explicit).mixed_precision_config is explicit


def test_activation_checkpointing_with_the_shared_prompt_pass_is_refused_at_config_time(
    tmp_path, tiny_backbone
):
    """FSDP's activation checkpointing recomputes each layer in backward; on the shared-prompt
    loss pass that forward appends the prompt's K/V to the cache again and backward fails
    (shown below on the tiny model with the checkpoint wrapper Lightning applies). The config
    refuses the pair and names both keys; with ``algo.share_prompt=false`` it validates and the
    full-sequence pass gives the gradient of an unwrapped model."""
    import copy
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from grace_lightning.config import ConfigError
    from grace_lightning.rl.policy import response_logprobs

    base = ["trainer=fsdp_cpu", "backbone=tiny", "trainer.strategy.activation_checkpointing=true"]
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(base, tmp_path))
    assert "trainer.strategy.activation_checkpointing=true" in str(err.value)
    assert "algo.share_prompt=false" in str(err.value)
    validate(make_cfg([*base, "algo.share_prompt=false"], tmp_path))
    validate(make_cfg(["trainer=fsdp_cpu", "backbone=tiny"], tmp_path))  # AC off: shared prompt

    plain = copy.deepcopy(tiny_backbone[0]).train()
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(
        wrapped,
        checkpoint_wrapper_fn=partial(
            checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
    )
    g = torch.Generator().manual_seed(0)
    prompts, responses = (
        torch.randint(5, 400, (2, 7), generator=g),
        torch.randint(5, 400, (4, 5), generator=g),
    )
    args = (
        prompts,
        torch.ones_like(prompts),
        responses,
        torch.ones_like(responses),
        torch.tensor([0, 0, 1, 1]),
    )

    def grads(model, share_prompt):
        model.zero_grad()
        logp, _ = response_logprobs(model, *args, share_prompt=share_prompt)
        logp.sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    with pytest.raises(RuntimeError):  # the refused pair (lift the refusal if this passes)
        grads(wrapped, share_prompt=True)
    for got, want in zip(grads(wrapped, False), grads(plain, False)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


EARLY_LAYER_FORWARD = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist, lightning as L
    from grace_lightning.models.backbone import BackboneConfig, load_backbone
    from grace_lightning.utils.fsdp import GraceFSDPStrategy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.policy, _ = load_backbone(BackboneConfig(name="tiny", source="tiny"))

        def forward(self, ids):
            return self.policy(input_ids=ids).logits

    GraceFSDPStrategy.root_device = property(lambda self: torch.device("cpu"))
    root = GraceFSDPStrategy()._setup_model(LM())
    ids = torch.arange(5, 17)[None]
    with torch.no_grad():
        early = root.module.policy(input_ids=ids).logits  # layer units, no root forward yet
        late = root(ids)  # the root's first forward
    assert torch.equal(early, late)
    print("ok")
    """
)


def test_layer_units_run_before_the_roots_first_forward(tmp_path):
    """The dev evaluation at train start (``dev=default``, ``at_start: true``) runs the policy's
    layers before Lightning's first root forward. FSDP marks its root lazily, so each layer
    unit then marked itself root and the root's first forward asserted ("Non-root FSDP
    instance's `_is_root` should not have been set yet"); the strategy marks the root at set-up."""
    script = tmp_path / "early.py"
    script.write_text(EARLY_LAYER_FORWARD)
    init = f"file://{tmp_path / 'rendezvous'}"
    proc = subprocess.run(
        [sys.executable, str(script), init],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
